"""Feature extraction: ``foundation adapt``'s extractor vs a bare ``forward_features`` loop.

The extractor (``foundation.adapt.features.extract_features``: shard reader with decoding workers, eval
transform, frozen backbone, features gathered, sorted and written to the cache) against a bare loop
that runs ``forward_head(forward_features(x), pre_logits=True)`` over the same images decoded and
transformed beforehand and held in memory. Same model, batch size and images (scikit-learn's digits train
split as shards, resized to ``--image-size``); rounds alternate extractor / bare; each side's figure is
its median images/s over the rounds (wall clock; a fresh cache directory each round, so nothing is read
back). Prints one JSON line last: ratio = extractor / bare images/s (goal >= 0.9).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/feature_extraction.py [--model resnet18] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _bench import parse_args  # benchmarks/_bench.py, next to this script

SMOKE = {"rounds": 1, "image_size": 32, "batch_size": 64}  # --smoke


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="reader processes of the extractor")
    p.add_argument("--rounds", type=int, default=3)
    args = parse_args(p, SMOKE)

    import timm
    from safetensors.torch import save_file

    from foundation.adapt.backbone import load_backbone
    from foundation.adapt.features import extract_features
    from foundation.data.shards import iter_raw_samples
    from foundation.data.sources.base import BuildOptions
    from foundation.data.sources.digits import digits
    from foundation.data.transforms import build_eval_transform, decode_image

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="bench_features_")  # removed when the process ends
    work = Path(tmp.name)
    digits(work / "digits", BuildOptions(workers=1))
    model = timm.create_model(args.model, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "w.safetensors"))
    backbone = load_backbone(f"timm:{args.model}", weights=str(work / "w.safetensors"), image_size=args.image_size)
    data = str(work / "digits")

    # the bare loop's input: every train image decoded and transformed once, batched in memory
    cfg = backbone.data_config(workers=0)
    transform = build_eval_transform(cfg)
    images = [transform(decode_image(s["png"], cfg.in_chans)) for s in iter_raw_samples(data, "train")]
    batches = [torch.stack(images[i: i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
    net = backbone.module.model.eval()

    @torch.inference_mode()
    def bare() -> float:
        start = time.perf_counter()
        feats = [net.forward_head(net.forward_features(x), pre_logits=True) for x in batches]
        assert sum(len(f) for f in feats) == len(images)
        return len(images) / (time.perf_counter() - start)

    def extractor(i: int) -> float:
        start = time.perf_counter()
        f = extract_features(backbone, data, "train", cache_dir=work / f"cache{i}", batch_size=args.batch_size,
                             workers=args.workers, progress=False)
        assert len(f.keys) == len(images) and not f.cached
        return len(images) / (time.perf_counter() - start)

    bare()  # warm-up (allocator, first-call overheads)
    ours, theirs = [], []
    for i in range(args.rounds):
        ours.append(extractor(i))
        theirs.append(bare())
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(json.dumps({
        "bench": "feature_extraction", "ratio": round(ratio, 3), "goal": 0.9,
        "extractor_img_s": round(statistics.median(ours), 1), "bare_img_s": round(statistics.median(theirs), 1),
        "rounds_extractor": [round(x, 1) for x in ours], "rounds_bare": [round(x, 1) for x in theirs],
        "model": args.model, "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
        "images": len(images), "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_implementation()} "
                   f"{platform.python_version()}, torch {torch.__version__}",
    }))


if __name__ == "__main__":
    main()
