"""All-gather with gradient: the one distributed import that loss code may use (as open_clip does)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0; gradients flow back to each rank's part."""
    _, size = world()
    if size == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)
