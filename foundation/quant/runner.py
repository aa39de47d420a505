"""The PTQ pipeline on a model and a stack of calibration images, and the quantized checkpoint format.

``quantize``: copy → fold BN → (gamma migration) → place quantizers → calibrate → (token-wise
clipping) → method (RTN / AdaRound / BRECQ / QDrop) → bake the rounded weights.

A quantized checkpoint is a directory: ``model.safetensors`` (weights after folding and rounding,
every quantizer's scale / zero point / grid) and ``quant.json`` (how to rebuild the architecture, the
folded BN pairs, the quantizer placement, the scheme and the recipe). ``load_quantized`` rebuilds it
without calibration data and without executing code from the checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from foundation.quant.attention import replace_attention, split_attention
from foundation.quant.calibrate import calibrate, model_device
from foundation.quant.config import QuantConfig
from foundation.quant.fake_quant import QSpec
from foundation.quant.fold import _replacement, fold_batchnorm
from foundation.quant.modules import quant_layers
from foundation.quant.outlier import migrate_gamma, scale_shortcut, token_wise_clipping
from foundation.quant.placement import Site, apply_placement, plan_placement

FORMAT_VERSION = 1


def _observer_opts(cfg: QuantConfig) -> dict:
    o = cfg.observers
    return {"ema_momentum": o.ema_momentum, "lp": o.lp, "mse_steps": o.mse_steps, "percentile": o.percentile}


def prepare(model: nn.Module, example: Tensor, cfg: QuantConfig) -> tuple[nn.Module, nn.Module, dict]:
    """(quantized model with uncalibrated quantizers, FP reference model, report).

    ``model`` is not modified. Both returned models are BN-folded (and gamma-migrated when Outlier
    Suppression is on), so the FP reference computes exactly what the quantized model approximates.
    """
    fp = copy.deepcopy(model).eval()
    report: dict = {"linear_attention": split_attention(fp, example)}  # nn.MultiheadAttention's projections as Linear
    report["folded_bn"] = fold_batchnorm(fp, example)
    if cfg.outlier.enabled and cfg.outlier.gamma_migration:
        report["gamma_migration"] = migrate_gamma(fp, example)
    qmodel = copy.deepcopy(fp)
    wspec, aspec = cfg.specs()
    sites = plan_placement(qmodel, example, cfg.wbits, cfg.abits, cfg.first_last_bits)
    apply_placement(qmodel, sites, wspec, aspec, cfg.observers.weight, cfg.observers.act, _observer_opts(cfg))
    qmodel.quant_sites = sites
    qmodel.quant_meta = {"linear_attention": report["linear_attention"], "folded_bn": report["folded_bn"], "wspec": wspec.to_dict(), "aspec": aspec.to_dict(),
                         "config": cfg.model_dump(mode="json"),
                         "scaled_shortcuts": report.get("gamma_migration", {}).get("scaled_shortcuts", [])}
    return qmodel, fp, report


def quantize(model: nn.Module, calib: Tensor, cfg: QuantConfig,
             log: Callable[[str], None] | None = None) -> tuple[nn.Module, nn.Module, dict]:
    """Post-training quantization of ``model`` (FP, eval mode) with ``calib`` images (N, C, H, W).

    Returns (quantized model, FP reference, report with timings). Runs on ``model``'s device.
    """
    from foundation.quant import METHODS

    t0 = time.perf_counter()
    device = model_device(model)
    calib = calib[: cfg.calib_images]
    example = calib[:2].to(device)
    qmodel, fp, report = prepare(model, example, cfg)
    calibrate(qmodel, calib, cfg.batch_size)
    report["calibration_seconds"] = round(time.perf_counter() - t0, 3)
    if cfg.outlier.enabled and cfg.outlier.token_clipping:
        report["token_clipping"] = token_wise_clipping(qmodel, fp, calib, cfg.outlier, cfg.batch_size, log)
    t1 = time.perf_counter()
    report["method"] = METHODS[cfg.method](qmodel, fp, calib, cfg, log)
    report["method_seconds"] = round(time.perf_counter() - t1, 3)
    bake_weights(qmodel)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    report["ptq_seconds"] = round(time.perf_counter() - t0, 3)
    report["calib_images"] = int(calib.shape[0])
    return qmodel.eval(), fp, report


@torch.no_grad()
def bake_weights(qmodel: nn.Module) -> None:
    """Replace each weight by its fake-quantized value (on the grid; quantizing it again is exact)."""
    for _, layer in quant_layers(qmodel):
        if layer.weight_quant.enabled and layer.weight_quant.ready:
            layer.weight.copy_(layer.weight_quant(layer.weight))


# --------------------------------------------------------------------------------------------------
# checkpoint


def build_architecture(arch: dict) -> nn.Module:
    """The FP model described by ``arch``: ``{"source": "timm", "name", "kwargs"}``,
    ``{"source": "recipe", "model": <ModelConfig>, "in_chans": int}`` or, for one tower of a dual
    encoder, ``{"source": "recipe_tower", "recipe": <Recipe>, "tower": "image" | "text"}``."""
    import timm

    if arch.get("source") == "recipe":
        from foundation.config import ModelConfig
        from foundation.models.factory import create_backbone

        return create_backbone(ModelConfig(**arch["model"]), in_chans=arch.get("in_chans", 3))
    if arch.get("source") == "recipe_tower":  # one tower of a CLIP/DeCLIP checkpoint's dual encoder
        from foundation.config import validate
        from foundation.models.dual_encoder import ImageTower, TextTower
        from foundation.tasks import TASKS

        recipe = validate(arch["recipe"])
        dual = TASKS[recipe.task.name].build(recipe.model, recipe.task, recipe.data).model
        return {"image": ImageTower, "text": TextTower}[arch["tower"]](dual)
    if arch.get("source") == "unihcp_task":  # one task of a UniHCP checkpoint, packed; quant.json holds its recipe
        from foundation.artefacts import unihcp_deploy

        return unihcp_deploy(arch["recipe"], arch["task"], packed=True)
    if arch.get("source") == "timm":
        from foundation.config import refuse_file_loading

        kwargs = refuse_file_loading(arch.get("kwargs", {}), "quant.json kwargs")
        return timm.create_model(arch["name"], pretrained=False, **kwargs)
    raise ValueError(f"unknown architecture description {arch!r}: expected source 'timm' or 'recipe'")


def save_quantized(qmodel: nn.Module, path: str | Path, arch: dict, extra: dict | None = None) -> Path:
    """Write the quantized checkpoint directory (temporary name, renamed when complete)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    if isinstance(arch.get("recipe"), dict):  # a Hugging Face text tower's config and tokenizer go with it
        from foundation.trust import bundle_text_tower

        arch = {**arch, "recipe": bundle_text_tower(arch["recipe"], tmp)}
    state = {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    meta = {"format": FORMAT_VERSION, "arch": arch, **qmodel.quant_meta,
            "sites": [s.to_dict() for s in qmodel.quant_sites], **(extra or {})}
    (tmp / "quant.json").write_text(json.dumps(meta, indent=2, default=str))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized model saved by ``save_quantized`` (eval mode, on ``device``); a ``quant.json`` that
    is refused by the gate or does not rebuild is a ``CheckpointError`` (one line)."""
    from safetensors import SafetensorError

    from foundation.artefacts import BUILD_ERRORS, does_not_build
    from foundation.checkpoint_io import CheckpointError

    path = Path(path)
    meta_file = path / "quant.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path}: not a quantized checkpoint (no quant.json); run `foundation quantize`")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: unreadable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: quantized checkpoint format "
                              f"{meta.get('format') if isinstance(meta, dict) else None} (this code reads {FORMAT_VERSION})")
    from foundation.quant.config import check_arch

    arch = check_arch(meta.get("arch"), path)  # the artefact gate first
    try:  # the rest of quant.json (folded pairs, sites, specs) only names modules and sizes: a bad one is one line
        return _rebuild(path, meta, arch, device)
    except (*BUILD_ERRORS, SafetensorError) as e:
        raise does_not_build(meta_file, e) from None


def _rebuild(path: Path, meta: dict, arch: dict, device) -> nn.Module:
    from safetensors.torch import load_file

    model = build_architecture(arch).eval()
    replace_attention(model, meta.get("linear_attention", []))
    for conv_name, bn_name in meta["folded_bn"]:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        parent, _, attr = bn_name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, _replacement(getattr(owner, attr)))
    sites = [Site(**s) for s in meta["sites"]]
    cfg = meta["config"]
    apply_placement(model, sites, QSpec(**meta["wspec"]), QSpec(**meta["aspec"]),
                    cfg["observers"]["weight"], cfg["observers"]["act"])
    state = load_file(str(path / "model.safetensors"))
    for name in meta.get("scaled_shortcuts", []):  # post-LN gamma migration (Outlier Suppression on BERT)
        scale_shortcut(model.get_submodule(name), state[f"{name}.shortcut_scale"])
    model.load_state_dict(state, strict=True)
    model.quant_sites = sites
    model.quant_meta = {k: meta.get(k, []) for k in ("linear_attention", "folded_bn", "wspec", "aspec", "config", "scaled_shortcuts")}
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# evaluation


def evaluate(batches, predictors: dict[str, Callable[[Tensor], Tensor]], max_images: int | None = None
             ) -> tuple[dict[str, Tensor], Tensor]:
    """Top-1 predictions of every predictor on the same ``(images, labels)`` batches, in one pass.

    Predictors take a CPU image batch and return logits (any device / numpy). Returns
    ``({name: predictions}, labels)``.
    """
    import numpy as np

    preds: dict[str, list[Tensor]] = {k: [] for k in predictors}
    labels: list[Tensor] = []
    seen = 0
    for images, y in batches:
        if max_images is not None and seen >= max_images:
            break
        if max_images is not None:
            images, y = images[: max_images - seen], y[: max_images - seen]
        for name, fn in predictors.items():
            with torch.no_grad():
                out = fn(images)
            out = torch.from_numpy(out) if isinstance(out, np.ndarray) else out.detach().cpu()
            preds[name].append(out.argmax(-1))
        labels.append(y.cpu())
        seen += images.shape[0]
    return {k: torch.cat(v) for k, v in preds.items()}, torch.cat(labels)


def top1(pred: Tensor, labels: Tensor) -> float:
    return float((pred == labels).float().mean())


def agreement(a: Tensor, b: Tensor) -> float:
    """Fraction of images on which two models predict the same class."""
    return float((a == b).float().mean())
