"""Process groups and the one place where the task is wrapped: single process, DDP or DeepSpeed.

``Engine`` gives the training loop the same five verbs whatever the backend: ``engine(batch)``,
``engine.accumulating(last)``, ``engine.backward(loss)``, ``engine.step(clip, skip)`` and the
collectives ``all_true``/``all_reduce``. Everything backend-specific stays in this file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from foundation.config import ParallelConfig, TrainConfig


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # single | ddp | deepspeed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_backend(cfg: ParallelConfig, world_size: int) -> str:
    """``auto``: DeepSpeed when a DeepSpeed config or a ZeRO stage is given, DDP with several processes."""
    if cfg.backend != "auto":
        return cfg.backend
    if cfg.deepspeed_config or cfg.zero_stage > 0:
        return "deepspeed"
    return "ddp" if world_size > 1 else "single"


def init_distributed(cfg: ParallelConfig, device: str = "auto") -> DistInfo:
    """Read torchrun's / the deepspeed launcher's environment and open the process group.

    gloo on CPU, nccl on GPU. A single process opens no group unless DDP or DeepSpeed is asked for
    (``parallel.backend``): then it gets a one-process group, launcher variables or not.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = resolve_backend(cfg, world_size)
    if backend == "single" and world_size > 1:
        raise RuntimeError(f"parallel.backend=single but {world_size} processes were launched; use ddp or auto")
    pg_backend = "nccl" if use_cuda else "gloo"
    if backend != "single" and world_size == 1:  # DDP / DeepSpeed forced on one process, launcher or not
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    if backend == "deepspeed":
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend=pg_backend)
    elif backend == "ddp" and not dist.is_initialized():
        dist.init_process_group(pg_backend, device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev, backend)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, on every rank (small Python objects: RNG states, data positions)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def deepspeed_config(parallel: ParallelConfig, train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config: derived from the recipe, then overridden by ``parallel.deepspeed_config``."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "zero_optimization": {"stage": parallel.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if train.clip_grad:
        cfg["gradient_clipping"] = train.clip_grad
    if train.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if parallel.deepspeed_config:
        path = Path(parallel.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"parallel.deepspeed_config: {path} does not exist")
        user = json.loads(path.read_text())
        # "auto" values (HF convention) keep ours.
        cfg.update({k: v for k, v in user.items() if v != "auto"})
        if "zero_optimization" in user:
            cfg["zero_optimization"] = {**cfg["zero_optimization"], **user["zero_optimization"]}
    return cfg


class Engine:
    """The task wrapped for the backend, its optimizer and (for fp16 on GPU) the grad scaler."""

    def __init__(
        self, task: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo,
        parallel: ParallelConfig, train: TrainConfig,
    ):
        self.info = info
        self.module = task  # unwrapped: what checkpoints and evaluations see
        self.optimizer = optimizer
        self.precision = train.precision
        self.scaler: torch.amp.GradScaler | None = None
        self.ds_config: dict | None = None
        if train.precision == "fp16" and info.device.type != "cuda":
            raise RuntimeError("train.precision=fp16 needs a CUDA device; use bf16 (or fp32) on CPU")
        if info.backend == "deepspeed":
            import deepspeed

            self.ds_config = deepspeed_config(parallel, train, info.world_size)
            self.wrapped, self.ds_optimizer, _, _ = deepspeed.initialize(
                model=task, optimizer=optimizer, config=self.ds_config
            )
        elif info.backend == "ddp":
            self.wrapped = nn.parallel.DistributedDataParallel(
                task, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                find_unused_parameters=parallel.find_unused_parameters, broadcast_buffers=parallel.broadcast_buffers,
            )
        else:
            self.wrapped = task
        if train.precision == "fp16" and info.backend != "deepspeed":
            self.scaler = torch.amp.GradScaler("cuda")

    @property
    def is_deepspeed(self) -> bool:
        return self.info.backend == "deepspeed"

    @property
    def ds_handles_precision(self) -> bool:
        return bool(self.ds_config) and any(self.ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16"))

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast, unless DeepSpeed runs the model in reduced precision itself."""
        if self.precision == "fp32" or self.ds_handles_precision:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.info.device.type, dtype=dtype)

    def __call__(self, batch: dict) -> dict[str, Tensor]:
        return self.wrapped(batch)

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """DDP all-reduces gradients only on the last micro-batch of a step."""
        if self.info.backend == "ddp" and not last:
            with self.wrapped.no_sync():
                yield
        else:
            yield

    def backward(self, loss: Tensor | None, accum: int, drop_step: bool = False) -> None:
        """Back-propagate ``loss / accum``. ``None`` (a non-finite micro-batch every rank agreed to
        drop) contributes nothing. ``drop_step``: this optimizer step will be discarded.

        DeepSpeed needs a backward and a step call for every micro-batch and steps its optimizer at
        the accumulation boundary by itself: a dropped micro-batch gets an exact-zero loss, and a
        dropped step runs with lr 0, which leaves the weights untouched (Adam's moments do see it).
        """
        if self.is_deepspeed:
            if loss is None:
                loss = sum((p.sum() * 0.0 for p in self.module.parameters() if p.requires_grad), torch.zeros(()))
            self.wrapped.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            if drop_step and self.wrapped.is_gradient_accumulation_boundary():
                saved = [g["lr"] for g in self.optimizer.param_groups]
                for g in self.optimizer.param_groups:
                    g["lr"] = 0.0
                self.wrapped.step()
                for g, lr in zip(self.optimizer.param_groups, saved):
                    g["lr"] = lr
            else:
                self.wrapped.step()
            return
        if loss is None:
            return
        loss = loss / accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, clip: float | None, skip: bool) -> float | None:
        """Clip and apply the accumulated gradients; ``skip`` discards them. Returns the grad norm,
        or None when the step was not applied (skipped, or non-finite gradients)."""
        if self.is_deepspeed:
            # The optimizer already stepped inside backward() at the accumulation boundary.
            norm = self.wrapped.get_global_grad_norm()
            return None if skip or norm is None else float(norm)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = float(nn.utils.clip_grad_norm_(params, clip if clip else math.inf))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself on inf/NaN gradients
            self.scaler.update()
        elif math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else None

    def all_true(self, flag: bool) -> bool:
        """True only if ``flag`` is true on every rank (so all ranks take the same branch)."""
        if not dist.is_initialized():
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self._comm_device())
        dist.all_reduce(t)
        return t.item() == 0.0

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum over ranks (a new tensor; the input is left alone)."""
        if not dist.is_initialized():
            return t
        out = t.detach().clone().to(self._comm_device())
        dist.all_reduce(out)
        return out.to(t.device)

    def _comm_device(self) -> torch.device:
        return self.info.device if dist.get_backend() == "nccl" else torch.device("cpu")
