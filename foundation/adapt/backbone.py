"""The frozen image encoder that adaptation starts from, whatever the checkpoint is.

``load_backbone(spec)`` is the one place that knows checkpoint kinds:

| ``spec`` | what is taken | preprocessing |
|---|---|---|
| a platform run or ``checkpoints/step_N`` (classification) | the timm model's pooled pre-logits feature | the run's recipe (`data.image_size`, `in_chans`, `mean`, `std`, interpolation, crop) |
| a platform run of task ``clip`` / ``declip`` | the vision tower: ``pooled`` = ``model.visual`` (pre-projection), ``projected`` = ``encode_image`` | the run's recipe |
| a multi-task run (``tasks:``) | the shared backbone's pooled feature | its first task's data settings |
| ``timm:NAME`` with ``weights=FILE`` (.safetensors, or .pth/.pt/.bin loaded with ``weights_only=True``) | the timm model without its head | timm's ``pretrained_cfg`` of NAME |
| a ``foundation export --format timm`` folder (``config.json`` + ``model.safetensors``) | as ``timm:NAME`` | the exported ``pretrained_cfg`` |
| a ``foundation export --format open_clip`` folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) | open_clip's ``visual``: ``projected`` = ``encode_image``, ``pooled`` = before ``proj`` | the exported ``preprocess_cfg`` |

Only the recipe's preprocessing settings are used, never its data paths: the data to adapt on come
from the command line. Nothing read from a checkpoint runs code (safetensors, or
``torch.load(weights_only=True)``), and every configuration file of an export passes the artefact gate
(``foundation.trust``: registered model names, allowed kwargs, files inside the export).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from foundation.checkpoint_io import CheckpointError, load_weights, read_state_dict, resolve_checkpoint
from foundation.config import DataConfig
from foundation.trust import check_open_clip_config, check_timm_export, sha256_of, timm_name

FEATURES = ("pooled", "projected")


@dataclass
class Backbone:
    """A frozen feature extractor with the preprocessing its weights were trained with."""

    module: nn.Module  # (B, C, H, W) normalised images -> (B, D) features
    preprocessing: dict[str, Any]  # DataConfig fields: image_size, in_chans, mean, std, augment.interpolation/crop_pct
    kind: str  # classification | clip | declip | timm | open_clip
    feature: str  # pooled | projected
    identity: str  # sha256 over the weight files, the feature and the preprocessing: the feature-cache key
    source: dict[str, Any] = field(default_factory=dict)  # what was loaded, for reports
    # what fine-tuning needs to rebuild the architecture in the training engine (None: not fine-tunable)
    finetune: dict[str, Any] | None = None

    def data_config(self, workers: int = 2, batch_targets: tuple[str, ...] = ("label",)) -> DataConfig:
        """A ``DataConfig`` with this backbone's preprocessing (no data paths) for the eval reader."""
        p = self.preprocessing
        return DataConfig(image_size=p["image_size"], in_chans=p["in_chans"], mean=p.get("mean"), std=p.get("std"),
                          workers=workers, targets=list(batch_targets),
                          augment={"interpolation": p.get("interpolation", "bicubic"),
                                   "crop_pct": p.get("crop_pct", 1.0)})


