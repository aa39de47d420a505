"""A trained task or model rebuilt from its checkpoint, from what the checkpoint holds and nothing else.

``load_task`` / ``load_model`` are where evaluation, export, quantization, adaptation and ``predict`` start.
The checkpoint's ``recipe.yaml`` is read through the artefact gate (``foundation.trust``): no ``base:``
include, local registered model names, allowed model kwargs only. What a model needs besides its weights
(a multi-task head's class count, a UniHCP task's vocabulary) is in that recipe, written when training
starts (``self_contained``), so a run directory works after a move with its shards gone. A distilled
student loads as the classifier it is, without its teacher.
"""

from __future__ import annotations

from pathlib import Path

from foundation.checkpoint_io import (
    CheckpointError, load_task_weights, load_weights, read_tensors, resolve_checkpoint,
)
from foundation.config import Recipe, RecipeError, TaskConfig, task_recipe, validate


def load_artefact_recipe(step: Path) -> Recipe:
    """A checkpoint's ``recipe.yaml``, gated (``foundation.trust.check_recipe``) and validated."""
    from foundation.trust import check_recipe, read_artefact_yaml

    file = Path(step) / "recipe.yaml"
    if not file.is_file():
        raise CheckpointError(f"{step}: no recipe.yaml; a checkpoint directory holds the recipe it was trained with")
    data = check_recipe(read_artefact_yaml(file), Path(step), str(file))
    return validate(data, str(file))


def _serving_recipe(recipe: Recipe) -> Recipe:
    """What is rebuilt for serving: a distilled student is a plain classifier (its teacher and projection
    only matter while it trains), everything else as trained."""
    if recipe.tasks is None and recipe.task.name == "distill":
        return recipe.model_copy(update={"task": TaskConfig(name="classification")})
    return recipe


def _build(recipe: Recipe, path: Path):
    """``build_task(recipe)`` for a recipe read from a checkpoint: sizes the gate lets through but the model
    cannot take (a negative width, heads that do not divide) are the artefact's fault, one error line."""
    from foundation.data import DataError
    from foundation.tasks import build_task

    try:
        return build_task(recipe)
    except (RecipeError, DataError, CheckpointError):
        raise
    except BUILD_ERRORS as e:
        raise does_not_build(path / "recipe.yaml", e) from None


# what building a model from sizes the gate let through can raise (a negative width, heads that do not divide)
BUILD_ERRORS = (RuntimeError, ValueError, TypeError, AssertionError, KeyError, IndexError, AttributeError,
                ArithmeticError)


def does_not_build(file: Path | str, e: BaseException) -> CheckpointError:
    """The one-line error for an artefact whose model (or quantized model) cannot be rebuilt from ``file``."""
    why = (str(e).strip().splitlines() or [""])[0][:300]
    return CheckpointError(f"{file}: its model does not build ({type(e).__name__}: {why}); the artefact is damaged "
                           "or was not written by this platform")


def load_task(checkpoint: str | Path, ema: bool = False):
    """The whole task module of a checkpoint (every head of a multi-task run) with its weights, the
    checkpoint directory and the recipe."""
    from foundation.tasks import network

    path = resolve_checkpoint(checkpoint)
    recipe = load_artefact_recipe(path)
    serving = _serving_recipe(recipe)
    task = _build(serving, path)
    if serving is recipe:
        load_task_weights(task, path)
    else:  # the student alone: model.safetensors (task.safetensors holds the training-only projection)
        load_weights(task.model, read_tensors(path / "model.safetensors"))
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


def unihcp_deploy(recipe: dict, task: str, packed: bool = False):
    """The ``UniHCPDeploy`` network of UniHCP task ``task`` of a (gated) resolved recipe, with untrained
    weights: what a UniHCP task's quantized model is rebuilt from. Its ``quant.json`` holds the checkpoint's
    resolved recipe (the task's vocabulary included), so it needs neither the checkpoint nor the shards."""
    from foundation.models.unihcp_export import deploy_task
    from foundation.tasks import build_task
    from foundation.tasks.unihcp import UniHCPTask

    recipe = validate(recipe, "quant.json arch.recipe")
    whole = build_task(recipe)  # a size that cannot build: load_quantized says so in one line
    if recipe.tasks is None:
        found = (whole, recipe.data) if recipe.task.name == task else None
    else:
        found = (whole.tasks[task], recipe.tasks[task].data) if task in recipe.tasks else None
    if found is None or not isinstance(found[0], UniHCPTask):
        raise CheckpointError(f"quant.json arch.task: {task!r} is not a UniHCP task of its recipe")
    return deploy_task(*found, packed=packed)


def self_contained(recipe: Recipe) -> Recipe:
    """``recipe`` with what its model reads from the training shards written into it, so its checkpoints
    rebuild without them: a multi-task classification head's class count (``tasks.<name>.num_classes``) and a
    UniHCP task's vocabulary (``task.unihcp.vocabulary``). Training calls it once at start; the result is
    the run's resolved ``recipe.yaml`` and builds the same model as ``recipe`` does."""
    from foundation.data.shards import class_names
    from foundation.tasks.unihcp import _human_task

    def with_vocabulary(task: TaskConfig, data) -> TaskConfig:
        if not task.name.startswith("unihcp_") or task.unihcp.vocabulary is not None or not data.human:
            return task
        unihcp = task.unihcp.model_copy(update={"vocabulary": _human_task(data)})
        return task.model_copy(update={"unihcp": unihcp})

    if recipe.tasks is None:
        return recipe.model_copy(update={"task": with_vocabulary(recipe.task, recipe.data)})
    entries = {}
    for name, entry in recipe.tasks.items():
        update: dict = {"task": with_vocabulary(entry.task, entry.data)}
        if entry.num_classes is None and entry.task.name == "classification":
            names = class_names(entry.data.train)
            if not names:
                raise RecipeError(f"tasks.{name}.num_classes: not set, and the shards' manifest names no classes")
            update["num_classes"] = len(names)
        entries[name] = entry.model_copy(update=update)
    return recipe.model_copy(update={"tasks": entries})


__all__ = ["BUILD_ERRORS", "does_not_build", "load_artefact_recipe", "load_model", "load_task", "self_contained",
           "unihcp_deploy"]
