"""Several tasks on one shared backbone (UniHCP, INTERN's amateur stage).

``MultiTask`` owns the backbone once; each task (a head and its loss, built by the task's own class with
``backbone=``) reaches it through a ``SharedBackbone`` reference; a task class may also declare
``shared_parts(model_cfg, backbone) -> {key: factory}`` for further modules every task of that kind
shares (built once, kept in ``MultiTask.shared``, passed to ``build`` as ``shared=``). ``forward`` takes ``{task name: batch}``
(every task under ``mix``, one under ``sample`` and ``groups``) and returns the scaled sum of the task
losses as ``loss`` plus every task's terms as ``<task>/<term>``.
"""

from __future__ import annotations

from torch import Tensor, nn


class MultiTask(nn.Module):
    """Shared backbone + one task per name. ``scales[name]`` multiplies that task's loss: its normalised
    weight under ``mix``, 1 under ``sample`` (the draw already follows the weights), and
    ``weight * world_size / group_size`` under ``groups`` (so averaging gradients over all ranks gives
    ``mix``'s gradient)."""

    backbone_name = "backbone"  # the submodule model.init (part: backbone) and layer decay treat as the backbone
    model_prefix = ""  # checkpoints: every tensor (backbone and heads) goes to model.safetensors

    def __init__(self, backbone: nn.Module, tasks: dict[str, nn.Module], scales: dict[str, float],
                 shared: dict[str, nn.Module] | None = None):
        super().__init__()
        self.backbone = backbone
        # other parts several tasks use (a task class's ``shared_parts``, e.g. UniHCP's decoder); tasks reach
        # them through SharedBackbone references, so each is stored and optimised once
        self.shared = nn.ModuleDict(shared or {})
        self.tasks = nn.ModuleDict(tasks)
        self.scales = dict(scales)

    def forward(self, batches: dict[str, dict]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        loss = None
        for name, batch in batches.items():
            terms = self.tasks[name](batch)
            scaled = self.scales[name] * terms["loss"]
            loss = scaled if loss is None else loss + scaled
            out.update({f"{name}/{k}": v for k, v in terms.items()})
        out["loss"] = loss
        return out

    def no_weight_decay(self) -> set[str]:
        names = {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", lambda: set())()}
        for name, task in self.tasks.items():
            names |= {f"tasks.{name}.{n}" for n in getattr(task, "no_weight_decay", lambda: set())()}
        return names


def loss_scales(weights: dict[str, float], schedule: str, group_sizes: dict[str, int] | None = None,
                world_size: int = 1) -> dict[str, float]:
    """Per-task loss factors for a schedule (see ``MultiTask``)."""
    total = sum(weights.values())
    if schedule == "sample":
        return {name: 1.0 for name in weights}
    if schedule == "groups":
        return {name: w / total * world_size / group_sizes[name] for name, w in weights.items()}
    return {name: w / total for name, w in weights.items()}


__all__ = ["MultiTask", "loss_scales"]
