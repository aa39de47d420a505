"""Training reader throughput against the raw decode + transform rate of the same bytes.

Reader: ``build_train_loader`` (shards → shuffle buffer → decode → random-resized-crop + flip →
normalise → batches of 64), 2 worker processes. Raw: a ``multiprocessing.Pool`` of 2 processes running
a plain loop of ``decode_image`` + the same timm transform over the same JPEG bytes, stacking batches of
64. Measured at 32 px (40x40 JPEG sources, CIFAR-like) and 224 px (320x256 JPEG sources), alternating
reader and raw; ``ratio`` is the median over rounds of reader/raw, the rates are medians; worker start-up
is excluded from both. The last line printed is the JSON result; top-level ``ratio`` is at 224 px (goal 0.85).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader.py [--rounds 3] [--seconds 4]
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
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from foundation.config import DataConfig  # noqa: E402
from foundation.data.shards import build_train_loader, write_manifest, write_split  # noqa: E402
from foundation.data.transforms import build_train_transform, decode_image  # noqa: E402

WORKERS = 2
BATCH = 64
SOURCES = {32: (40, 40), 224: (320, 256)}  # output size -> source image (width, height)


def natural_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A smooth random image with some texture (compresses like a photo, unlike white noise)."""
    w, h = size
    coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, size: int, n: int) -> tuple[Path, list[bytes]]:
    rng = np.random.default_rng(size)
    images = [natural_jpeg(rng, SOURCES[size]) for _ in range(n)]
    out = root / f"s{size}"
    out.mkdir()
    samples = ({"__key__": f"{i:06d}", "jpg": b, "cls": str(i % 10).encode()} for i, b in enumerate(images))
    entry = write_split(out, "train", samples, max_count=max(1, n // 4))
    write_manifest(out, None, {"train": entry}, class_names=None, source={"format": "benchmark"}, command="")
    return out, images


def config(shards: Path, size: int) -> DataConfig:
    return DataConfig(train=str(shards), image_size=size, workers=WORKERS, shuffle_buffer=500,
                      augment={"interpolation": "bilinear"})


def reader_rate(cfg: DataConfig, seconds: float) -> float:
    loader = build_train_loader(cfg, batch_size=BATCH, seed=0, rank=0, world_size=1)
    for _ in range(2 * WORKERS):  # start-up: worker processes, shuffle buffer fill
        next(loader)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(loader)["image"].shape[0]
    rate = n / (time.perf_counter() - t0)
    loader.close()
    return rate


_transform = None


def _init(cfg: DataConfig) -> None:
    global _transform
    torch.set_num_threads(1)
    _transform = build_train_transform(cfg)


def _raw_batch(chunk: list[bytes]) -> torch.Tensor:
    return torch.stack([_transform(decode_image(b, 3)) for b in chunk])


def raw_rate(cfg: DataConfig, images: list[bytes], seconds: float) -> float:
    chunks = [images[i: i + BATCH] for i in range(0, len(images) - BATCH + 1, BATCH)]
    with get_context("fork").Pool(WORKERS, initializer=_init, initargs=(cfg,)) as pool:
        pool.map(_raw_batch, chunks[:WORKERS])  # start-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for batch in pool.imap(_raw_batch, chunks):
                n += batch.shape[0]
                if time.perf_counter() - t0 >= seconds:
                    break
        return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per figure")
    parser.add_argument("--images", type=int, default=640, help="source images per size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (32, 224):
            shards, images = make_shards(Path(tmp), size, args.images)
            cfg = config(shards, size)
            reader, raw = [], []
            for r in range(args.rounds):
                reader.append(reader_rate(cfg, args.seconds))
                raw.append(raw_rate(cfg, images, args.seconds))
                print(f"{size} px round {r}: reader {reader[-1]:.0f} img/s, raw {raw[-1]:.0f} img/s", flush=True)
            results[str(size)] = {
                "reader_img_s": round(statistics.median(reader), 1), "raw_img_s": round(statistics.median(raw), 1),
                # rounds are paired (reader, then raw, back to back): the median of their ratios is robust to
                # the machine's load drifting between rounds
                "ratio": round(statistics.median(a / b for a, b in zip(reader, raw, strict=True)), 3),
                "reader_rounds": [round(x, 1) for x in reader], "raw_rounds": [round(x, 1) for x in raw],
                "source_image": "x".join(map(str, SOURCES[size])) + " JPEG",
            }
    print(json.dumps({
        "bench": "loader", "ratio": results["224"]["ratio"], "goal": 0.85, "sizes": results,
        "workers": WORKERS, "batch_size": BATCH, "rounds": args.rounds, "seconds_per_figure": args.seconds,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2)},
    }))


if __name__ == "__main__":
    main()
