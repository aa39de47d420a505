"""Resume on another world size or backend: the optimizer state across forms, the data streams across ranks.

A checkpoint holds the optimizer state in one of two forms: ``state.pt``'s full state keyed by position in
the optimizer (single, DDP; the form torch's ``optimizer.state_dict()`` has), or FSDP2's shards in
``dcp/``. DeepSpeed's own files are a third, which only DeepSpeed reads (``check_resumable`` says so).
``load_optimizer_across`` reads either form into any of single, DDP and FSDP2, at any world size: both are
converted through the full state keyed by parameter name, so nothing is rounded or dropped.

The data streams (``data_position``): at the saved world size every rank continues its stream exactly.
At another world size, rank ``r`` continues the saved rank ``r``'s stream after its last served batch
(``r < saved world``; a new batch size is taken from the recipe), a rank that did not exist starts a
stream of its own seeded by the step (never read before), and the streams of ranks that no longer exist
end. No stream position is served twice; the order of the global batches is not the one either world
size would have had straight through. ``train.schedule: groups`` restarts its streams (the ranks' tasks
move with the world size).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from foundation.checkpoint_io import CheckpointError
from foundation.config import Recipe
from foundation.engine.distributed import DistInfo

log = logging.getLogger("foundation")

_FIXED_WITH_WORLD = ("world_size", "batch_size")  # what a continued stream may change with the world size


def param_names(task: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in its order (the order ``state_dict()`` numbers them)."""
    names = {id(p): n for n, p in task.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def by_name(saved: dict, names: list[str]) -> dict:
    """``optimizer.state_dict()`` (numbered) → the same state keyed by parameter name."""
    groups, i = [], 0
    for g in saved["param_groups"]:
        groups.append({**g, "params": [names[j] for j in g["params"]]})
        i += len(g["params"])
    if i != len(names):
        raise CheckpointError(f"the saved optimizer has {i} parameters, this recipe's {len(names)}")
    return {"state": {names[j]: v for j, v in saved["state"].items()}, "param_groups": groups}


def by_position(full: dict, names: list[str], optimizer: torch.optim.Optimizer) -> dict:
    """The state keyed by parameter name → ``optimizer.state_dict()``'s numbered form for ``optimizer``."""
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in full["state"] if n not in index]
    if missing:
        raise CheckpointError(f"the saved optimizer has state for parameters this recipe has not: {missing[:3]}")
    groups, start = [], 0
    for g, saved in zip(optimizer.param_groups, full["param_groups"]):
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return {"state": {index[n]: v for n, v in full["state"].items()}, "param_groups": groups}


def written_by_fsdp(ckpt: Path) -> bool:
    from foundation.engine.fsdp import DCP_DIR

    return (ckpt / DCP_DIR / ".metadata").is_file()


def load_optimizer_across(task: nn.Module, optimizer: torch.optim.Optimizer, state: dict, ckpt: Path,
                          backend: str) -> bool:
    """The checkpoint's optimizer state (and, FSDP2 from FSDP2, the weights' shards) when its form differs
    from this backend's, or the backend is FSDP2; False when the plain ``optimizer.load_state_dict`` path
    applies (same form). Hyperparameters stay this recipe's."""
    from foundation.engine import fsdp

    from_dcp = written_by_fsdp(ckpt)
    if backend == "fsdp2":
        if from_dcp:
            fsdp.load_sharded(task, optimizer, ckpt)
        else:
            fsdp.load_full_optimizer(task, optimizer, by_name(state["optimizer"], param_names(task, optimizer)))
        return True
    if not from_dcp:
        return False
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    full = fsdp.read_full(ckpt, "optim")
    try:
        optimizer.load_state_dict(by_position(full, param_names(task, optimizer), optimizer))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt}: its optimizer state does not fit this recipe's parameters ({e}); restore "
                              "the recipe, or start from its weights with model.init and train.resume=none") from None
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
    return True


def _continue(position: dict, world: int, batch_size: int) -> dict:
    """A saved stream position, to be continued by a loader at world size ``world`` (same rank number)."""
    old_world = position.get("world_size") or world
    out = {**position, "world_size": world, "batch_size": batch_size}
    out["samples"] = round(position.get("samples", 0) * old_world / world)  # data/epoch stays continuous
    return out


def data_position(state: dict, recipe: Recipe, info: DistInfo) -> dict | None:
    """This rank's data position to continue (see the module docstring), or None for a fresh stream."""
    saved = state["data"]
    if state["world_size"] == info.world_size:
        return saved[info.rank]
    if recipe.tasks is not None and recipe.train.schedule == "groups":
        log.warning("train.schedule=groups at a new world size (%d -> %d ranks): the data streams restart",
                    state["world_size"], info.world_size)
        return None
    if info.rank >= len(saved):
        return None
    mine = saved[info.rank]
    if recipe.tasks is None:
        return _continue(mine, info.world_size, recipe.train.batch_size)
    return {name: _continue(pos, info.world_size, recipe.tasks[name].batch_size or recipe.train.batch_size)
            for name, pos in mine.items() if name in recipe.tasks}


__all__ = ["by_name", "by_position", "data_position", "load_optimizer_across", "param_names", "written_by_fsdp"]
