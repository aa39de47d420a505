"""Image decoding and augmentation: PIL decode, timm ``create_transform`` for training and evaluation.

Training: random-resized-crop, flip, optional colour jitter (applied with a probability) / random
grayscale / Gaussian blur (MoCo v2's views, as DeCLIP uses them) / RandAugment / random erasing, then
normalisation (``DataConfig.augment``). Evaluation: resize to ``image_size / crop_pct`` and centre crop.
One-channel data (``in_chans: 1``) is decoded as ``L``; its default mean/std are the means of
ImageNet's three channel statistics.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torch import Tensor

from foundation.config import DataConfig
from foundation.data import DataError

Transform = Callable[[Image.Image], Tensor]


def decode_image(data: bytes, in_chans: int) -> Image.Image:
    """Decode encoded image bytes fully into an ``L`` (1 channel) or ``RGB`` (3) image.

    Raises (``OSError``, ``ValueError``, ``SyntaxError`` ...) on corrupt or truncated data: the whole
    image is decoded here (``load()``) and PIL's ``LOAD_TRUNCATED_IMAGES`` is left off.
    """
    img = Image.open(io.BytesIO(data))
    img.load()
    mode = "L" if in_chans == 1 else "RGB"
    if img.mode != mode:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # palette transparency must go through RGBA (PIL warns otherwise)
        img = img.convert(mode)
    return img


def normalization(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` with one entry per channel: the configured ones, else ImageNet's."""
    mean = cfg.mean or _default_stats(IMAGENET_DEFAULT_MEAN, cfg.in_chans)
    std = cfg.std or _default_stats(IMAGENET_DEFAULT_STD, cfg.in_chans)
    for name, stats in (("mean", mean), ("std", std)):
        if len(stats) != cfg.in_chans:
            raise DataError(
                f"data.{name} has {len(stats)} values but data.in_chans is {cfg.in_chans}; give one value per channel"
            )
    return tuple(mean), tuple(std)


def _default_stats(stats: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    return (sum(stats) / len(stats),) if in_chans == 1 else tuple(stats)


def build_train_transform(cfg: DataConfig) -> Transform:
    """PIL image → normalised ``(C, H, W)`` tensor with the training augmentation of ``cfg.augment``."""
    mean, std = normalization(cfg)
    a = cfg.augment
    transform = create_transform(
        input_size=(cfg.in_chans, cfg.image_size, cfg.image_size),
        is_training=True,
        scale=a.scale,
        ratio=a.ratio,
        hflip=a.hflip,
        color_jitter=a.color_jitter,
        color_jitter_prob=a.color_jitter_prob,
        grayscale_prob=a.grayscale_prob,
        gaussian_blur_prob=a.gaussian_blur_prob,
        auto_augment=a.auto_augment,
        interpolation=a.interpolation,
        re_prob=a.re_prob,
        mean=mean,
        std=std,
    )
    for t in getattr(transform, "transforms", []):  # RandAugment holds .ops, AutoAugment .policy (lists of ops)
        for op in [*getattr(t, "ops", []), *(o for sub in getattr(t, "policy", []) for o in sub)]:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize for Pillow >= 13: RandAugment's increasing posterize (``inc1``) keeps 0 bits at
    magnitude 10, which older Pillow turned into a black image and Pillow 13 refuses with a ValueError."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def build_eval_transform(cfg: DataConfig) -> Transform:
    """PIL image → normalised tensor: resize to ``image_size / crop_pct``, centre crop ``image_size``."""
    mean, std = normalization(cfg)
    return create_transform(
        input_size=(cfg.in_chans, cfg.image_size, cfg.image_size),
        is_training=False,
        interpolation=cfg.augment.interpolation,
        crop_pct=cfg.augment.crop_pct,
        mean=mean,
        std=std,
    )


__all__ = ["build_eval_transform", "build_train_transform", "decode_image", "normalization"]
