"""Multi-task overhead: one two-task ``mix`` step vs the two single-task steps on the same batches.

Both sides run the whole training engine (``foundation.train.train``) on in-memory batches: the two-task
recipe (one shared backbone, two classification heads) against two single-task recipes with the same
backbone, one per task's batches. Rounds alternate multi / singles; the figure per round is the median
time between consecutive fetches of the first task's batch (set-up, evaluation and the final checkpoint
are not counted), timed by this process's CPU time (``--timer wall`` for perf_counter). The singles'
figure is the sum of their two step times. Prints one JSON line last: ratio = multi / (single A +
single B) (goal <= 1.05).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multitask_overhead.py [--steps 30] [--rounds 5]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

import torch

import foundation.train as train_mod
from foundation.config import validate
from _bench import MemoryLoader, step_args  # benchmarks/_bench.py, next to this script

MODEL = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4,
         "kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3}}
CLOCK = time.process_time

SMOKE = {"steps": 4, "rounds": 1, "batch_size": 4}  # --smoke


def make_batches(batch_size: int, seed: int, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(batch_size, 3, 32, 32, generator=g),
             "label": torch.randint(0, 10, (batch_size,), generator=g)} for _ in range(n)]


def common(steps: int, batch_size: int, out: str) -> dict:
    return {"output_dir": out, "optim": {"lr": 1e-3, "warmup_steps": 5},
            "train": {"steps": steps, "batch_size": batch_size, "log_every": 10, "resume": "none"},
            "logging": {"wandb": "disabled", "progress": False}}


def run(recipe: dict, batches: dict[str, list[dict]], timed: str, steps: int) -> float:
    stamps: list[float] = []
    train_mod.build_train_loader = lambda cfg, **k: MemoryLoader(batches[cfg.train], stamps if cfg.train == timed else None,
                                                                 CLOCK)
    train_mod.train(validate(recipe))
    gaps = [b - a for a, b in zip(stamps[:steps], stamps[1:steps])]
    return statistics.median(gaps[2:])  # the first steps warm up allocators


def run_multi(steps: int, batch_size: int, batches: dict) -> float:
    with tempfile.TemporaryDirectory() as out:
        data = {"image_size": 32, "in_chans": 3}
        recipe = {"name": "multi", "model": MODEL, **common(steps, batch_size, out), "tasks": {
            name: {"task": {"name": "classification"}, "data": {**data, "train": name}, "num_classes": 10}
            for name in batches}}
        return run(recipe, batches, "a", steps)


def run_single(name: str, steps: int, batch_size: int, batches: dict) -> float:
    with tempfile.TemporaryDirectory() as out:
        recipe = {"name": f"single_{name}", "model": {**MODEL, "num_classes": 10}, **common(steps, batch_size, out),
                  "data": {"image_size": 32, "in_chans": 3, "train": name}, "train": {
                      **common(steps, batch_size, out)["train"], "evals": []}}
        return run(recipe, batches, name, steps)


def main() -> None:
    global CLOCK
    args, CLOCK = step_args(SMOKE)
    batches = {"a": make_batches(args.batch_size, 0), "b": make_batches(args.batch_size, 1)}
    multi, singles = [], []
    for _ in range(args.rounds):  # alternate, so drifts of a shared machine hit both
        multi.append(run_multi(args.steps, args.batch_size, batches))
        singles.append(run_single("a", args.steps, args.batch_size, batches)
                       + run_single("b", args.steps, args.batch_size, batches))
    m, s = statistics.median(multi), statistics.median(singles)
    print(f"two-task mix step {m * 1e3:.2f} ms, two single-task steps {s * 1e3:.2f} ms, ratio {m / s:.3f}", flush=True)
    print(json.dumps({
        "bench": "multitask_overhead", "ratio": round(m / s, 4), "goal": 1.05, "multi_step_ms": round(m * 1e3, 3),
        "singles_step_ms": round(s * 1e3, 3), "rounds_multi_ms": [round(x * 1e3, 3) for x in multi],
        "rounds_singles_ms": [round(x * 1e3, 3) for x in singles], "model": MODEL, "batch_size": args.batch_size,
        "steps": args.steps, "rounds": args.rounds, "timer": args.timer,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }))


if __name__ == "__main__":
    main()