class _TimmPooled(nn.Module):
    """A timm model's pooled pre-logits feature: ``forward_head(forward_features(x), pre_logits=True)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)  # (B, D)


class _Call(nn.Module):
    """``fn(images)`` of a module kept as a child (so ``.to`` / ``.eval`` reach its weights)."""

    def __init__(self, owner: nn.Module, method: str):
        super().__init__()
        self.owner = owner
        self.method = method

    def forward(self, images: Tensor) -> Tensor:
        return getattr(self.owner, self.method)(images)


def _identity(weight_files: list[Path], feature: str, preprocessing: dict, extra: str = "") -> str:
    payload = json.dumps({"weights": sha256_of(weight_files), "feature": feature, "pre": preprocessing,
                          "extra": extra}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _check_feature(feature: str, allowed: tuple[str, ...], what: str) -> None:
    if feature not in FEATURES:
        raise CheckpointError(f"--feature {feature!r}: choose from {list(FEATURES)}")
    if feature not in allowed:
        raise CheckpointError(f"--feature {feature}: {what} has no such feature; it offers {list(allowed)}")


def _platform_backbone(path: Path, feature: str, image_size: int | None) -> Backbone:
    from foundation.artefacts import load_artefact_recipe, load_model
    from foundation.data.transforms import normalization
    from foundation.models.dual_encoder import DualEncoder

    ckpt = resolve_checkpoint(path)
    if load_artefact_recipe(ckpt).tasks is not None:
        return _multitask_backbone(ckpt, feature, image_size)
    model, recipe = load_model(ckpt)
    mean, std = normalization(recipe.data)
    pre = {"image_size": image_size or recipe.data.image_size, "in_chans": recipe.data.in_chans, "mean": list(mean),
           "std": list(std), "interpolation": recipe.data.augment.interpolation,
           "crop_pct": recipe.data.augment.crop_pct}
    m = recipe.model
    arch = {"backbone": m.backbone, "img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans,
            "kwargs": dict(m.kwargs)}
    kind = recipe.task.name
    if isinstance(model, DualEncoder):
        _check_feature(feature, FEATURES, f"the {kind} vision tower")
        if feature == "projected":
            module = _Call(model, "encode_image")
        elif model.visual_projection is not None:
            module = model.visual  # timm tower: pooled pre-projection feature
        else:  # an open_clip vision tower projects inside ``visual``: take the feature before ``proj``
            module = _open_clip_pooled(model.visual)
        # fine-tuning rebuilds a timm tower only; an open_clip tower (model.dual_encoder.vision_open_clip) cannot
        finetune = None if recipe.model.dual_encoder.vision_open_clip else {**arch, "init": str(ckpt)}
    elif hasattr(model, "forward_head"):
        _check_feature(feature, ("pooled",), f"a {kind} model")
        module = _TimmPooled(model)
        finetune = {**arch, "init": str(ckpt)}
    else:
        raise CheckpointError(f"{path}: task {kind!r} has no image backbone that foundation adapt knows")
    files = [ckpt / "model.safetensors"]
    return Backbone(module.eval(), pre, kind, feature, _identity(files, feature, pre, json.dumps(arch, sort_keys=True)),
                    {"checkpoint": str(ckpt), "task": kind, "backbone": m.backbone}, finetune)


def _multitask_backbone(ckpt: Path, feature: str, image_size: int | None) -> Backbone:
    """A multi-task run's shared backbone (pooled features), with its first task's preprocessing."""
    from foundation.artefacts import load_task
    from foundation.data.transforms import normalization

    _check_feature(feature, ("pooled",), "a multi-task run's shared backbone")
    whole, _, recipe = load_task(ckpt)
    data = next(iter(recipe.tasks.values())).data
    mean, std = normalization(data)
    side = data.image_size if isinstance(data.image_size, int) else max(data.input_hw)  # a UniHCP task's rectangle
    pre = {"image_size": image_size or side, "in_chans": data.in_chans, "mean": list(mean),
           "std": list(std), "interpolation": data.augment.interpolation, "crop_pct": data.augment.crop_pct}
    m = recipe.model
    arch = {"backbone": m.backbone, "img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans,
            "kwargs": dict(m.kwargs)}
    files = [ckpt / "model.safetensors"]
    return Backbone(whole.backbone.eval(), pre, "multitask", feature,
                    _identity(files, feature, pre, json.dumps(arch, sort_keys=True)),
                    {"checkpoint": str(ckpt), "task": "multitask", "tasks": list(recipe.tasks), "backbone": m.backbone},
                    {**arch, "init": str(ckpt)})


def _open_clip_pooled(visual: nn.Module) -> nn.Module:
    """open_clip's vision tower without its final projection (``proj``), i.e. the pooled width-d feature."""
    if not hasattr(visual, "proj"):
        raise CheckpointError(f"{type(visual).__name__}: no `proj` to strip; use --feature projected")
    pooled = copy.deepcopy(visual)
    pooled.proj = None
    return pooled


