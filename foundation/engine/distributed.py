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
from datetime import timedelta
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
    backend: str  # single | ddp | deepspeed | fsdp2

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
    (``parallel.backend``): then it gets a one-process group, launcher variables or not. Joining the
    group and every collective fail after ``parallel.timeout_s`` instead of waiting for ever on a dead rank.
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
    timeout = timedelta(seconds=cfg.timeout_s)
    elastic = {}
    if backend != "single" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's c10d rendezvous store outlives a restart: keyed by attempt, a restarted rank never
        # reads a dead rank's gloo/nccl address (it would fail to connect, or wait for it for ever)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        elastic = dict(store=dist.PrefixStore(f"foundation/attempt_{attempt}/", store), rank=rank, world_size=world_size)
    if backend != "single" and world_size == 1 and not elastic and not dist.is_initialized():
        # one process (DDP / FSDP2 / DeepSpeed forced without a launcher): an in-memory store, so there is no
        # TCP port to pick and lose to another process before it is bound (EADDRINUSE, seen in CI)
        dist.init_process_group(pg_backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=dev if use_cuda else None, timeout=timeout)
    if (backend in ("ddp", "fsdp2") or elastic) and not dist.is_initialized():
        dist.init_process_group(pg_backend, device_id=dev if use_cuda else None, timeout=timeout, **elastic)
    if backend == "deepspeed":
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend=pg_backend, timeout=timeout)  # takes up a group opened above
    return DistInfo(rank, world_size, local_rank, dev, backend)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_distributed() -> None:
    from foundation.engine.collectives import use_group

    use_group(None)
    if dist.is_initialized():
        dist.destroy_process_group()
    _forget_deepspeed_groups()


