"""Checkpoints: atomic directories, safetensors weights, a pickle-free state file, exact resume.

Layout of ``runs/<name>/checkpoints/step_<N>/``::

    model.safetensors   the model's weights as the model names them (timm can load this file); a multi-task
                        run's shared backbone (backbone.*) and every task's head (tasks.<name>.*)
    task.safetensors    other tensors the task owns (loss heads, queues), when there are any
    ema.safetensors     the EMA of the model's weights (train.ema_decay)
    state.pt            optimizer, scheduler, scaler, per-rank RNG and data positions, step, counters;
                        plain tensors and containers only: loaded with torch.load(weights_only=True)
    recipe.yaml         the resolved recipe
    deepspeed/          DeepSpeed's own files (DeepSpeed runs only)

A checkpoint is written under a temporary name and renamed when complete, so a killed writer leaves
the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from foundation.engine.distributed import barrier, broadcast_object

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# RNG states as plain tensors (so they survive weights_only loading)


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / Python RNG states, in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# finding and reading


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.pt").is_file()]


def find_latest(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def load_state(path: str | Path) -> dict[str, Any]:
    """``state.pt`` of a checkpoint directory, refusing anything that needs code execution to load."""
    file = Path(path) / "state.pt" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no state file; is {Path(path)} a checkpoint directory (step_<N>)?")
    return safe_torch_load(file)


def safe_torch_load(file: Path) -> Any:
    """``torch.load`` of plain tensors and containers only (``weights_only=True``); refuses pickled code."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refused: loading it would execute pickled code ({str(e).splitlines()[0]}). "
            "Only checkpoints of plain tensors and containers are loaded; re-save it from trusted code "
            "with tensors, numbers, strings, lists and dicts only."
        ) from None


def read_tensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


@dataclass
class LoadReport:
    """What a (possibly partial) weight load did: shown to the user, so nothing is silent."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: left as initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored
    mismatched: list[str] = field(default_factory=list)  # same name, other shape: left as initialised

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{name} {len(keys)}: {', '.join(keys[:5])}{more}")
        return "; ".join(parts)


def load_weights(module: nn.Module, tensors: dict[str, Tensor], strict: bool = True) -> LoadReport:
    """Copy ``tensors`` into ``module``. ``strict`` fails on any missing, unexpected or mismatched key."""
    own = module.state_dict()
    report = LoadReport()
    usable = {}
    for k, v in tensors.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.mismatched.append(f"{k} {tuple(v.shape)}→{tuple(own[k].shape)}")
        else:
            usable[k] = v
            report.loaded.append(k)
    report.missing = [k for k in own if k not in tensors]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointError(
            "checkpoint does not match the model: " + report.summary()
            + ". Check model.backbone and its size overrides against the checkpoint's recipe.yaml."
        )
    module.load_state_dict(usable, strict=False)
    return report


def load_task_weights(task: nn.Module, path: Path, strict: bool = True) -> LoadReport:
    """Load ``model.safetensors`` (+ ``task.safetensors``) of a checkpoint into a task."""
    prefix = getattr(task, "model_prefix", "model.")
    tensors = {f"{prefix}{k}": v for k, v in read_tensors(path / "model.safetensors").items()}
    if (path / "task.safetensors").is_file():
        tensors.update(read_tensors(path / "task.safetensors"))
    return load_weights(task, tensors, strict=strict)


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint directory (``step_N``), or a run directory's newest checkpoint."""
    path = Path(checkpoint)
    if not (path / "model.safetensors").is_file():
        latest = find_latest(path / "checkpoints") or find_latest(path)
        if latest is None:
            raise CheckpointError(f"{path}: neither a checkpoint directory nor a run directory with checkpoints")
        path = latest
    return path


def load_task(checkpoint: str | Path, ema: bool = False):
    """The whole task module of a checkpoint (every head of a multi-task run) with its weights, the
    checkpoint directory and the recipe."""
    from foundation.config import load_recipe
    from foundation.tasks import build_task, network

    path = resolve_checkpoint(checkpoint)
    recipe = load_recipe(path / "recipe.yaml")
    task = build_task(recipe)
    load_task_weights(task, path)
    if ema:
        if not (path / "ema.safetensors").is_file():
            raise CheckpointError(f"{path}: no ema.safetensors (the run had no train.ema_decay)")
        load_weights(network(task), read_tensors(path / "ema.safetensors"))
    return task, path, recipe


def load_model(checkpoint: str | Path, device: str = "cpu", ema: bool = False, task: str | None = None):
    """The trained model of a checkpoint (or a run directory: its newest checkpoint) in eval mode,
    and the recipe it was trained with; ``ema`` takes the EMA weights. A multi-task run serves one task
    at a time: ``task`` names it, and the recipe returned is that task's (``task_recipe``). Evaluation
    and quantization start here."""
    from foundation.config import task_recipe

    whole, path, recipe = load_task(checkpoint, ema)
    if recipe.tasks is None:
        if task is not None and task != recipe.task.name:
            raise CheckpointError(f"--task {task!r}: {path} is a single-task run (task {recipe.task.name!r})")
        return whole.model.to(device).eval(), recipe
    if task is None:
        raise CheckpointError(f"{path} is a multi-task run; choose one of its tasks with --task "
                              f"({', '.join(recipe.tasks)})")
    view = task_recipe(recipe, task)
    return whole.tasks[task].model.to(device).eval(), view


# --------------------------------------------------------------------------------------------------
# writing


def _split_weights(task_state: dict[str, Tensor], prefix: str = "model.") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    # clone: safetensors refuses tensors that share memory (tied weights), and we must not hold views
    model = {k[len(prefix):]: v.detach().cpu().contiguous().clone() for k, v in task_state.items() if k.startswith(prefix)}
    rest = {k: v.detach().cpu().contiguous().clone() for k, v in task_state.items() if not k.startswith(prefix)}
    return model, rest


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(
    root: Path, step: int, task_state: dict[str, Tensor] | None, state: dict[str, Any], recipe_yaml: str,
    is_main: bool, keep_last: int, deepspeed_engine=None, extra_files: dict[str, dict[str, Tensor]] | None = None,
    model_prefix: str = "model.",
) -> Path:
    """Write ``root/step_<step>`` atomically; collective when several ranks run (call on all ranks).

    ``task_state`` is the full task state dict on rank 0 (may be None elsewhere). DeepSpeed engines
    also save their own files under ``deepspeed/`` (all ranks take part). ``extra_files`` are further
    safetensors files (e.g. ``ema.safetensors``), written by rank 0.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = Path(broadcast_object(tempfile.mkdtemp(prefix=f".step_{step}.", dir=root) if is_main else None))
    if deepspeed_engine is not None:
        deepspeed_engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
    if is_main:
        model, rest = _split_weights(task_state, model_prefix)
        save_file(model, str(tmp / "model.safetensors"))
        if rest:
            save_file(rest, str(tmp / "task.safetensors"))
        for name, tensors in (extra_files or {}).items():
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp / name))
        torch.save(state, tmp / "state.pt")
        (tmp / "recipe.yaml").write_text(recipe_yaml)
    barrier()
    if is_main:
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step (resumed before it): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step_*"):  # leftovers of killed writers
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final
