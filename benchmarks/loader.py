"""Training reader throughput against the raw decode + transform rate of the same bytes.

Reader: ``build_train_loader`` (shards → shuffle buffer → decode → random-resized-crop + flip →
normalise → batches of 64), 2 worker processes. Raw: a ``multiprocessing.Pool`` of 2 processes running
a plain loop of ``decode_image`` + the same timm transform over the same JPEG bytes, stacking batches of
64. Measured at 32 px (40x40 JPEG sources, CIFAR-like) and 224 px (320x256 JPEG sources), alternating
reader and raw; worker start-up is excluded from both. Two figures per size, medians over paired rounds:
``ratio_wall``, reader images/s / raw images/s, and ``ratio``, raw CPU time per image / reader CPU time per
image (all processes: workers and the main one). On a machine shared with other jobs the wall-clock
ratio of the same code swings by +-0.15 from run to run with the scheduler's share; CPU time per image is
what the reader costs, and throughput follows it when the workers have their cores. The last line
printed is the JSON result; top-level ``ratio`` is the worse of the sizes measured (goal 0.85 at each).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader.py [--rounds 5] [--seconds 3] [--sizes 32 224]
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
from _bench import parse_args  # noqa: E402 (benchmarks/_bench.py)

WORKERS = 2
BATCH = 64
SOURCES = {32: (40, 40), 224: (320, 256)}  # output size -> source image (width, height)

SMOKE = {"rounds": 1, "seconds": 0.2, "images": 2 * BATCH, "sizes": [32]}  # --smoke


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


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by this process and the processes ``pids``."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return time.process_time() + ticks / os.sysconf("SC_CLK_TCK")


def reader_rate(cfg: DataConfig, seconds: float) -> tuple[float, float]:
    """(images/s, CPU microseconds per image over all processes)."""
    loader = build_train_loader(cfg, batch_size=BATCH, seed=0, rank=0, world_size=1)
    for _ in range(2 * WORKERS):  # start-up: worker processes, shuffle buffer fill
        next(loader)
    pids = [w.pid for w in loader._it._workers]
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds(pids)
    while time.perf_counter() - t0 < seconds:
        n += next(loader)["image"].shape[0]
    rate, cpu = n / (time.perf_counter() - t0), (cpu_seconds(pids) - c0) / n * 1e6
    loader.close()
    return rate, cpu


_transform = None


def _init(cfg: DataConfig) -> None:
    global _transform
    torch.set_num_threads(1)
    _transform = build_train_transform(cfg)


def _raw_batch(chunk: list[bytes]) -> torch.Tensor:
    return torch.stack([_transform(decode_image(b, 3)) for b in chunk])


def raw_rate(cfg: DataConfig, images: list[bytes], seconds: float) -> tuple[float, float]:
    """(images/s, CPU microseconds per image over all processes)."""
    chunks = [images[i: i + BATCH] for i in range(0, len(images) - BATCH + 1, BATCH)]
    with get_context("fork").Pool(WORKERS, initializer=_init, initargs=(cfg,)) as pool:
        pool.map(_raw_batch, chunks[:WORKERS])  # start-up
        pids = [p.pid for p in pool._pool]
        n, t0, c0 = 0, time.perf_counter(), cpu_seconds(pids)
        while time.perf_counter() - t0 < seconds:
            for batch in pool.imap(_raw_batch, chunks):
                n += batch.shape[0]
                if time.perf_counter() - t0 >= seconds:
                    break
        return n / (time.perf_counter() - t0), (cpu_seconds(pids) - c0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    parser.add_argument("--images", type=int, default=640, help="source images per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=sorted(SOURCES))
    args = parse_args(parser, SMOKE)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            shards, images = make_shards(Path(tmp), size, args.images)
            cfg = config(shards, size)
            reader, raw = [], []
            for r in range(args.rounds):
                reader.append(reader_rate(cfg, args.seconds))
                raw.append(raw_rate(cfg, images, args.seconds))
                print(f"{size} px round {r}: reader {reader[-1][0]:.0f} img/s {reader[-1][1]:.0f} us CPU/img, "
                      f"raw {raw[-1][0]:.0f} img/s {raw[-1][1]:.0f} us CPU/img", flush=True)
            # rounds are paired (reader, then raw, back to back): the median of their ratios is robust to the
            # machine's load drifting between rounds
            wall = statistics.median(a[0] / b[0] for a, b in zip(reader, raw, strict=True))
            cpu = statistics.median(b[1] / a[1] for a, b in zip(reader, raw, strict=True))
            results[str(size)] = {
                "ratio": round(cpu, 3), "ratio_wall": round(wall, 3),
                "reader_img_s": round(statistics.median(a[0] for a in reader), 1),
                "raw_img_s": round(statistics.median(b[0] for b in raw), 1),
                "reader_cpu_us_per_img": round(statistics.median(a[1] for a in reader), 1),
                "raw_cpu_us_per_img": round(statistics.median(b[1] for b in raw), 1),
                "reader_rounds": [[round(x, 1) for x in a] for a in reader],
                "raw_rounds": [[round(x, 1) for x in b] for b in raw],
                "source_image": "x".join(map(str, SOURCES[size])) + " JPEG",
            }
    print(json.dumps({
        "bench": "loader", "ratio": min(r["ratio"] for r in results.values()), "goal": 0.85, "sizes": results,
        "workers": WORKERS, "batch_size": BATCH, "rounds": args.rounds, "seconds_per_figure": args.seconds,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "load_avg_1m": round(os.getloadavg()[0], 2)},
    }))


if __name__ == "__main__":
    main()
