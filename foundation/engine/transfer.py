"""Starting a run from another one: partial, remapped, safe weight loading (``model.init``), frozen
parameters (``model.freeze``), and optimizers by name with layer-wise lr decay and lr multipliers.

Names: ``model.init`` matches *target* names inside the part it loads (the backbone's own names for
``part: backbone``, e.g. ``blocks.0.attn.qkv.weight``; the task's state-dict names for ``part: all``).
``model.freeze`` and ``optim.lr_mult`` match the task's parameter names as the training log lists them
(``model.blocks.0...`` for a single task, ``backbone.blocks.0...`` / ``tasks.<name>...`` for several).
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from foundation.checkpoint_io import CheckpointError, LoadReport, load_weights, source_tensors
from foundation.config import InitConfig, OptimConfig, RecipeError

log = logging.getLogger("foundation")


# --------------------------------------------------------------------------------------------------
# model.init


def backbone_of(task: nn.Module) -> nn.Module:
    """The part of a task that ``part: backbone`` loads into and layer decay counts layers of."""
    return task.get_submodule(getattr(task, "backbone_name", "model"))


def _remap(name: str, remap: dict[str, str]) -> str:
    for old, new in sorted(remap.items(), key=lambda kv: -len(kv[0])):  # the longest prefix wins
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def resize_pos_embed(tensor: Tensor, target: Tensor, module: nn.Module) -> Tensor | None:
    """A ViT-style ``(1, prefix + H*W, D)`` position embedding resampled to ``target``'s grid (timm), or None."""
    from timm.layers import resample_abs_pos_embed

    if tensor.ndim != 3 or target.ndim != 3 or tensor.shape[-1] != target.shape[-1]:
        return None
    prefix = 0 if getattr(module, "no_embed_class", False) else int(getattr(module, "num_prefix_tokens", 1))
    old, new = tensor.shape[1] - prefix, target.shape[1] - prefix
    old_side, new_side = round(old**0.5), round(new**0.5)
    if old_side**2 != old or new_side**2 != new:
        return None
    return resample_abs_pos_embed(tensor, [new_side, new_side], [old_side, old_side], num_prefix_tokens=prefix)


def apply_init(task: nn.Module, cfg: InitConfig) -> LoadReport:
    """Load ``cfg.path`` into ``task`` as ``cfg`` says; returns the report (raises with ``strict``)."""
    target = backbone_of(task) if cfg.part == "backbone" else task
    own = target.state_dict()
    tensors: dict[str, Tensor] = {}
    for name, value in source_tensors(cfg.path, cfg.part).items():
        name = _remap(name, cfg.remap)
        if (cfg.include and not _matches(name, cfg.include)) or _matches(name, cfg.exclude):
            continue
        if cfg.resize_pos_embed and name.endswith("pos_embed") and name in own and own[name].shape != value.shape:
            resized = resize_pos_embed(value, own[name], target)
            if resized is not None:
                log.info("model.init: %s resized %s -> %s", name, tuple(value.shape), tuple(resized.shape))
                value = resized
        tensors[name] = value
    report = load_weights(target, tensors, strict=False)
    if cfg.include or cfg.exclude:  # target names filtered out on purpose are not "missing"
        report.missing = [k for k in report.missing if (not cfg.include or _matches(k, cfg.include))
                          and not _matches(k, cfg.exclude)]
    if cfg.strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointError(f"model.init (strict) from {cfg.path}: " + report.summary())
    if not report.loaded:
        raise CheckpointError(f"model.init from {cfg.path}: no tensor matched this model ({report.summary()}); "
                              "check model.init.part and model.init.remap against the source's names")
    return report


def write_init_report(report: LoadReport, cfg: InitConfig, run_dir: Path) -> None:
    data = {"path": cfg.path, "part": cfg.part, "loaded": report.loaded, "missing": report.missing,
            "unexpected": report.unexpected, "mismatched": report.mismatched}
    (run_dir / "init_report.json").write_text(json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# model.freeze


def freeze(task: nn.Module, patterns: list[str]) -> list[str]:
    """Set ``requires_grad=False`` on the parameters ``patterns`` select (later patterns win; ``!p``
    un-freezes). Returns the frozen names; a pattern that matches nothing is an error (a typo)."""
    if not patterns:
        return []
    names = [n for n, _ in task.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern.removeprefix("!")) for n in names):
            raise RecipeError(f"model.freeze: {pattern!r} matches no parameter; names look like {names[:3]}")
    frozen = []
    for name, param in task.named_parameters():
        keep_frozen = False
        for pattern in patterns:
            if fnmatch.fnmatchcase(name, pattern.removeprefix("!")):
                keep_frozen = not pattern.startswith("!")
        if keep_frozen:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


