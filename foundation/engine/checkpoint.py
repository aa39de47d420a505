"""Checkpoints: atomic directories, safetensors weights, a pickle-free state file, exact resume.

Layout of ``runs/<name>/checkpoints/step_<N>/``::

    model.safetensors   the model's weights as the model names them (timm can load this file); a multi-task
                        run's shared backbone (backbone.*) and every task's head (tasks.<name>.*)
    task.safetensors    other tensors the task owns (loss heads, queues), when there are any
    ema.safetensors     the EMA of the model's weights (train.ema_decay)
    state.pt            optimizer, scheduler, scaler, per-rank RNG and data positions, step, counters;
                        plain tensors and containers only: loaded with torch.load(weights_only=True)
    recipe.yaml         the resolved recipe
    hf_text_model/      a Hugging Face text tower's config and tokenizer files, named relative in recipe.yaml
    deepspeed/          DeepSpeed's own files (DeepSpeed runs only)
    dcp/                the weights' and optimizer's shards (FSDP2 runs only; torch.distributed.checkpoint)

A checkpoint is written under a temporary name and renamed when complete, so a killed writer leaves
the previous checkpoint as the newest complete one. This module writes and resumes; reading a checkpoint
is ``foundation.checkpoint_io`` (files) and ``foundation.artefacts`` (a trained task or model).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

# Reading lives below the tasks and models that use it (foundation.checkpoint_io) and rebuilding a trained
# task in foundation.artefacts; the names are re-exported here because resume and the engine use them.
from foundation.artefacts import load_model, load_task
from foundation.checkpoint_io import (
    CheckpointError, LoadReport, checkpoint_dirs, find_latest, load_state, load_task_weights, load_weights,
    read_tensors, resolve_checkpoint, safe_torch_load,
)
from foundation.engine.distributed import barrier, broadcast_object
from foundation.trust import bundle_text_tower


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
    model_prefix: str = "model.", sharded_writer: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically; collective when several ranks run (call on all ranks).

    ``task_state`` is the full task state dict on rank 0 (may be None elsewhere). DeepSpeed engines
    also save their own files under ``deepspeed/`` (all ranks take part). ``extra_files`` are further
    safetensors files (e.g. ``ema.safetensors``), written by rank 0. ``sharded_writer(tmp)`` is called on
    every rank to add its shards (FSDP2's ``dcp/``) before the directory is renamed into place.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = Path(broadcast_object(tempfile.mkdtemp(prefix=f".step_{step}.", dir=root) if is_main else None))
    if deepspeed_engine is not None:
        deepspeed_engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
    if sharded_writer is not None:
        sharded_writer(tmp)
    if is_main:
        model, rest = _split_weights(task_state, model_prefix)
        save_file(model, str(tmp / "model.safetensors"))
        if rest:
            save_file(rest, str(tmp / "task.safetensors"))
        for name, tensors in (extra_files or {}).items():
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp / name))
        torch.save(state, tmp / "state.pt")
        # a Hugging Face text tower's config and tokenizer files go with each checkpoint (foundation.trust)
        (tmp / "recipe.yaml").write_text(bundle_text_tower(recipe_yaml, tmp))
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


__all__ = ["CheckpointError", "LoadReport", "checkpoint_dirs", "find_latest", "load_model", "load_state", "load_task",
           "load_task_weights", "load_weights", "read_tensors", "resolve_checkpoint", "rng_state", "safe_torch_load",
           "save_checkpoint", "set_rng_state"]
