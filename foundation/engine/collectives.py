"""All-gather with gradient: the one distributed import that loss code may use (as open_clip does)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor

_group = None  # the ranks a task's batch is spread over: every rank, or its group under train.schedule groups


def use_group(group) -> None:
    """Gather over ``group`` from now on (None: every rank). ``train.schedule: groups`` sets the group of
    ranks that trains this rank's task: a contrastive loss spans its task's batch, not other tasks' ranks."""
    global _group
    _group = group


def world() -> tuple[int, int]:
    """(rank, size) within the gathering group; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(_group), dist.get_world_size(_group)
    return 0, 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) from every rank of the group along dim 0; gradients flow back to each rank's part."""
    _, size = world()
    if size == 1:
        return x
    return torch.cat(dist_nn.all_gather(x, group=_group if _group is not None else dist.group.WORLD), dim=0)
