"""Supervised classification (DeiT style): cross-entropy with label smoothing, Mixup/CutMix via timm."""

from __future__ import annotations

from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn

from foundation.config import DataConfig, ModelConfig, TaskConfig
from foundation.models.factory import create_backbone
from foundation.models.heads import LinearClassifier, SharedBackbone, feature_width


class ClassificationTask(nn.Module):
    """Image classifier + loss. ``forward(batch) -> {"loss", "ce"}``; ``self.model`` is the timm model."""

    default_evals = ("classification",)  # what train.evals means when the recipe leaves it unset

    def __init__(self, model: nn.Module, cfg: TaskConfig, num_classes: int):
        super().__init__()
        self.model = model
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            # Mixup makes soft targets that already carry the label smoothing.
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    backbone_name = "model"  # the submodule model.init (part: backbone) and layer decay treat as the backbone

    @classmethod
    def build(cls, model: ModelConfig, task: TaskConfig, data: DataConfig,
              backbone: nn.Module | None = None) -> ClassificationTask:
        """The timm classifier ``model.backbone``; with ``backbone`` (a multi-task run's shared one) a linear
        head of ``model.num_classes`` on its pooled features."""
        if backbone is None:
            return cls(create_backbone(model, in_chans=data.in_chans), task, model.num_classes)
        head = LinearClassifier(SharedBackbone(backbone), feature_width(backbone), model.num_classes)
        return cls(head, task, model.num_classes)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, labels = batch["image"], batch["label"]  # (B, C, H, W), (B,)
        if self.training and self.mixup is not None:
            images, labels = self.mixup(images, labels)  # labels become (B, num_classes) soft targets
        logits = self.model(images)
        loss = self.criterion(logits.float(), labels)
        return {"loss": loss, "ce": loss.detach()}

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``self.named_parameters()``) that AdamW must not decay, besides norms and biases."""
        inner = getattr(self.model, "no_weight_decay", lambda: set())()
        return {f"model.{n}" for n in inner}


def accuracy(logits: Tensor, labels: Tensor, topk: tuple[int, ...] = (1, 5)) -> dict[int, Tensor]:
    """Number of samples whose label is within the top-k predictions, for each k."""
    k_max = min(max(topk), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # (B, k_max)
    hit = top.eq(labels[:, None])
    return {k: hit[:, : min(k, k_max)].any(dim=1).sum() for k in topk}


__all__ = ["ClassificationTask", "accuracy"]
