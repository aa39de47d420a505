"""FSDP2 against DDP at 2 ranks: per-rank bytes of parameters + gradients + optimizer state, and step time.

A ViT-S/16-sized classifier (timm ``vit_small_patch16_224``: 12 blocks of width 384, 21.7 M parameters;
64 px inputs by default, so a CPU step is short: the token count changes the time, not the parameter
count), AdamW, cross-entropy on random batches. Both engines run in the same 2 processes (gloo on CPU,
nccl with ``--device cuda``), rounds alternating DDP / FSDP2. FSDP2 is sharded as
``parallel.backend: fsdp2`` shards a task (``foundation.engine.fsdp.shard``: each block, then the root).

Bytes are counted from what each rank holds after a step's backward, before ``zero_grad``: its parameters,
their gradients and the optimizer's state tensors; for FSDP2 the local shards (``DTensor.to_local()``).
DDP's gradient buckets (another copy of the gradients) are not counted. Step time: the median over a
round's steps after one warm-up step, rank 0's wall time, then the median over rounds. Prints one JSON line
last: ratio = FSDP2 bytes / DDP bytes on rank 0 (goal <= 0.55), step_time_ratio = FSDP2 / DDP (no goal on CPU).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fsdp_memory.py [--steps 6] [--rounds 3] [--batch-size 8]
    .venv/bin/python benchmarks/fsdp_memory.py --smoke        # smallest settings (figures mean nothing)
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
import torch.distributed as dist
import torch.multiprocessing as mp
from _bench import parse_args  # benchmarks/_bench.py, next to this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = {"name": "vit_small_patch16_224", "img_size": 64, "num_classes": 1000}
SMOKE = {"steps": 2, "rounds": 1, "batch_size": 2, "model": {"name": "vit_small_patch16_224", "img_size": 32,
                                                             "num_classes": 10, "depth": 2, "embed_dim": 64,
                                                             "num_heads": 2}}


def build(model_cfg: dict, device: torch.device) -> torch.nn.Module:
    import timm

    cfg = dict(model_cfg)
    torch.manual_seed(0)
    return timm.create_model(cfg.pop("name"), **cfg).to(device)


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards of DTensors)."""
    from torch.distributed.tensor import DTensor

    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(nbytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"params": params, "grads": grads, "optimizer": state, "total": params + grads + state}


def fsdp_recipe(device: torch.device):
    from foundation.config import validate

    return validate({"name": "bench", "model": {"backbone": "vit_small_patch16_224"},
                     "task": {"name": "classification"}, "data": {"train": "unused"},
                     "parallel": {"backend": "fsdp2"},
                     "train": {"precision": "bf16" if device.type == "cuda" else "fp32"}})


def run_engine(kind: str, args, device: torch.device) -> tuple[float, dict[str, int]]:
    from foundation.engine.distributed import DistInfo

    model = build(args.model, device)
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        from foundation.engine.fsdp import shard

        info = DistInfo(dist.get_rank(), dist.get_world_size(), dist.get_rank(), device, "fsdp2")
        shard(model, fsdp_recipe(device), info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    g = torch.Generator().manual_seed(dist.get_rank())
    size, classes = args.model["img_size"], args.model["num_classes"]
    x = torch.randn(args.batch_size, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (args.batch_size,), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, held = [], {}
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step == args.steps:
            held = held_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    del model, optimizer
    return statistics.median(times), held


def worker(rank: int, world: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        rounds = {"ddp": [], "fsdp2": []}
        held = {}
        for _ in range(args.rounds):  # alternate, so drifts of a shared machine hit both
            for kind in ("ddp", "fsdp2"):
                t, held[kind] = run_engine(kind, args, device)
                rounds[kind].append(t)
        if rank == 0:
            Path(out).write_text(json.dumps({"rounds": rounds, "held": held}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parse_args(ap, SMOKE)
    if not args.smoke:
        args.model = dict(MODEL)
    from foundation.engine.distributed import _free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.spawn(worker, args=(args.ranks, args, _free_port(), out), nprocs=args.ranks, join=True)
        res = json.loads(Path(out).read_text())
    ddp_t, fsdp_t = (statistics.median(res["rounds"][k]) for k in ("ddp", "fsdp2"))
    ddp_b, fsdp_b = res["held"]["ddp"], res["held"]["fsdp2"]
    ratio = fsdp_b["total"] / ddp_b["total"]
    mib = lambda b: round(b / 2**20, 2)
    print(f"rank 0 holds {mib(fsdp_b['total'])} MiB under FSDP2, {mib(ddp_b['total'])} MiB under DDP (ratio {ratio:.3f}); "
          f"step {fsdp_t * 1e3:.1f} ms vs {ddp_t * 1e3:.1f} ms", flush=True)
    print(json.dumps({
        "bench": "fsdp_memory", "ratio": round(ratio, 4), "goal": 0.55,
        "fsdp2_mib": {k: mib(v) for k, v in fsdp_b.items()}, "ddp_mib": {k: mib(v) for k, v in ddp_b.items()},
        "step_time_ratio": round(fsdp_t / ddp_t, 4), "fsdp2_step_ms": round(fsdp_t * 1e3, 2),
        "ddp_step_ms": round(ddp_t * 1e3, 2),
        "rounds_ms": {k: [round(x * 1e3, 2) for x in v] for k, v in res["rounds"].items()},
        "model": args.model, "batch_size_per_rank": args.batch_size, "ranks": args.ranks, "steps": args.steps,
        "rounds": args.rounds, "device": args.device,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": int(os.environ.get("OMP_NUM_THREADS", "1"))},
    }))


if __name__ == "__main__":
    main()
