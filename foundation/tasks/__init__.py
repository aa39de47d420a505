"""Tasks: model + loss -> dict with "loss". Add one file and one line in TASKS.

``build_task(recipe)`` makes what a recipe trains: its one task, or a ``MultiTask`` of every entry of
``tasks:`` on one shared backbone.
"""

from __future__ import annotations

from torch import nn

from foundation.tasks.classification import ClassificationTask
from foundation.tasks.clip import ClipTask, DeclipTask
from foundation.tasks.distill import DistillTask
from foundation.tasks.multitask import MultiTask, loss_scales
from foundation.tasks.unihcp import UniHCPAttributes, UniHCPDetection, UniHCPParsing, UniHCPPose, UniHCPReID

TASKS = {
    "classification": ClassificationTask,
    "clip": ClipTask,
    "declip": DeclipTask,
    "distill": DistillTask,
    "unihcp_pose": UniHCPPose,
    "unihcp_parsing": UniHCPParsing,
    "unihcp_attributes": UniHCPAttributes,
    "unihcp_reid": UniHCPReID,
    "unihcp_detection": UniHCPDetection,
}


def build_task(recipe, group_sizes: dict[str, int] | None = None, world_size: int = 1) -> nn.Module:
    """The task module of a ``Recipe``. ``group_sizes`` (ranks per task) for ``train.schedule: groups``."""
    from foundation.config import RecipeError, lookup

    if recipe.tasks is None:
        return lookup(TASKS, recipe.task.name, "task.name").build(recipe.model, recipe.task, recipe.data)
    from foundation.data.shards import class_names
    from foundation.models.factory import create_backbone

    chans = {entry.data.in_chans for entry in recipe.tasks.values()}
    if len(chans) > 1:
        raise RecipeError(f"tasks.*.data.in_chans: the shared backbone takes one channel count, the tasks ask for {sorted(chans)}")
    if recipe.model.dual_encoder.vision_open_clip:
        raise RecipeError("model.dual_encoder.vision_open_clip: a multi-task run's vision tower is the shared "
                          "model.backbone; leave vision_open_clip unset")
    backbone = create_backbone(recipe.model.model_copy(update={"num_classes": 0}), in_chans=chans.pop())
    tasks, shared = {}, {}
    for name, entry in recipe.tasks.items():
        cls = lookup(TASKS, entry.task.name, f"tasks.{name}.task.name")
        # parts several tasks share besides the backbone (UniHCP's decoder): built once, by the first task asking
        parts = getattr(cls, "shared_parts", None)
        kwargs = {}
        if parts is not None:
            for key, factory in parts(recipe.model, backbone).items():
                if key not in shared:
                    shared[key] = factory()
            kwargs["shared"] = shared
        num_classes = entry.num_classes
        if num_classes is None and cls is ClassificationTask:
            names = class_names(entry.data.train)
            if not names:
                raise RecipeError(f"tasks.{name}.num_classes: not set, and the shards' manifest names no classes")
            num_classes = len(names)
        model = recipe.model.model_copy(update={"num_classes": num_classes or 0})
        tasks[name] = cls.build(model, entry.task, entry.data, backbone=backbone, **kwargs)
    weights = {name: entry.loss_weight for name, entry in recipe.tasks.items()}
    scales = loss_scales(weights, recipe.train.schedule, group_sizes, world_size)
    return MultiTask(backbone, tasks, scales, shared)


def network(task: nn.Module) -> nn.Module:
    """The trained network of a task (what EMA copies and compile compiles): a single task's ``model``
    (its loss-side modules excluded), or the whole ``MultiTask`` (shared backbone and every head)."""
    return task if isinstance(task, MultiTask) else task.model


__all__ = ["TASKS", "MultiTask", "build_task", "network"]
