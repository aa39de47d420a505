"""CLIP training throughput: our `clip` task through foundation's training loop vs open_clip_train's
`train_one_epoch`, on the same open_clip model config, batch, precision and synthetic data; plus the
DeCLIP step time over the CLIP step time.

Steps alternate one by one. Our CLIP runs in `foundation.train.train` with the shard reader replaced
by an in-memory one; each time the loop fetches a batch, the reader first runs one open_clip_train
step (`train_one_epoch` over a one-batch DataLoader stand-in, with open_clip's model, `ClipLoss`,
AdamW groups and cosine schedule as its main.py builds them) and one DeCLIP step (our task through
the same `Engine` calls as the loop's step). Each side's step time is timed on its own; medians over
the steps after the warm-up. On a CPU the timer is this process's CPU time (`time.process_time`, run
with OMP_NUM_THREADS=1): the development machines are shared, and wall time there mostly measures the
neighbours' load. On a GPU it is wall time, with a synchronisation at each boundary.

Last line: one JSON object, ratio = ours / open_clip_train samples/s (goal >= 1.0) and
declip_over_clip = DeCLIP / CLIP step time (goal <= 2.2).

    .venv/bin/python benchmarks/clip_throughput.py                      # narrow B/32, CPU, a few minutes
    .venv/bin/python benchmarks/clip_throughput.py --model ViT-B-32 --device cuda --precision bf16 \
        --batch-size 128 --steps 200 --compile                            # the GPU check
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import torch
from _bench import parse_args  # benchmarks/_bench.py, next to this script

# A narrow ViT-B/32 for a CPU: the same token counts (112 px / patch 16 = 7 x 7 patches; 77 text tokens)
# and CLIP's vocabulary, at width 256 / 192 and 6 layers, so the towers' share of a step is B/32-like.
NARROW = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 112, "layers": 6, "width": 256, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 6},
}
NARROW_NAME = "bench-narrow-b32"
WORDS = "a photo of the small large red blue dog cat car tree house person on in with near".split()
TIMER: Callable[[], float] = time.perf_counter  # main() picks process_time on a CPU
DEVICE = "cpu"

SMOKE = {"steps": 3, "warmup": 1, "batch_size": 2}  # --smoke


def now() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return TIMER()


def make_batches(n: int, batch_size: int, image_size: int, context_length: int, device: str) -> list[dict]:
    from open_clip.tokenizer import SimpleTokenizer

    g = torch.Generator().manual_seed(0)
    tok = SimpleTokenizer(context_length=context_length)
    batches = []
    for _ in range(n):
        words = torch.randint(0, len(WORDS), (batch_size, 8), generator=g).tolist()
        text = [" ".join(WORDS[w] for w in row) for row in words]
        batches.append({
            "image": torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
            "image2": torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
            "text": text, "tokens": tok(text).to(device),
        })
    return batches


def recipe_for(task: str, args: argparse.Namespace):
    from foundation.config import validate

    return validate({
        "name": f"bench_{task}", "output_dir": args.out,
        "model": {"dual_encoder": {"vision_open_clip": args.model, "text": {"open_clip": args.model}}},
        "task": {"name": task},
        # data.train names the in-memory batches: the shard reader is replaced, but a recipe's task reads its own data
        "data": {"image_size": args.image_size, "in_chans": 3, "two_view": task == "declip", "train": "memory"},
        "optim": {"lr": 1e-3, "warmup_steps": 5, "weight_decay": 0.1, "betas": [0.9, 0.98]},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "log_every": 10**6, "resume": "none",
                  "evals": [], "precision": args.precision, "device": args.device, "compile": args.compile},
        "logging": {"wandb": "disabled", "progress": False},
    })


# --------------------------------------------------------------------------------------------------
# the other two sides, one step per call


class OpenClipTrainStep:
    """One open_clip_train step per call: its objects as its main.py builds them (single process)."""

    def __init__(self, args: argparse.Namespace):
        import open_clip
        from open_clip_train.scheduler import cosine_lr

        precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[args.precision]
        self.model = open_clip.create_model(args.model, precision=precision, device=args.device, output_dict=True)
        self.loss = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
        named = list(self.model.named_parameters())
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": 0.1}],
            lr=1e-3, betas=(0.9, 0.98), eps=1e-8,
        )
        self.scheduler = cosine_lr(self.optimizer, 1e-3, 5, 10**6)
        if args.compile:
            self.model = torch.compile(self.model)  # as open_clip_train's --torchcompile
        self.args = Namespace(
            device=args.device, precision=precision, distill=False, accum_freq=1, skip_scheduler=False,
            grad_clip_norm=1.0, horovod=False, log_every_n_steps=10**6, world_size=1, rank=0, local_rank=0,
            batch_size=args.batch_size, wandb=False, save_logs=False,
        )
        self.epoch = 0

    def __call__(self, batch: dict) -> None:
        from open_clip_train.data import DataInfo
        from open_clip_train.train import train_one_epoch

        class OneBatch:  # what train_one_epoch reads from a DataLoader
            num_batches, num_samples = 1, batch["image"].shape[0]

            def __iter__(self):
                yield batch["image"], batch["tokens"]

        # a one-batch epoch: `epoch` advances the step its cosine schedule sees
        train_one_epoch(self.model, {"train": DataInfo(dataloader=OneBatch())}, self.loss, self.epoch,
                        self.optimizer, None, self.scheduler, None, self.args)
        self.epoch += 1


class OurStep:
    """One step of our task per call, through the Engine calls of foundation.train's step."""

    def __init__(self, task_name: str, args: argparse.Namespace):
        from foundation.engine.distributed import Engine, init_distributed
        from foundation.tasks import TASKS
        from foundation.train import build_optimizer, build_scheduler

        recipe = recipe_for(task_name, args)
        info = init_distributed(recipe.parallel, recipe.train.device)
        self.task = TASKS[task_name].build(recipe.model, recipe.task, recipe.data).to(info.device)
        if args.compile:
            self.task.model.compile()
        optimizer = build_optimizer(self.task, recipe.optim)
        self.scheduler = build_scheduler(optimizer, recipe.optim, args.steps)
        self.engine = Engine(self.task, optimizer, info, recipe.parallel, recipe.train)
        self.clip_grad, self.step = recipe.train.clip_grad, 0

    def __call__(self, batch: dict) -> None:
        self.scheduler.step_update(self.step)
        with self.engine.autocast():
            out = self.engine(batch)
        finite = self.engine.all_true(bool(torch.isfinite(out["loss"]).all()))
        self.engine.backward(out["loss"] if finite else None, 1)
        self.engine.step(self.clip_grad, skip=not finite)
        self.step += 1