# --------------------------------------------------------------------------------------------------
# optimizers


def _layer_ids(task: nn.Module, num_layers_out: list[int]) -> dict[str, int]:
    """Task parameter name -> layer id of the backbone's ``group_matcher`` (timm), deepest = last."""
    from timm.models import group_parameters

    backbone = backbone_of(task)
    if not hasattr(backbone, "group_matcher"):
        raise RecipeError(f"optim.layer_decay: the backbone ({type(backbone).__name__}) has no timm group_matcher(); "
                          "layer-wise decay needs to know its layers")
    layer_map = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
    num_layers = max(layer_map.values()) + 1  # parameters outside the backbone (other heads) join the last layer
    num_layers_out.append(num_layers)
    prefix = getattr(task, "backbone_name", "model") + "."
    return {prefix + k: v for k, v in layer_map.items()}


def param_groups(task: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Parameter groups: no weight decay on 1-D tensors and ``no_weight_decay()`` names; ``lr_scale`` from
    layer decay (timm's convention: block i of N gets ``layer_decay ** (N - i)``) times ``lr_mult``.
    timm's schedulers multiply each group's lr by its ``lr_scale``."""
    skip = getattr(task, "no_weight_decay", lambda: set())()
    layer_ids: dict[str, int] = {}
    count: list[int] = []
    if cfg.layer_decay is not None:
        layer_ids = _layer_ids(task, count)
    top = count[0] - 1 if count else 0
    groups: dict[tuple[float, float], dict] = {}
    for name, param in task.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim <= 1 or name in skip else cfg.weight_decay
        scale = 1.0
        if cfg.layer_decay is not None:
            exempt = name not in layer_ids or any(fnmatch.fnmatchcase(name, p) for p in cfg.layer_decay_exempt)
            scale = 1.0 if exempt else cfg.layer_decay ** (top - layer_ids[name] - cfg.layer_decay_offset)
        mult = 1.0
        for pattern, factor in cfg.lr_mult.items():
            if fnmatch.fnmatchcase(name, pattern):
                mult = factor  # the last matching pattern wins
        scale *= mult
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(task: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters by default; ``optim.name`` any timm optimizer
    (``create_optimizer_v2``), with layer decay / lr multipliers as parameter groups."""
    from timm.optim import param_groups_weight_decay

    if cfg.name == "adamw" and cfg.layer_decay is None and not cfg.lr_mult:
        skip = getattr(task, "no_weight_decay", lambda: set())()
        groups = param_groups_weight_decay(task, cfg.weight_decay, no_weight_decay_list=skip)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    from timm.optim import create_optimizer_v2, list_optimizers

    if cfg.name not in list_optimizers():
        from foundation.config import suggest

        raise RecipeError(f"optim.name: unknown optimizer {cfg.name!r}{suggest(cfg.name, list_optimizers())}; "
                          f"choose from timm's list_optimizers()")
    extra = {"momentum": cfg.momentum} if cfg.name in ("sgd", "nesterov", "momentum", "lars", "larc", "nlars",
                                                       "nlarc", "sgdp", "rmsprop", "rmsproptf") else {}
    if cfg.name in ("adamw", "adam", "nadamw", "lamb", "lambc", "adan", "lion", "radam", "nadam", "adamp", "adafactor"):
        extra["betas"] = cfg.betas  # adafactor: betas[0] is its first-moment coefficient
    if cfg.name == "adafactorbv":  # UniHCP's Adafactor: momentum betas[0], second moment capped at betas[1], RMS clip 1
        extra.update(momentum=cfg.betas[0], beta2_cap=cfg.betas[1], clipping_threshold=1.0,
                     momentum_dtype=torch.float32)
    return create_optimizer_v2(param_groups(task, cfg), opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               **extra)


__all__ = ["apply_init", "backbone_of", "build_optimizer", "freeze", "param_groups", "resize_pos_embed",
           "source_tensors", "write_init_report"]
