"""Distillation into one plain backbone (INTERN: the generalist compressed into a deployable model).

    loss = w_feat * MSE(P s_feat, t_feat)  +  w_kl * T^2 * KL(softmax(t_logits / T) || softmax(s_logits / T))
         + w_ce * CE(s_logits, label)

``s_feat`` is the student's pooled pre-logits feature (``model.backbone``, a plain timm classifier), ``P`` a
linear projection to the teacher's width (a task tensor, task.safetensors), ``t_feat`` / ``t_logits`` the
frozen teacher's pooled feature and one classification head's logits. The teacher is a finished run
(``task.distill.teacher``: a run directory or checkpoint, read safely); it is held outside the module
tree, so it is never trained, saved, wrapped by DDP or copied by EMA. ``model.safetensors`` of a distill
run is the student alone (a timm model with the head's classes): ``foundation eval`` / ``quantize`` /
``export`` / timm take it as any classifier, and loading it never reads the teacher
(``foundation.artefacts`` rebuilds it as a classification task).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.config import DataConfig, ModelConfig, RecipeError, TaskConfig
from foundation.models.factory import create_backbone
from foundation.models.heads import feature_width


class _Teacher(nn.Module):
    """A loaded run as ``images -> (pooled feature, head logits)``."""

    def __init__(self, features: nn.Module, pool: bool, head: nn.Module):
        super().__init__()
        self.features, self.pool, self.head = features, pool, head

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.pool:  # a single-task timm classifier
            feat = self.features.forward_head(self.features.forward_features(images), pre_logits=True)
        else:  # a multi-task run's shared backbone (created without a classifier: pooled features)
            feat = self.features(images)
        return feat, self.head(feat)


def load_teacher(path: str, head: str | None) -> tuple[_Teacher, int, int]:
    """The teacher of ``path`` (frozen, eval mode), its feature width and the head's class count: a single-task
    classification run's timm classifier, or a multi-task run's shared backbone with one classification head.
    Built from the checkpoint's recipe (through the artefact gate) and its weights, never by running a task."""
    from foundation.checkpoint_io import load_weights, read_raw_recipe, read_tensors, resolve_checkpoint
    from foundation.config import validate
    from foundation.trust import check_recipe

    ckpt = resolve_checkpoint(path, "task.distill.teacher")
    raw = check_recipe(read_raw_recipe(ckpt), ckpt, str(ckpt / "recipe.yaml"))
    recipe = validate(raw, str(ckpt / "recipe.yaml"))
    tensors = read_tensors(ckpt / "model.safetensors")
    if recipe.tasks is None:
        if recipe.task.name != "classification":
            raise RecipeError(f"task.distill.teacher: {ckpt} is task {recipe.task.name!r}; distill takes a "
                              "classification run or a multi-task run with a classification task")
        model = create_backbone(recipe.model, in_chans=recipe.data.in_chans)
        load_weights(model, tensors)
        teacher = _Teacher(model, True, model.get_classifier())
        width, classes = feature_width(model), model.num_classes
    else:
        heads = [n for n, e in recipe.tasks.items() if e.task.name == "classification"]
        if head is None and len(heads) == 1:
            head = heads[0]
        if head not in heads:
            raise RecipeError(f"task.distill.head: {head!r} is not a classification task of {ckpt}; choose from {heads}")
        in_chans = next(iter(recipe.tasks.values())).data.in_chans
        backbone = create_backbone(recipe.model.model_copy(update={"num_classes": 0}), in_chans=in_chans)
        load_weights(backbone, {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")})
        prefix = f"tasks.{head}.model.head."
        weight = tensors.get(prefix + "weight")
        if weight is None:
            raise RecipeError(f"task.distill.head: {ckpt} holds no {prefix}weight")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=prefix + "bias" in tensors)
        load_weights(linear, {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
        teacher = _Teacher(backbone, False, linear)
        width, classes = feature_width(backbone), linear.out_features
    teacher.requires_grad_(False)
    return teacher.eval(), width, classes


class DistillTask(nn.Module):
    """Student + projection + frozen teacher. ``forward(batch) -> {"loss", "feature", "kl"[, "ce"]}``."""

    default_evals = ("classification",)  # the student's top-1 with the distilled head, on data.val
    backbone_name = "model"

    def __init__(self, model: nn.Module, teacher: _Teacher, teacher_width: int, cfg):
        super().__init__()
        self.model = model  # the student: a plain timm classifier
        self.proj = nn.Linear(feature_width(model), teacher_width)
        self.__dict__["teacher"] = teacher  # not a submodule: not trained, saved, wrapped or copied
        self.cfg = cfg

    @classmethod
    def build(cls, model: ModelConfig, task: TaskConfig, data: DataConfig,
              backbone: nn.Module | None = None) -> DistillTask:
        cfg = task.distill
        if backbone is not None:
            raise RecipeError("task distill: its student is a recipe's own model.backbone; use it in a single-task "
                              "recipe (task: {name: distill}), not under tasks:")
        if not cfg.teacher:
            raise RecipeError("task.distill.teacher: not set; name a finished run directory (e.g. the generalist)")
        teacher, width, classes = load_teacher(cfg.teacher, cfg.head)
        if model.num_classes != classes:
            raise RecipeError(f"model.num_classes: {model.num_classes}, but the teacher's head has {classes} classes; "
                              f"set model.num_classes: {classes}")
        return cls(create_backbone(model, in_chans=data.in_chans), teacher, width, cfg)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg, images = self.cfg, batch["image"]  # (B, C, H, W)
        teacher = self.__dict__["teacher"]
        if teacher.head.weight.device != images.device:
            teacher.to(images.device)
        with torch.no_grad():
            t_feat, t_logits = teacher(images)  # (B, Dt), (B, K)
        s_map = self.model.forward_features(images)
        s_feat = self.model.forward_head(s_map, pre_logits=True)  # (B, Ds)
        s_logits = self.model.forward_head(s_map)  # (B, K)
        feature = F.mse_loss(self.proj(s_feat).float(), t_feat.float())
        t = cfg.temperature
        kl = F.kl_div(F.log_softmax(s_logits.float() / t, dim=-1), F.log_softmax(t_logits.float() / t, dim=-1),
                      reduction="batchmean", log_target=True) * t * t
        loss = cfg.feature_weight * feature + cfg.logit_weight * kl
        out = {"feature": feature.detach(), "kl": kl.detach()}
        if cfg.ce_weight and "label" in batch:
            ce = F.cross_entropy(s_logits.float(), batch["label"])
            loss = loss + cfg.ce_weight * ce
            out["ce"] = ce.detach()
        out["loss"] = loss
        return out

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in getattr(self.model, "no_weight_decay", lambda: set())()}


__all__ = ["DistillTask", "load_teacher"]