def _timm_backbone(name: str, weights: Path, feature: str, image_size: int | None, in_chans: int = 3,
                   kwargs: dict | None = None, pretrained_cfg: dict | None = None) -> Backbone:
    import timm

    import foundation.models  # noqa: F401  (registers our own backbones with timm)

    _check_feature(feature, ("pooled",), f"timm model {name}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **(kwargs or {}))
    except RuntimeError as e:  # timm: unknown model name
        raise CheckpointError(f"timm:{name}: {e}") from None
    tensors = read_state_dict(weights)
    report = load_weights(model, tensors, strict=False)
    if report.missing or report.mismatched:
        raise CheckpointError(f"{weights} does not fit timm model {name}: {report.summary()}")
    cfg = pretrained_cfg or timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    pre = {"image_size": image_size or size, "in_chans": in_chans, "mean": list(cfg["mean"])[:in_chans],
           "std": list(cfg["std"])[:in_chans], "interpolation": cfg.get("interpolation", "bicubic"),
           "crop_pct": cfg.get("crop_pct") or 1.0}
    arch = {"backbone": name, "img_size": None, "patch_size": None, "in_chans": in_chans, "kwargs": dict(kwargs or {})}
    return Backbone(_TimmPooled(model).eval(), pre, "timm", feature,
                    _identity([weights], feature, pre, json.dumps(arch, sort_keys=True)),
                    {"timm": name, "weights": str(weights), "ignored": report.unexpected[:20]},
                    {**arch, "init": str(weights)})


def _open_clip_backbone(path: Path, feature: str, image_size: int | None) -> Backbone:
    import open_clip

    from safetensors import SafetensorError

    from foundation.artefacts import BUILD_ERRORS, does_not_build

    config = check_open_clip_config(_read_json(path / "open_clip_config.json"), path)
    weights = path / "open_clip_model.safetensors"  # safetensors only: a pickled .bin is never read
    if not weights.is_file():
        raise CheckpointError(f"{path}: open_clip export without open_clip_model.safetensors (a pickled "
                              "open_clip_pytorch_model.bin is not read; see docs/trust.md)")
    _check_feature(feature, FEATURES, "an open_clip model")
    name = f"foundation-adapt-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    open_clip.factory._MODEL_CONFIGS[name] = config["model_cfg"]  # local config only: nothing from a hub
    quiet = logging.root.manager.disable
    logging.disable(logging.INFO)  # open_clip logs each build step on the root logger: a refusal stays one line
    try:
        model = open_clip.create_model(name, pretrained=str(weights), weights_only=True)
    except (*BUILD_ERRORS, SafetensorError) as e:  # sizes the gate let through but open_clip cannot build or load
        raise does_not_build(path / "open_clip_config.json", e) from None
    finally:
        logging.disable(quiet)
        open_clip.factory._MODEL_CONFIGS.pop(name, None)
    model.eval()
    pc = config.get("preprocess_cfg", {})
    size = pc.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (list, tuple)) else size
    pre = {"image_size": image_size or int(size), "in_chans": 3, "mean": list(pc.get("mean", open_clip.OPENAI_DATASET_MEAN)),
           "std": list(pc.get("std", open_clip.OPENAI_DATASET_STD)), "interpolation": pc.get("interpolation", "bicubic"),
           "crop_pct": 1.0}
    module = _Call(model, "encode_image") if feature == "projected" else _open_clip_pooled(model.visual)
    return Backbone(module.eval(), pre, "open_clip", feature, _identity([weights], feature, pre, json.dumps(config)),
                    {"open_clip": str(path)}, None)


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable JSON ({e})") from None


def load_backbone(spec: str, *, feature: str = "pooled", weights: str | None = None,
                  image_size: int | None = None) -> Backbone:
    """The frozen feature extractor of ``spec`` (see the module docstring for the kinds), on the CPU, in eval mode.

    ``feature``: ``pooled`` (the backbone's pooled feature, before any projection) or ``projected`` (a dual
    encoder's joint-space embedding). ``image_size`` overrides the checkpoint's input size.
    """
    if spec.startswith("timm:"):
        if not weights:
            raise CheckpointError(f"--checkpoint {spec} needs --weights FILE (a local weights file; nothing is "
                                  "downloaded)")
        name = timm_name(spec[len("timm:"):], f"--checkpoint {spec}")
        return _timm_backbone(name, Path(weights).expanduser(), feature, image_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"--checkpoint {spec}: not found (a run directory, a checkpoints/step_N directory, "
                              "an export folder, or timm:NAME with --weights)")
    if (path / "open_clip_config.json").is_file():
        return _open_clip_backbone(path, feature, image_size)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file() and not (path / "recipe.yaml").is_file():
        cfg = check_timm_export(_read_json(path / "config.json"), path)  # a `foundation export --format timm` folder
        return _timm_backbone(cfg["architecture"], path / "model.safetensors", feature, image_size,
                              in_chans=cfg["in_chans"], kwargs=cfg["kwargs"], pretrained_cfg=cfg["pretrained_cfg"])
    return _platform_backbone(path, feature, image_size)


__all__ = ["Backbone", "FEATURES", "load_backbone"]