def _broadcast_scalars_too() -> None:
    """DeepSpeed's engine broadcasts rank 0's parameters at start as ``p.data.view(torch.uint8)``, which a
    0-dim parameter (CLIP's ``logit_scale``) cannot do: "self.dim() cannot be 0 to view Float as Byte", and
    every CLIP run on more than one DeepSpeed rank stopped there. Such parameters are broadcast as 1-element
    tensors and given back their shape before ZeRO sees them."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    real = DeepSpeedEngine._broadcast_model
    if getattr(real, "_foundation", False):
        return

    def broadcast_model(self):
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            real(self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    broadcast_model._foundation = True
    DeepSpeedEngine._broadcast_model = broadcast_model


def _forget_deepspeed_groups() -> None:
    """DeepSpeed keeps the process group it found, and groups made from it, in module globals; a second run in
    the same process (a sweep, a test) would use them after ``destroy_process_group`` and wait for ever."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                     "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "mesh_device"):
            if hasattr(groups, name):
                setattr(groups, name, None)
        for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                     "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
            if isinstance(getattr(groups, name, None), dict):
                getattr(groups, name).clear()
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None


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
        parallel: ParallelConfig, train: TrainConfig, groups: TaskGroups | None = None,
    ):
        self.info = info
        self.groups = groups  # train.schedule groups: gradients reduced by TaskGroups, not DDP
        self.module = task  # unwrapped: what checkpoints and evaluations see
        self.optimizer = optimizer
        self.precision = train.precision
        self.scaler: torch.amp.GradScaler | None = None
        self._synced = True  # the current micro-batch's backward all-reduces (DDP)
        self.ds_config: dict | None = None
        if train.precision == "fp16" and info.device.type != "cuda":
            raise RuntimeError("train.precision=fp16 needs a CUDA device; use bf16 (or fp32) on CPU")
        if info.backend == "deepspeed":
            import deepspeed

            self.ds_config = deepspeed_config(parallel, train, info.world_size)
            _broadcast_scalars_too()
            self.wrapped, self.ds_optimizer, _, _ = deepspeed.initialize(
                model=task, optimizer=optimizer, config=self.ds_config
            )
        elif info.backend == "ddp" and groups is None:
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
        self._synced = last
        if self._ddp and not last:
            with self.wrapped.no_sync():
                yield
        else:
            yield

    @property
    def _ddp(self) -> bool:
        return self.info.backend == "ddp" and self.groups is None

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
            if self.wrapped.is_gradient_accumulation_boundary() and self.ds_config["zero_optimization"]["stage"] == 0:
                # ZeRO-0 with a torch optimizer in fp32 reports no norm, and step() zeroes the gradients:
                # measure the (all-reduced, unclipped) gradients here, for step() to return
                grads = [p.grad.detach().double().pow(2).sum() for p in self.module.parameters() if p.grad is not None]
                self._ds_norm = float(torch.stack(grads).sum().sqrt()) if grads else None
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
        if self._ddp and self._synced and not self.wrapped.find_unused_parameters:
            # (find_unused_parameters: DDP itself all-reduces the accumulated gradients of the parameters
            # this backward does not reach; touching them as well would mark them ready twice)
            touch = _touch_accumulated(self.module)
            loss = loss if touch is None else loss + touch
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, clip: float | None, skip: bool) -> float | None:
        """Clip and apply the accumulated gradients; ``skip`` discards them. Returns the grad norm,
        or None when the step was not applied (skipped, or non-finite gradients)."""
        if self.is_deepspeed:
            # The optimizer already stepped inside backward() at the accumulation boundary.
            norm = self.wrapped.get_global_grad_norm()
            if norm is None:
                norm, self._ds_norm = getattr(self, "_ds_norm", None), None
            return None if skip or norm is None or not math.isfinite(float(norm)) else float(norm)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
            if self.groups is not None:  # overflow decided on each rank's own gradients: agree before stepping
                agree_found_inf(self.scaler, self.optimizer)
        if self.groups is not None:
            norm = self.groups.sync_grads(self.module, clip)
        else:
            norm = float(nn.utils.clip_grad_norm_(params, clip if clip else math.inf))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself on inf/NaN gradients
            self.scaler.update()
        elif math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else None

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank (collective), as DDP's next forward would
        broadcast them: the checkpoint holds rank 0's. Not with ``parallel.broadcast_buffers: false``, whose
        ranks keep their own (and ``weights_digest`` says they differ), nor under ``groups``, whose
        ``broadcast_task_params`` does it task by task."""
        if not dist.is_initialized() or self.groups is not None or self.info.backend not in ("ddp", "deepspeed"):
            return
        if self.info.backend == "ddp" and not self.wrapped.broadcast_buffers:
            return
        buffers = [b for b in self.module.buffers()]
        if buffers:
            comm = self._comm_device()
            for b in buffers:
                out = b.detach().to(comm)
                dist.broadcast(out, src=0)
                b.copy_(out.to(b.device))

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


def agree_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, group=None) -> bool:
    """After ``scaler.unscale_(optimizer)``: an overflow found on any rank counts on every rank (collective).
    ``unscale_`` looks for inf/NaN in this rank's gradients only. Under DDP they are already all-reduced, so
    the ranks agree; under ``train.schedule: groups`` they are not yet (each group's head, and the shared
    part before ``sync_grads``), and a rank that saw no overflow would step while the others skip, and the
    scales drift apart. Returns whether the step is skipped."""
    state = scaler._per_optimizer_states[id(optimizer)]
    found = state["found_inf_per_device"]
    flag = torch.tensor([float(sum(float(v.item()) for v in found.values()) > 0)])
    if dist.is_available() and dist.is_initialized():
        comm = flag.cuda() if dist.get_backend(group) == "nccl" else flag
        dist.all_reduce(comm, op=dist.ReduceOp.MAX, group=group)
        flag = comm.cpu()
    skip = bool(flag.item() > 0)
    for v in found.values():
        v.fill_(1.0 if skip else 0.0)
    return skip


def _touch_accumulated(module: nn.Module) -> Tensor | None:
    """An exact zero that depends on every parameter holding a gradient from this step's earlier (no_sync)
    micro-batches. DDP all-reduces a parameter's gradient when the synced backward reaches it, and waits
    for every parameter it expects: a multi-task step runs each task as its own micro-batch (one task's
    activations alive at a time), so the synced backward is the last task's, which never reaches the other
    tasks' heads — the reduction would never finish ("Expected to have finished reduction in the prior
    iteration"). Through this term the synced backward reaches them: their accumulated gradient plus 0 is
    all-reduced, the gradient one process gets."""
    pending = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
    if not pending:  # nothing accumulated (grad_accum 1, one task): the loss alone, bit for bit
        return None
    return torch.cat([p.reshape(-1)[:1].float() for p in pending]).sum() * 0.0


# --------------------------------------------------------------------------------------------------
# train.schedule: groups (UniHCP): each group of ranks owns one task


class TaskGroups:
    """Contiguous blocks of ranks, one per task, sized by the tasks' shares of the world.

    Gradients of shared parameters (everything outside ``tasks.<name>.``) are averaged over all ranks,
    those of a task's parameters within its group only; with each task's loss scaled by
    ``weight * world / group size`` (``MultiTask``'s scales) the result is ``mix``'s gradient. Ranks keep
    only their own task's head current; ``broadcast_task_params`` brings every head from its group to
    every rank before evaluation and saving, and ``optimizer_state`` collects every head's optimizer
    state, so one checkpoint holds every task.
    """

    def __init__(self, shares: dict[str, float], world_size: int, rank: int):
        from foundation.config import RecipeError

        sizes = {name: share * world_size for name, share in shares.items()}
        if any(abs(n - round(n)) > 1e-6 or round(n) < 1 for n in sizes.values()):
            raise RecipeError(f"tasks.*.share: {shares} cannot split {world_size} rank(s) into whole groups of at "
                              "least one rank each; choose shares that are multiples of 1/world_size")
        self.ranks: dict[str, list[int]] = {}
        start = 0
        for name, n in sizes.items():
            self.ranks[name] = list(range(start, start + round(n)))
            start += round(n)
        self.task = next(name for name, ranks in self.ranks.items() if rank in ranks)
        self.group_rank = self.ranks[self.task].index(rank)
        self.world_size = world_size
        # every rank takes part in creating every group, in the same order
        groups = {name: dist.new_group(ranks) for name, ranks in self.ranks.items()} if dist.is_initialized() else {}
        self._group = groups.get(self.task)
        if self._group is not None:  # a contrastive loss (CLIP) gathers over its task's ranks only
            from foundation.engine.collectives import use_group

            use_group(self._group)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(ranks) for name, ranks in self.ranks.items()}

    @staticmethod
    def check_shared(module: nn.Module) -> None:
        """Refuse BatchNorm in the shared part (outside ``tasks.<name>.``): each group would normalise its
        task's batches by their own statistics and move its own running statistics, so the shared model
        would differ between groups and from ``mix``'s; no synchronisation after the fact restores that."""
        from foundation.config import RecipeError

        found = [n for n, m in module.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not n.startswith("tasks.")]
        if found:
            raise RecipeError(
                f"train.schedule: groups cannot train a shared part with BatchNorm ({len(found)} layer(s), e.g. "
                f"{found[0]}): each group of ranks would normalise with its own task's statistics and the running "
                "statistics would drift apart between ranks; use a backbone with LayerNorm/GroupNorm, or "
                "train.schedule=mix")

    @property
    def group_size(self) -> int:
        return len(self.ranks[self.task])

    def _split(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        shared, own = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if not name.startswith("tasks."):
                shared.append(p)
            elif name.startswith(f"tasks.{self.task}."):
                own.append(p)
        return shared, own

    def sync_grads(self, module: nn.Module, clip: float | None) -> float:
        """Average gradients (shared: all ranks; own task: its group), clip by the norm over every
        parameter of every task, as one process running ``mix`` would; returns that norm."""
        shared, own = self._split(module)
        for p in shared:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        own = [p for p in own if p.grad is not None]  # unused by this task's forward on every rank of the group
        for params, group in ((shared, None), (own, self._group)):
            if not params or not dist.is_initialized():
                continue
            flat = torch._utils._flatten_dense_tensors([p.grad for p in params])
            dist.all_reduce(flat, group=group)
            flat /= self.world_size
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in params])):
                p.grad.copy_(g)
        sq_shared = sum(float(p.grad.double().pow(2).sum()) for p in shared)
        sq_own = torch.tensor([sum(float(p.grad.double().pow(2).sum()) for p in own) / self.group_size],
                              dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(sq_own)
        norm = math.sqrt(sq_shared + float(sq_own.item()))
        if clip and math.isfinite(norm):
            coef = min(clip / (norm + 1e-6), 1.0)
            for p in shared + own:
                p.grad.mul_(coef)
        return norm

    def broadcast_task_params(self, module: nn.Module) -> None:
        """Every task's parameters and buffers from its group's first rank to all ranks, and the shared
        part's floating-point buffers from rank 0 (no BatchNorm there: ``check_shared``; what is left is
        constant or counted alike on every rank, and the checkpoint holds rank 0's)."""
        if not dist.is_initialized():
            return
        shared = [t for n, t in module.named_buffers() if not n.startswith("tasks.") and t.is_floating_point()]
        if shared:
            flat = torch._utils._flatten_dense_tensors([t.data for t in shared])
            dist.broadcast(flat, src=0)
            for t, v in zip(shared, torch._utils._unflatten_dense_tensors(flat, [t.data for t in shared])):
                t.data.copy_(v)
        for name, ranks in self.ranks.items():
            tensors = [t for n, t in list(module.named_parameters()) + list(module.named_buffers())
                       if n.startswith(f"tasks.{name}.") and t.is_floating_point()]
            if not tensors:
                continue
            flat = torch._utils._flatten_dense_tensors([t.data for t in tensors])
            dist.broadcast(flat, src=ranks[0])
            for t, v in zip(tensors, torch._utils._unflatten_dense_tensors(flat, [t.data for t in tensors])):
                t.data.copy_(v)

    def optimizer_state(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer state with every task's entries taken from that task's group (collective)."""
        state = optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        own = {index[id(p)] for n, p in module.named_parameters() if n.startswith(f"tasks.{self.task}.") and id(p) in index}
        mine = {i: v for i, v in state["state"].items() if i in own} if self.group_rank == 0 else {}
        for theirs in gather_objects(mine):
            state["state"].update(theirs)
        return state
