"""FSDP2 (``parallel.backend: fsdp2``): torch's ``fully_shard`` per transformer block / ResNet stage and the root.

Parameters, gradients and optimizer state are sharded over the ranks (each rank holds ``1/world`` of
every tensor, as a DTensor); a block's parameters are all-gathered just before its forward and backward
and freed after. ``shard`` does it to the task in place, before the optimizer is built (the optimizer
steps the shards); ``FSDPEngine`` is the loop's engine for such a task; checkpoints hold the shards in
``dcp/`` (``torch.distributed.checkpoint``: any world size reads them) next to the gathered
``model.safetensors`` every reader uses. Precision: bf16 on a GPU keeps fp32 shards and computes in bf16
(``MixedPrecisionPolicy``: bf16 all-gathers, bf16 reduce-scatters or fp32 with
``parallel.fsdp_reduce_fp32``); on CPU everything is fp32 (bf16 there is autocast, as for the other
backends). Not available: fp16 (it would need a sharded grad scaler), ``train.ema_decay`` and
``train.schedule: groups`` (each says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from foundation.config import Recipe, RecipeError
from foundation.engine.distributed import DistInfo, Engine

log = logging.getLogger("foundation")

DCP_DIR = "dcp"  # the sharded state inside a checkpoint directory: {"model": ..., "optim": ...}
_BLOCK_LISTS = {"blocks", "resblocks", "layers"}  # timm ViT/CeiT, open_clip text towers, decoders
_STAGE = re.compile(r"(^|\.)(layer\d+|stages\.\d+)$")  # timm ResNet stages, ConvNeXt/Swin-style stages


def shard_units(task: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that get their own ``fully_shard``, innermost first: each child of a ``blocks`` /
    ``resblocks`` / ``layers`` list that has children of its own (a transformer block, not a Linear of
    an MLP), and each ResNet stage (``layer1``..``layer4``, ``stages.N``)."""
    units = []
    for name, module in task.named_modules():
        parent, _, last = name.rpartition(".")
        block = last.isdigit() and parent.rpartition(".")[2] in _BLOCK_LISTS and next(module.children(), None) is not None
        if (block or _STAGE.search(name)) and next(module.parameters(), None) is not None:
            units.append((name, module))
    return sorted(units, key=lambda u: -u[0].count("."))


def mixed_precision(precision: str, device: torch.device, reduce_fp32: bool) -> MixedPrecisionPolicy:
    """bf16 on a GPU: bf16 compute and all-gathers, bf16 (or fp32) gradient reduction; fp32 otherwise."""
    if device.type == "cuda" and precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                    reduce_dtype=torch.float32 if reduce_fp32 else torch.bfloat16)
    return MixedPrecisionPolicy()


def check_recipe(recipe: Recipe) -> None:
    """One ``RecipeError`` line for what FSDP2 cannot run."""
    cfg = recipe.train
    if cfg.precision == "fp16":
        raise RecipeError("train.precision=fp16: not available with parallel.backend=fsdp2 (fp16 needs a sharded "
                          "grad scaler); use bf16")
    if cfg.ema_decay:
        raise RecipeError("train.ema_decay: not available with parallel.backend=fsdp2 (the weights are sharded); "
                          "use ddp, or drop the EMA")
    if recipe.tasks is not None and cfg.schedule == "groups":
        raise RecipeError("train.schedule=groups: not available with parallel.backend=fsdp2 (groups reduce each "
                          "task's gradients over its own ranks; FSDP2 shards every parameter over all ranks); use ddp")


def shard(task: nn.Module, recipe: Recipe, info: DistInfo) -> nn.Module:
    """``fully_shard`` the task in place: each unit of ``shard_units``, then the task as the root (every
    parameter outside a unit: embeddings, final norm, heads, loss parameters). Activation checkpointing
    (``parallel.activation_checkpointing``) recomputes each innermost unit without BatchNorm in backward;
    it keeps the parameter names, so checkpoints are the same with it or without it."""
    check_recipe(recipe)
    par = recipe.parallel
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs = dict(mesh=mesh, reshard_after_forward=par.fsdp_reshard_after_forward,
                  mp_policy=mixed_precision(recipe.train.precision, info.device, par.fsdp_reduce_fp32))
    if par.fsdp_cpu_offload:
        if info.device.type == "cuda":
            kwargs["offload_policy"] = CPUOffloadPolicy()
        else:
            log.warning("parallel.fsdp_cpu_offload: ignored on CPU (the shards are in CPU memory already)")
    # fully_shard splits tensors along dim 0: 0-d parameters (CLIP's logit scale) stay whole on every rank,
    # their gradients averaged by FSDPEngine.step
    scalars = {p for p in task.parameters() if p.ndim == 0}
    if scalars:
        kwargs["ignored_params"] = scalars
    units = shard_units(task)
    if par.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        names, skipped = [n for n, _ in units], []
        for name, module in units:
            if any(other.startswith(name + ".") for other in names):  # innermost units only
                continue
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
                skipped.append(name)  # the recomputation would update its running statistics a second time
                continue
            checkpoint(module)
        if skipped:
            log.warning("parallel.activation_checkpointing: not applied to %d unit(s) with BatchNorm (%s): "
                        "recomputing them would count their batch statistics twice", len(skipped), ", ".join(skipped))
    for _, module in units:
        fully_shard(module, **kwargs)
    fully_shard(task, **kwargs)
    log.info("fsdp2: %d unit(s) + the root sharded over %d rank(s)%s", len(units), info.world_size,
             ", activation checkpointing" if par.activation_checkpointing else "")
    return task


