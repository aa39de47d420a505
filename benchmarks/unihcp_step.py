"""UniHCP step cost on the tiny recipe: the share of a training step spent outside the network's forward and
backward — target building (heatmaps, sampled points), Hungarian matching and the loss arithmetic.

One step = for each of the five tasks: network forward → targets + matching + loss (every decoder layer)
→ backward; then the optimizer step. Each part is timed per step; the ratio is the median over steps of
(targets + matching + loss) / (whole step). Goal ≤ 0.10.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unihcp_step.py [--data data/humans] [--steps 30]

Prints one JSON line: {"bench": "unihcp_step", "ratio", "goal", per-part medians in ms, machine}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench import parse_args  # benchmarks/_bench.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE = {"steps": 1, "warmup": 1}  # --smoke


def main() -> None:
    from foundation.config import load_recipe
    from foundation.data.shards import build_train_loader
    from foundation.engine.transfer import build_optimizer
    from foundation.tasks import build_task
    from foundation.train import seed_everything

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes/unihcp/tiny_synthetic.yaml"))
    ap.add_argument("--data", help="synthetic-humans directory (default: data/humans, else generated in a temp dir)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    args = parse_args(ap, SMOKE)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    data = Path(args.data) if args.data else ROOT / "data/humans"
    if not (data / "pose/manifest.json").is_file():
        from foundation.data.synthetic_humans import generate

        tmp = tempfile.TemporaryDirectory()  # removed when the process ends
        data = Path(tmp.name) / "humans"
        generate(data, n=20, seed=0, views=3, size=64)
    overrides = []
    for name in ("pose", "parsing", "attributes", "reid", "detection"):
        overrides.append(f"tasks.{name}.data.train={data}/{name}/manifest.json")
    recipe = load_recipe(args.recipe, overrides)
    seed_everything(recipe.seed)
    whole = build_task(recipe)
    whole.train()
    optimizer = build_optimizer(whole, recipe.optim)
    loaders = {n: build_train_loader(e.data, batch_size=e.batch_size or recipe.train.batch_size, seed=i, rank=0,
                                     world_size=1) for i, (n, e) in enumerate(recipe.tasks.items())}
    parts: dict[str, list[float]] = {"forward": [], "targets_loss": [], "backward": [], "optimizer": [], "step": []}
    for step in range(args.warmup + args.steps):
        batches = {n: next(iter_) for n, iter_ in ((n, iter(ld)) for n, ld in loaders.items())}
        t_fwd = t_loss = t_bwd = 0.0
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for name, batch in batches.items():
            task = whole.tasks[name]
            batch = task.unfold(batch)  # ReID's P x K images
            t0 = time.perf_counter()
            outputs = task.model(batch["image"])
            t1 = time.perf_counter()
            targets = task.prepare(batch, outputs[-1])
            loss = sum(sum(task.layer_loss(out, targets).values()) for out in outputs) * whole.scales[name]
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            t_fwd, t_loss, t_bwd = t_fwd + t1 - t0, t_loss + t2 - t1, t_bwd + t3 - t2
        t4 = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        if step >= args.warmup:
            for key, value in (("forward", t_fwd), ("targets_loss", t_loss), ("backward", t_bwd),
                               ("optimizer", end - t4), ("step", end - start)):
                parts[key].append(value)
    ratios = [loss / step for loss, step in zip(parts["targets_loss"], parts["step"])]
    for ld in loaders.values():
        ld.close()
    print(json.dumps({
        "bench": "unihcp_step", "ratio": round(statistics.median(ratios), 4), "goal": 0.10,
        **{f"{k}_ms": round(1000 * statistics.median(v), 2) for k, v in parts.items()},
        "steps": args.steps, "recipe": Path(args.recipe).name,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
    }))


if __name__ == "__main__":
    main()
