"""Pieces a multi-task model is made of: a reference to the shared backbone, and heads on its features."""

from __future__ import annotations

from torch import Tensor, nn


class SharedBackbone(nn.Module):
    """Calls a backbone owned by another module without registering it, so its weights appear once in
    state dicts, optimizers, DDP and EMA copies. Attributes the backbone has (``num_features``,
    ``no_weight_decay``, ...) read through; ``train()``/``eval()`` reach it, so a task's model evaluated on
    its own switches the shared backbone's mode too."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.__dict__["target"] = backbone

    def forward(self, *args, **kwargs):
        return self.__dict__["target"](*args, **kwargs)

    def train(self, mode: bool = True) -> SharedBackbone:
        super().train(mode)
        self.__dict__["target"].train(mode)
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            target = self.__dict__.get("target")
            if target is None:  # while being copied
                raise
            return getattr(target, name)


class LinearClassifier(nn.Module):
    """Pooled backbone features -> class logits: a classifier on a shared backbone."""

    def __init__(self, features: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.features = features  # (B, C, H, W) -> (B, num_features)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, num_classes)


def feature_width(backbone: nn.Module) -> int:
    """Width of the pooled features a timm backbone created with ``num_classes=0`` returns."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features