def _fsdp_modules(task: nn.Module) -> list[FSDPModule]:
    return [m for m in task.modules() if isinstance(m, FSDPModule)]


def _broadcast_buffers(task: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP keeps them: FSDP2 shards parameters
    only, and each rank's statistics follow its own batches."""
    if not dist.is_initialized():
        return
    for b in task.buffers():
        if isinstance(b, DTensor):
            continue
        if b.is_floating_point() or b.dtype in (torch.int64, torch.int32):
            dist.broadcast(b.data, src=0)


class FSDPEngine(Engine):
    """The loop's engine for a task ``shard`` has sharded: the backward reduce-scatters gradients into the
    shards (every micro-batch: the gradients never exist unsharded for the whole model), clipping measures
    the norm over all shards, the optimizer steps the shards."""

    def __init__(self, task: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, parallel, train, groups=None):
        super().__init__(task, optimizer, info, parallel, train, groups=groups)
        self._raf = parallel.fsdp_reshard_after_forward

    def step(self, clip: float | None, skip: bool) -> float | None:
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        whole = [p.grad for p in params if not isinstance(p, DTensor)]  # 0-d parameters left out of the shards
        if whole and dist.is_initialized():
            flat = torch._utils._flatten_dense_tensors(whole)
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for g, v in zip(whole, torch._utils._unflatten_dense_tensors(flat, whole)):
                g.copy_(v)
        sharded = [p for p in params if isinstance(p.grad, DTensor)]
        whole_params = [p for p in params if not isinstance(p.grad, DTensor)]
        total = _total_norm([p.grad for p in sharded], [p.grad for p in whole_params])
        norm = float(total)
        if clip and math.isfinite(norm):  # as clip_grad_norm_ does for the other backends, on the shards
            for group in (sharded, whole_params):
                if group:
                    nn.utils.clip_grads_with_norm_(group, clip, total)
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else None

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every parameter gathered on every rank and kept so (no collective in a forward) while evaluating:
        ranks may see different numbers of evaluation batches. Costs one full copy of the weights."""
        _broadcast_buffers(self.module)
        mods = _fsdp_modules(self.module)
        for m in mods:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in mods:
                m.reshard()
                m.set_reshard_after_forward(self._raf, recurse=False)

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The task's full weights on rank 0, in CPU memory (collective); None elsewhere."""
        _broadcast_buffers(self.module)
        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.info.is_main else None

    def save_sharded(self, directory: Path) -> None:
        """Every rank writes its shards of the weights and optimizer state to ``directory/dcp`` (collective)."""
        dcp.save({"model": get_model_state_dict(self.module), "optim": get_optimizer_state_dict(self.module, self.optimizer)},
                 checkpoint_id=str(directory / DCP_DIR))

    def weights_digest(self) -> str:
        """sha256 of the full parameters and buffers (gathered: every rank hashes the same bytes)."""
        _broadcast_buffers(self.module)
        h = hashlib.sha256()
        for t in [*self.module.parameters(), *self.module.buffers()]:
            full = t.full_tensor() if isinstance(t, DTensor) else t
            h.update(full.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _total_norm(sharded: list[Tensor], whole: list[Tensor]) -> Tensor:
    """The 2-norm of the full gradient (collective) as ``clip_grad_norm_`` computes it: the norm of the
    per-tensor norms in fp32, a sharded tensor's norm reduced over its shards; whole tensors (the same on every
    rank) counted once."""
    norms = []
    if sharded:
        n = nn.utils.get_total_norm(sharded, 2.0)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if whole:
        norms.append(nn.utils.get_total_norm(whole, 2.0))
    if not norms:
        return torch.zeros(())
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def load_sharded(task: nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """An FSDP2 checkpoint's shards into this FSDP2 task and optimizer, at any world size: DCP reads each
    rank's part of every tensor, whatever the sharding that wrote them."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = {"model": get_model_state_dict(task), "optim": get_optimizer_state_dict(task, optimizer)}
    dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR))
    set_model_state_dict(task, state["model"])
    set_optimizer_state_dict(task, optimizer, state["optim"])
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)


def load_full_optimizer(task: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """A full optimizer state keyed by parameter name (every rank holds it) into this FSDP2 optimizer:
    each rank keeps its shard."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    set_optimizer_state_dict(task, optimizer, full, options=StateDictOptions(full_state_dict=True))
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)


def read_full(ckpt: Path, key: str = "optim") -> dict:
    """``dcp/``'s ``key`` as one full (unsharded) state dict in this process, without a process group."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=dcp.FileSystemReader(str(ckpt / DCP_DIR)),
                     planner=_EmptyStateDictLoadPlanner(keys={key}), no_dist=True)
    return sd[key]


__all__ = ["DCP_DIR", "FSDPEngine", "check_recipe", "load_full_optimizer", "load_sharded", "mixed_precision",
           "read_full", "shard", "shard_units"]