class InterleavingLoader:
    """The shard reader's interface over in-memory batches. At each fetch after the first it times the
    loop's previous step (fetch to fetch, minus its own work) and runs one step of each other side."""

    def __init__(self, batches: list[dict], others: dict[str, Callable[[dict], None]], times: dict[str, list[float]]):
        self.batches, self.others, self.times = batches, others, times
        self.skipped, self.epoch_samples = 0, None

    def __iter__(self):
        i, resumed = 0, None
        while True:
            fetched = now()
            batch = self.batches[i % len(self.batches)]
            if resumed is not None:
                self.times["ours"].append(fetched - resumed)
                for name, step in self.others.items():
                    t0 = now()
                    step(batch)
                    self.times[name].append(now() - t0)
            i += 1
            resumed = now()
            yield batch

    def position(self) -> dict:
        return {}

    def epoch(self) -> None:
        return None

    def pop_skip_reports(self) -> list[str]:
        return []


def machine(device: str) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}; {cpu}"
    return f"CPU {cpu}, torch threads {torch.get_num_threads()}"


def main() -> int:
    global TIMER, DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=NARROW_NAME, help="open_clip model config name (default: a narrow B/32 for CPUs)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=None, help="default: the config's")
    ap.add_argument("--steps", type=int, default=24, help="steps of each side")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each side left out of the medians")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model on every side")
    ap.add_argument("--no-declip", action="store_true", help="skip the DeCLIP / CLIP step-time figure")
    args = parse_args(ap, SMOKE)
    TIMER, DEVICE = (time.process_time if args.device == "cpu" else time.perf_counter), args.device

    import open_clip

    import foundation.train as train_mod

    logging.disable(logging.WARNING)  # all sides log; only the figures matter here
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == NARROW_NAME:
            (Path(tmp) / f"{NARROW_NAME}.json").write_text(json.dumps(NARROW))
            open_clip.add_model_config(Path(tmp) / f"{NARROW_NAME}.json")
        cfg = open_clip.get_model_config(args.model)
        size = args.image_size or cfg["vision_cfg"]["image_size"]
        args.image_size, args.out = (size if isinstance(size, int) else size[0]), tmp
        batches = make_batches(4, args.batch_size, args.image_size, cfg["text_cfg"].get("context_length", 77), args.device)
        others: dict[str, Callable[[dict], None]] = {"open_clip_train": OpenClipTrainStep(args)}
        if not args.no_declip:
            others["declip"] = OurStep("declip", args)
        times: dict[str, list[float]] = {"ours": [], **{k: [] for k in others}}
        train_mod.build_train_loader = lambda *a, **k: InterleavingLoader(batches, others, times)
        train_mod.train(recipe_for("clip", args))  # `steps` steps: steps - 1 fetches time a previous step

    step = {k: statistics.median(v[args.warmup:]) for k, v in times.items()}
    sps = {k: args.batch_size / v for k, v in step.items()}
    result = {
        "bench": "clip_throughput",
        "ratio": round(sps["ours"] / sps["open_clip_train"], 4),
        "goal": 1.0,
        "declip_over_clip": round(step["declip"] / step["ours"], 4) if "declip" in step else None,
        "declip_goal": 2.2,
        "ours_samples_per_s": round(sps["ours"], 2),
        "open_clip_train_samples_per_s": round(sps["open_clip_train"], 2),
        "declip_samples_per_s": round(sps["declip"], 2) if "declip" in sps else None,
        "step_ms_median": {k: round(v * 1000, 2) for k, v in step.items()},
        "steps_timed": {k: len(v[args.warmup:]) for k, v in times.items()},
        "step_ms": {k: [round(t * 1000, 1) for t in v] for k, v in times.items()},
        "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
        "precision": args.precision, "compile": args.compile, "device": args.device, "timer": TIMER.__name__,
        "machine": machine(args.device), "torch": torch.__version__, "open_clip": open_clip.__version__,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    assert all(math.isfinite(v) for v in sps.values())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
