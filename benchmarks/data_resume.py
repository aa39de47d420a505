"""Data resume cost: time to the first batch from a saved position at step 10,000 against step 100.

Synthetic shards (8 x 2,000 samples of 40x40 JPEG, like CIFAR), the training reader as a recipe runs it
(2 workers, shuffle buffer 1,000, batches of 64, 32 px). Each figure is the time from
``build_train_loader(..., position=P)`` to its first batch, worker start-up included; the two steps
alternate over rounds and ``ratio`` is the median of t(10,000) / t(100) over paired rounds (goal <= 1.5:
resuming costs the same whatever the step). The step-10,000 position is obtained by running the raw
stream (shard draws, shuffle buffer, source mixing) without decoding, which is what the workers do
minus the decode; it is checked against a real loader's ``position()`` at step 100 first.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_resume.py [--rounds 5] [--steps 100 10000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from foundation.config import DataConfig  # noqa: E402
from foundation.data.manifest import write_manifest, write_split  # noqa: E402
from foundation.data.tars import Reporter  # noqa: E402
from foundation.data.train_stream import POSITION_VERSION, _seed, _Source, build_train_loader  # noqa: E402
from _bench import parse_args  # noqa: E402 (benchmarks/_bench.py)

WORKERS = 2
BATCH = 64
SHARDS = 8

SMOKE = {"rounds": 1, "steps": [2, 20], "per_shard": 200}  # --smoke


def make_shards(root: Path, per_shard: int) -> Path:
    rng = np.random.default_rng(0)
    coarse = [rng.integers(0, 256, (5, 5, 3), dtype=np.uint8) for _ in range(64)]

    def jpeg(i: int) -> bytes:
        img = np.asarray(Image.fromarray(coarse[i % 64]).resize((40, 40), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    samples = ({"__key__": f"{i:07d}", "jpg": jpeg(i), "cls": str(i % 10).encode()} for i in range(SHARDS * per_shard))
    entry = write_split(root, "train", samples, max_count=per_shard)
    write_manifest(root, None, {"train": entry}, class_names=None, source={"format": "benchmark"}, command="")
    return root


def config(shards: Path) -> DataConfig:
    return DataConfig(train=str(shards), image_size=32, workers=WORKERS, shuffle_buffer=1000,
                      augment={"interpolation": "bilinear"})


def position_at(cfg: DataConfig, steps: int) -> dict:
    """The position after ``steps`` batches, by running each worker's raw stream without decoding
    (every sample is good here, so each batch is ``BATCH`` raw samples, workers taking turns)."""
    stream = build_train_loader(cfg, batch_size=BATCH, seed=0, rank=0, world_size=1)._stream
    raw, streams = [], []
    for w in range(WORKERS):
        sources = [_Source(urls, _seed(0, 0, w, i, 1), cfg.shuffle_buffer, Reporter())
                   for i, urls in enumerate(stream.sources)]
        n = len(range(w, steps, WORKERS)) * BATCH
        for index in range(n):
            sources[stream._pick(w, index) if len(sources) > 1 else 0].next()
        raw.append(n)
        streams.append([s.state() for s in sources])
    return {"version": POSITION_VERSION, "seed": 0, "rank": 0, "world_size": 1, "workers": WORKERS,
            "batch_size": BATCH, "raw": raw, "skipped": [0] * WORKERS, "streams": streams,
            "next_worker": steps % WORKERS, "batches": steps, "samples": steps * BATCH}


def first_batch_seconds(cfg: DataConfig, position: dict) -> float:
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, batch_size=BATCH, seed=0, rank=0, world_size=1, position=position)
    next(loader)
    seconds = time.perf_counter() - t0
    loader.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs=2, default=[100, 10_000], metavar=("EARLY", "LATE"))
    parser.add_argument("--per-shard", type=int, default=2000, help="samples per shard (8 shards)")
    args = parse_args(parser, SMOKE)
    torch.set_num_threads(1)
    early, late = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(make_shards(Path(tmp), args.per_shard))
        real = build_train_loader(cfg, batch_size=BATCH, seed=0, rank=0, world_size=1)
        for _ in range(early):
            next(real)
        assert real.position() == position_at(cfg, early), "the fast-forwarded position differs from a real one"
        real.close()
        t0 = time.perf_counter()
        positions = {early: position_at(cfg, early), late: position_at(cfg, late)}
        forward_s = time.perf_counter() - t0
        times: dict[int, list[float]] = {early: [], late: []}
        for r in range(args.rounds):
            for step in (early, late) if r % 2 == 0 else (late, early):
                times[step].append(first_batch_seconds(cfg, positions[step]))
            print(f"round {r}: step {early} {times[early][-1]:.3f} s, step {late} {times[late][-1]:.3f} s", flush=True)
    print(json.dumps({
        "bench": "data_resume",
        "ratio": round(statistics.median(b / a for a, b in zip(times[early], times[late], strict=True)), 3),
        "goal": 1.5,
        "first_batch_s": {str(early): round(statistics.median(times[early]), 3),
                          str(late): round(statistics.median(times[late]), 3)},
        "rounds_s": {str(k): [round(x, 3) for x in v] for k, v in times.items()},
        "position_bytes": {str(k): len(json.dumps(p)) for k, p in positions.items()},
        "fast_forward_s": round(forward_s, 1), "workers": WORKERS, "batch_size": BATCH, "shuffle_buffer": 1000,
        "shards": f"{SHARDS} x {args.per_shard} samples, 40x40 JPEG -> 32 px",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2)},
    }))


if __name__ == "__main__":
    main()
