"""Engine overhead: the training engine's step time vs a bare hand-written torch loop.

Same model, batch, optimizer (AdamW + clipping) and in-memory batches; rounds alternate engine / bare;
the figure per round is the median time between consecutive batch fetches (so set-up, evaluation and
the final checkpoint are not counted). ``--timer process`` (default) uses this process's CPU time,
which other jobs on a shared machine disturb far less than wall time; ``--timer wall`` uses
perf_counter. Prints one JSON line last: ratio = engine / bare (goal <= 1.05).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_overhead.py [--steps 30] [--rounds 5]
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
from foundation.tasks import TASKS
from foundation.train import build_optimizer
from _bench import MemoryLoader, step_args  # benchmarks/_bench.py, next to this script

MODELS = {
    "resnet18": {"backbone": "resnet18", "num_classes": 10},
    "vit_tiny": {"backbone": "vit_tiny_patch16_224", "num_classes": 10, "img_size": 32, "patch_size": 4},
}

SMOKE = {"steps": 4, "rounds": 1, "batch_size": 4}  # --smoke


CLOCK = time.process_time


def make_batches(batch_size: int, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(batch_size, 3, 32, 32, generator=g),
             "label": torch.randint(0, 10, (batch_size,), generator=g)} for _ in range(n)]


def recipe_for(model: str, steps: int, batch_size: int, out: str):
    return validate({
        "name": f"bench_{model}", "output_dir": out,
        # data.train names the in-memory batches: the shard reader is replaced, but a recipe's task reads its own data
        "model": MODELS[model], "data": {"image_size": 32, "in_chans": 3, "train": "memory"},
        "optim": {"lr": 1e-3, "warmup_steps": 5}, "train": {"steps": steps, "batch_size": batch_size,
        "log_every": 10, "resume": "none", "evals": []}, "logging": {"wandb": "disabled", "progress": False},
    })


def step_time(stamps: list[float]) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps[2:])  # the first steps warm up allocators


def run_engine(model: str, steps: int, batch_size: int, batches: list[dict]) -> float:
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        train_mod.build_train_loader = lambda *a, **k: MemoryLoader(batches, stamps, CLOCK)
        train_mod.train(recipe_for(model, steps, batch_size, out))
    return step_time(stamps[:steps])


def run_bare(model: str, steps: int, batch_size: int, batches: list[dict]) -> float:
    recipe = recipe_for(model, steps, batch_size, "/tmp")
    torch.manual_seed(0)
    task = TASKS["classification"].build(recipe.model, recipe.task, recipe.data)
    opt = build_optimizer(task, recipe.optim)
    stamps: list[float] = []
    task.train()
    for i in range(steps):
        stamps.append(CLOCK())
        batch = batches[i % len(batches)]
        loss = task(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step_time(stamps)


def main() -> None:
    global CLOCK
    args, CLOCK = step_args(SMOKE)
    batches = make_batches(args.batch_size)
    results = {}
    for model in MODELS:
        engine, bare = [], []
        for _ in range(args.rounds):  # alternate, so drifts of a shared machine hit both
            engine.append(run_engine(model, args.steps, args.batch_size, batches))
            bare.append(run_bare(model, args.steps, args.batch_size, batches))
        e, b = statistics.median(engine), statistics.median(bare)
        results[model] = {"engine_step_ms": round(e * 1e3, 3), "bare_step_ms": round(b * 1e3, 3),
                          "ratio": round(e / b, 4)}
        print(f"{model}: engine {e * 1e3:.2f} ms/step, bare {b * 1e3:.2f} ms/step, ratio {e / b:.3f}", flush=True)
    ratio = max(r["ratio"] for r in results.values())
    print(json.dumps({
        "bench": "engine_overhead", "ratio": ratio, "goal": 1.05, "models": results,
        "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "timer": args.timer,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }))


if __name__ == "__main__":
    main()
