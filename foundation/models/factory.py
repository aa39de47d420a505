"""Create backbones by name through timm's registry (our own models register there too)."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from foundation.config import ModelConfig, RecipeError, refuse_file_loading


def create_backbone(cfg: ModelConfig, in_chans: int = 3) -> nn.Module:
    """``timm.create_model(cfg.backbone, ...)`` with the recipe's size overrides.

    ``img_size``/``patch_size`` are passed only when set, since convolutional nets do not take them.
    """
    import foundation.models  # noqa: F401  (make sure our models are registered)

    if not timm.is_model(cfg.backbone):  # also every hf-hub:, local-dir:, URL or path: nothing is fetched
        close = difflib.get_close_matches(cfg.backbone, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {close}?" if close else "; see timm.list_models()"
        raise RecipeError(f"model.backbone: {cfg.backbone!r} is not a model registered here (no hf-hub:, local-dir:, "
                          f"URL or path){hint}")
    kwargs = refuse_file_loading(cfg.kwargs, "model.kwargs")  # also for recipes built without validation
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    return timm.create_model(
        cfg.backbone,
        pretrained=False,
        num_classes=cfg.num_classes,
        in_chans=cfg.in_chans if cfg.in_chans is not None else in_chans,
        **kwargs,
    )

