"""Model FLOPs utilisation of a CLIP training step under DDP or FSDP2 (the GPU check's ViT-B/16 figure).

Our ``clip`` task on an open_clip config (default ViT-B-16, both towers), built and stepped as the training
loop does: FSDP2 shards it with ``foundation.engine.fsdp.shard`` before the optimizer, DDP wraps it in the
``Engine``; bf16 autocast (FSDP2: bf16 compute, bf16 reduce-scatter); AdamW; synthetic batches. FLOPs of a
step are counted once by ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward of this rank's
batch; the optimizer is not counted); MFU = FLOPs / median step time / the device's dense bf16 peak
(``PEAK_TFLOPS`` overrides the table; unknown devices and CPUs give ``mfu: null``).

Launch as the loop is launched (one process per GPU):

    torchrun --standalone --nproc_per_node=1 benchmarks/clip_mfu.py --backend fsdp2 --device cuda --batch-size 128
    .venv/bin/python benchmarks/clip_mfu.py --backend fsdp2 --smoke     # CPU dry run (narrow model, 2 steps)

Prints one JSON line last (rank 0).
"""

from __future__ import annotations

import argparse
import json
import logging
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
sys.path.insert(0, str(ROOT / "benchmarks"))

# dense bf16 tensor-core peaks (no sparsity), FLOP/s per device
PEAKS = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12, "H100": 989.4e12,
         "A100": 312e12, "L40S": 362.1e12, "L4": 121e12, "A10G": 70e12}
SMOKE = {"model": "bench-narrow-b32", "batch_size": 2, "steps": 2, "warmup": 1, "device": "cpu"}


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["ddp", "fsdp2"], default="fsdp2")
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model config name")
    ap.add_argument("--batch-size", type=int, default=128, help="per rank")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--compile", action="store_true")
    args = parse_args(ap, SMOKE)  # --smoke: the CPU dry run (narrow model, 2 steps)
    logging.disable(logging.WARNING)

    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    import clip_throughput as ct
    from foundation.engine import fsdp
    from foundation.engine.distributed import Engine, close_distributed, init_distributed
    from foundation.tasks import TASKS
    from foundation.train import build_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == ct.NARROW_NAME:
            (Path(tmp) / f"{ct.NARROW_NAME}.json").write_text(json.dumps(ct.NARROW))
            open_clip.add_model_config(Path(tmp) / f"{ct.NARROW_NAME}.json")
        cfg = open_clip.get_model_config(args.model)
        size = cfg["vision_cfg"]["image_size"]
        ns = argparse.Namespace(model=args.model, image_size=size if isinstance(size, int) else size[0], out=tmp,
                                steps=args.steps + args.warmup + 1, batch_size=args.batch_size, compile=args.compile,
                                precision="bf16", device=args.device)
        recipe = ct.recipe_for("clip", ns)
        recipe = recipe.model_copy(update={"parallel": recipe.parallel.model_copy(update={"backend": args.backend})})
        info = init_distributed(recipe.parallel, recipe.train.device)
        try:
            task = TASKS["clip"].build(recipe.model, recipe.task, recipe.data).to(info.device)
            if args.backend == "fsdp2":
                fsdp.shard(task, recipe, info)
            if args.compile:
                task.model.compile()
            optimizer = build_optimizer(task, recipe.optim)
            engine = (fsdp.FSDPEngine if args.backend == "fsdp2" else Engine)(task, optimizer, info, recipe.parallel,
                                                                              recipe.train)
            batch = ct.make_batches(1, args.batch_size, ns.image_size, cfg["text_cfg"].get("context_length", 77),
                                    args.device)[0]

            def step() -> None:
                with engine.autocast():
                    out = engine(batch)
                engine.backward(out["loss"], 1)
                engine.step(1.0, skip=False)

            def sync() -> None:
                if info.device.type == "cuda":
                    torch.cuda.synchronize()

            times = []
            for i in range(args.warmup + args.steps):
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            counter = FlopCounterMode(display=False)
            with counter:
                with engine.autocast():
                    out = engine(batch)
                engine.backward(out["loss"], 1)
            optimizer.zero_grad(set_to_none=True)
            flops = counter.get_total_flops()
            dt = statistics.median(times)
            peak = peak_flops(info.device)
            if info.is_main:
                print(json.dumps({
                    "bench": "clip_mfu", "backend": args.backend, "model": args.model, "precision": "bf16",
                    "mfu": round(flops / dt / peak, 4) if peak else None, "tflops_per_s": round(flops / dt / 1e12, 3),
                    "step_ms": round(dt * 1e3, 2), "flops_per_step": flops, "batch_size_per_rank": args.batch_size,
                    "ranks": info.world_size, "steps": args.steps, "compile": args.compile,
                    "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
                    "peak_tflops": peak / 1e12 if peak else None,
                    "machine": {"platform": platform.platform(), "torch": torch.__version__},
                }), flush=True)
        finally:
            close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
