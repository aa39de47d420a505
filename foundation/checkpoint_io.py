"""Reading checkpoints and weight files: the one place that opens them.

Below the tasks and models that use it (it imports only ``foundation.config`` and ``foundation.trust``), so
a task (a distillation teacher), a model (the INTERN generalist's experts) and the engine (resume,
``model.init``) all read weights the same way. Saving and resuming a run stay in ``engine/checkpoint.py``;
rebuilding a trained task from a checkpoint is ``foundation.artefacts``.

Everything here reads data, never code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

_STEP_DIR = re.compile(r"^step_(\d+)$")
# wrappers other libraries put around a state dict (timm/open_clip training scripts, DDP, DeepSpeed, Lightning)
STATE_DICT_WRAPPERS = ("state_dict", "model", "module", "model_state")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# finding


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.pt").is_file()]


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (a ``checkpoints/`` directory), or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def resolve_checkpoint(checkpoint: str | Path, what: str = "") -> Path:
    """A checkpoint directory (``step_N``), or a run directory's newest checkpoint. ``what`` names the
    option that gave the path (``model.init.path``), for the error message."""
    path = Path(checkpoint).expanduser()
    if (path / "model.safetensors").is_file():
        return path
    latest = find_latest(path / "checkpoints") or find_latest(path)
    if latest is None:
        raise CheckpointError(f"{what + ': ' if what else ''}{path}: neither a checkpoint directory (step_N) nor a "
                              "run directory with checkpoints")
    return latest


# --------------------------------------------------------------------------------------------------
# reading files


def read_tensors(file: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors (no code can run)."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def safe_torch_load(file: Path) -> Any:
    """``torch.load`` of plain tensors and containers only (``weights_only=True``); refuses pickled code."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: the refusal says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refused: loading it would execute pickled code ({str(e).splitlines()[0]}). "
            "Only checkpoints of plain tensors and containers are loaded; re-save it from trusted code "
            "with tensors, numbers, strings, lists and dicts only."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # truncated or not a torch file
        raise CheckpointError(f"{file}: unreadable torch file ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """``state.pt`` of a checkpoint directory, refusing anything that needs code execution to load."""
    file = Path(path) / "state.pt" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no state file; is {Path(path)} a checkpoint directory (step_<N>)?")
    return safe_torch_load(file)


def unwrap_state_dict(obj: Any, source: Path | str) -> dict[str, Tensor]:
    """The tensor mapping inside another library's checkpoint: wrappers (``STATE_DICT_WRAPPERS``) and DDP's
    ``module.`` prefix removed."""
    for key in STATE_DICT_WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: holds no mapping of tensor names to tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(file: Path) -> dict[str, Tensor]:
    """Weights from a .safetensors file, or a torch file (.pth/.pt/.bin) loaded with ``weights_only=True``."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise CheckpointError(f"weights file not found: {file}")
    if file.suffix == ".safetensors":
        return read_tensors(file)
    return unwrap_state_dict(safe_torch_load(file), file)


def read_raw_recipe(step: Path) -> dict:
    """A checkpoint's ``recipe.yaml`` as plain data ({} when there is none), through the artefact gate
    (``read_artefact_yaml``: no ``base:`` include; ``check_recipe``: local model names, allowed kwargs), even
    where only its task layout is read (``model.init`` from a run): a crafted run is refused the same way by
    every command that reads it."""
    from foundation.trust import check_recipe, read_artefact_yaml

    file = Path(step) / "recipe.yaml"
    return check_recipe(read_artefact_yaml(file), Path(step), str(file)) if file.is_file() else {}


def platform_tensors(step: Path, part: str) -> dict[str, Tensor]:
    """A platform checkpoint's tensors: ``part: all`` as the task names them; ``part: backbone`` the
    backbone alone, named as the backbone names its weights."""
    recipe = read_raw_recipe(step)
    model = read_tensors(step / "model.safetensors")
    multi = bool(recipe.get("tasks"))
    if part == "all":
        prefix = "" if multi else "model."
        tensors = {prefix + k: v for k, v in model.items()}
        if (step / "task.safetensors").is_file():
            tensors.update(read_tensors(step / "task.safetensors"))
        return tensors
    task_name = (recipe.get("task") or {}).get("name", "classification")
    inner = "backbone." if multi else ("visual." if task_name in ("clip", "declip") else "")
    return {k[len(inner):]: v for k, v in model.items() if k.startswith(inner)}


def source_tensors(path: str | Path, part: str, what: str = "model.init.path") -> dict[str, Tensor]:
    """The tensors offered by ``path``: a run or step directory, a safetensors file, or a timm / open_clip
    checkpoint (``weights_only`` load, wrappers removed). ``part: backbone`` keeps a platform checkpoint's
    backbone only (a file that is not a platform checkpoint is taken as it is)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return platform_tensors(resolve_checkpoint(p, what), part)
    if not p.is_file():
        raise CheckpointError(f"{what}: {p} does not exist")
    return read_state_dict(p)


# --------------------------------------------------------------------------------------------------
# loading into modules


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


__all__ = ["CheckpointError", "LoadReport", "checkpoint_dirs", "find_latest", "load_state", "load_task_weights",
           "load_weights", "platform_tensors", "read_raw_recipe", "read_state_dict", "read_tensors",
           "resolve_checkpoint", "safe_torch_load", "source_tensors", "unwrap_state_dict"]
