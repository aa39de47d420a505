"""Outlier Suppression (Wei et al. 2022) for transformer backbones: gamma migration and token-wise clipping.

**Gamma migration.** A LayerNorm ``y = x̂ ⊙ γ + β`` amplifies a few channels (large ``γ``), which makes
its output hard to quantize. Write ``y = (x̂ + β/γ) ⊙ γ``: the LayerNorm keeps only ``x̂ + β/γ`` (the
"non-scaling" LayerNorm, whose output is quantized) and ``γ`` moves into every consumer of ``y`` —
for a Linear ``W y = (W diag γ)(x̂ + β/γ)``. In a post-LN network (BERT, the paper's case) ``y`` also
feeds the next residual sum, so the shortcut is multiplied by ``γ`` there: a module called as
``module(hidden, shortcut)`` with the LayerNorm's output as ``shortcut`` (BERT's ``attention.output``
and ``output``: ``LayerNorm(dense(hidden) + shortcut)``) gets a ``shortcut_scale`` buffer and computes
``LayerNorm(dense(hidden) + shortcut ⊙ γ)``. So BERT's ``embeddings.LayerNorm`` and each layer's
``output.LayerNorm`` move γ into the next layer's query/key/value and its ``attention.output``
shortcut, ``attention.output.LayerNorm`` into ``intermediate.dense`` and the ``output`` shortcut, and
the last one (open_clip's ``HFTextEncoder``: first-token or mean pooling, linear per channel) into
``proj``. The ViT/CeiT/CLIP blocks here are pre-LN: a LayerNorm output feeds only the following
Linear layers (``norm1 → attn.qkv``, ``norm2 → mlp.fc1``, final ``norm → head``) and the residual
stream never passes through it. Each migration is verified on a probe batch and undone if the output
changes — which is what happens for a LayerNorm with a consumer we cannot rescale; those are reported
as skipped. Channels with ``|γ| < 1e-5`` are left in place.

**Token-wise clipping.** Outliers sit in a few tokens. Coarse stage: for each activation quantizer
that sees tokens ``(B, N, D)``, collect each token's max and min over ``D``; the clipping range is
the α-quantile of the token maxima and the (1 − α)-quantile of the token minima (α = 1 gives the
plain min/max), with one α for the whole model chosen from a grid by the error of the model's final
output against the FP model. Fine stage: those step sizes are then learned (LSQ) on the same
final-output error.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from foundation.quant.calibrate import model_device, predict
from foundation.quant.config import OutlierConfig
from foundation.quant.modules import Quantizer, quantizers
from foundation.quant.placement import tensor_key

_MIN_GAMMA = 1e-5
_QUANTILE_MAX = 1 << 24  # torch.quantile's input limit


@torch.no_grad()
def _migrate(ln: nn.LayerNorm, linears: list[nn.Linear]) -> None:
    gamma = ln.weight.detach().clone()
    m = torch.where(gamma.abs() > _MIN_GAMMA, gamma, torch.ones_like(gamma))
    ln.weight.div_(m)
    if ln.bias is not None:
        ln.bias.div_(m)
    for lin in linears:
        lin.weight.mul_(m[None, :])


@torch.no_grad()
def _undo(ln: nn.LayerNorm, linears: list[nn.Linear], saved: list[Tensor]) -> None:
    params = [ln.weight] + ([ln.bias] if ln.bias is not None else []) + [lin.weight for lin in linears]
    for p, s in zip(params, saved):
        p.copy_(s)


_SCALED_CLASSES: dict[type, type] = {}


def _shortcut_scaled_class(cls: type) -> type:
    """``cls`` whose ``forward(hidden, shortcut, ...)`` multiplies ``shortcut`` by ``self.shortcut_scale``."""
    if cls not in _SCALED_CLASSES:
        def forward(self, hidden_states: Tensor, input_tensor: Tensor, *args, **kwargs):
            return cls.forward(self, hidden_states, input_tensor * self.shortcut_scale, *args, **kwargs)

        _SCALED_CLASSES[cls] = type(f"ShortcutScaled{cls.__name__}", (cls,), {"forward": forward, "_base_class": cls})
    return _SCALED_CLASSES[cls]


def scale_shortcut(module: nn.Module, scale: Tensor) -> None:
    """Make a post-LN output module (``forward(hidden, shortcut)``) multiply its shortcut by ``scale``, in
    place (a class swap plus a ``shortcut_scale`` buffer, saved in the state dict)."""
    if "shortcut_scale" in module._buffers:
        module.shortcut_scale.mul_(scale)
        return
    module.__class__ = _shortcut_scaled_class(type(module))
    module.register_buffer("shortcut_scale", scale.detach().clone())


def _unscale_shortcut(module: nn.Module) -> None:
    module.__class__ = module._base_class
    del module._buffers["shortcut_scale"]


def scaled_shortcuts(model: nn.Module) -> list[str]:
    """Names of the modules whose shortcut ``scale_shortcut`` rescaled (recorded with a quantized model)."""
    return [n for n, m in model.named_modules() if "shortcut_scale" in m._buffers]


def _hf_pooled_projection(module: nn.Module) -> str | None:
    """open_clip ``HFTextEncoder`` with first-token or mean pooling (linear per channel): the Linear that
    the pooled last hidden state goes into (relative name), else None."""
    try:
        from open_clip.hf_model import ClsLastHiddenStatePooler, HFTextEncoder, MeanPooler
    except ImportError:
        return None
    if not isinstance(module, HFTextEncoder) or not isinstance(module.pooler, (ClsLastHiddenStatePooler, MeanPooler)):
        return None
    if isinstance(module.proj, nn.Linear):
        return "proj"
    if isinstance(module.proj, nn.Sequential) and isinstance(module.proj[0], nn.Linear):
        return "proj.0"
    return None


@torch.no_grad()
def _layernorm_consumers(model: nn.Module, example: Tensor) -> dict[str, tuple[list[str], list[str]]]:
    """LayerNorm name → (names of Linear layers whose input is exactly that LayerNorm's output, names of
    post-LN modules called as ``module(hidden, shortcut)`` with it as the shortcut)."""
    ln_out: dict[str, tuple] = {}
    lin_in: dict[str, tuple] = {}
    shortcut_in: dict[str, tuple] = {}
    alive: list[Tensor] = []
    handles = []

    def remember(store: dict, name: str, t: Tensor) -> None:
        if name not in store:
            alive.append(t)
            store[name] = tensor_key(t)

    def second_arg(name: str, args: tuple) -> None:
        if len(args) >= 2 and isinstance(args[1], Tensor) and args[1].is_floating_point():
            remember(shortcut_in, name, args[1])

    pooled: dict[str, str] = {}  # HFTextEncoder pooler name -> projection Linear name
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            handles.append(m.register_forward_hook(lambda mod, a, o, n=name: remember(ln_out, n, o)))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: remember(lin_in, n, a[0])))
        elif any(isinstance(c, nn.LayerNorm) for c in m.children()):  # a post-LN unit: LayerNorm(f(hidden) + shortcut)
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=name: second_arg(n, a)))
        if (proj := _hf_pooled_projection(m)) is not None:
            prefix = f"{name}." if name else ""
            pooled[prefix + "pooler"] = prefix + proj
            handles.append(m.pooler.register_forward_pre_hook(
                lambda mod, a, n=prefix + "pooler": remember(lin_in, pooled[n], a[0].last_hidden_state)))
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for ln, key in ln_out.items():
        users = [lin for lin, k in lin_in.items() if k == key]
        shortcuts = [m for m, k in shortcut_in.items() if k == key]
        if users:
            out[ln] = (users, shortcuts)
    # timm VisionTransformer: final norm → token pooling (linear over tokens) → head
    norm, head, fc_norm = (getattr(model, a, None) for a in ("norm", "head", "fc_norm"))
    if (isinstance(norm, nn.LayerNorm) and isinstance(head, nn.Linear) and isinstance(fc_norm, (nn.Identity, type(None)))
            and getattr(model, "attn_pool", None) is None and "norm" in ln_out and "norm" not in out):
        out["norm"] = (["head"], [])
    return out


@torch.no_grad()
def migrate_gamma(model: nn.Module, example: Tensor, rtol: float = 1e-4) -> dict:
    """Move every LayerNorm's γ into the Linear layers that consume it and, post-LN, into the residual
    shortcut it feeds (FP output unchanged), in place.

    Returns ``{"migrated": {ln: [linears and shortcut modules]}, "skipped": [ln, ...], "scaled_shortcuts": [...]}``.
    """
    model.eval()
    reference = model(example)
    tol = rtol * reference.abs().max().item() + 1e-6
    migrated, skipped = {}, []
    for ln_name, (lin_names, shortcut_names) in _layernorm_consumers(model, example).items():
        ln = model.get_submodule(ln_name)
        linears = [model.get_submodule(n) for n in lin_names]
        shortcuts = [model.get_submodule(n) for n in shortcut_names]
        saved = [p.detach().clone() for p in [ln.weight] + ([ln.bias] if ln.bias is not None else [])
                 + [lin.weight for lin in linears]]
        gamma = ln.weight.detach().clone()
        fresh = [m for m in shortcuts if "shortcut_scale" not in m._buffers]
        _migrate(ln, linears)
        for m in shortcuts:
            scale_shortcut(m, torch.where(gamma.abs() > _MIN_GAMMA, gamma, torch.ones_like(gamma)))
        if (model(example) - reference).abs().max().item() > tol:
            _undo(ln, linears, saved)
            for m in shortcuts:
                if m in fresh:
                    _unscale_shortcut(m)
                else:
                    m.shortcut_scale.div_(torch.where(gamma.abs() > _MIN_GAMMA, gamma, torch.ones_like(gamma)))
            skipped.append(ln_name)
        else:
            migrated[ln_name] = lin_names + [f"{n} (shortcut)" for n in shortcut_names]
    return {"migrated": migrated, "skipped": skipped, "scaled_shortcuts": scaled_shortcuts(model)}


def _quantile(v: Tensor, q: float) -> Tensor:
    if v.numel() > _QUANTILE_MAX:
        v = v[:: v.numel() // _QUANTILE_MAX + 1]
    return torch.quantile(v.float(), q)


def token_wise_range(token_max: Tensor, token_min: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Clipping range from per-token extremes: (quantile_{1−α}(minima), quantile_α(maxima))."""
    return _quantile(token_min, 1.0 - alpha), _quantile(token_max, alpha)


@torch.no_grad()
def collect_token_extremes(qmodel: nn.Module, images: Tensor, batch_size: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-token max and min over the feature dimension, for every activation quantizer fed ``(B, N, D)``.

    Collected with activation quantization off (weights quantized), like calibration.
    """
    acts = dict(quantizers(qmodel, "act"))
    seen: dict[str, tuple[list[Tensor], list[Tensor]]] = {}

    def hook_for(name: str):
        def hook(x: Tensor) -> None:
            if x.dim() == 3:
                mx, mn = seen.setdefault(name, ([], []))
                mx.append(x.detach().amax(-1).flatten().float().cpu())
                mn.append(x.detach().amin(-1).flatten().float().cpu())
        return hook

    enabled = {n: q.enabled for n, q in acts.items()}
    for n, q in acts.items():
        q.stats_hook, q.enabled = hook_for(n), False
    try:
        predict(qmodel, images, batch_size)
    finally:
        for n, q in acts.items():
            q.stats_hook, q.enabled = None, enabled[n]
    return {n: (torch.cat(mx), torch.cat(mn)) for n, (mx, mn) in seen.items()}


def token_wise_clipping(qmodel: nn.Module, fp_model: nn.Module, calib: Tensor, cfg: OutlierConfig, batch_size: int,
                        log: Callable[[str], None] | None = None) -> dict:
    """Coarse α search on the final-output error, then learned step sizes; sets the ranges in place."""
    t0 = time.perf_counter()
    images = calib[: cfg.search_images]
    extremes = collect_token_extremes(qmodel, images, batch_size)
    acts = dict(quantizers(qmodel, "act"))
    targets: dict[str, Quantizer] = {n: acts[n] for n in extremes}
    if not targets:
        return {"quantizers": 0}
    reference = predict(fp_model, images, batch_size)
    coarse = {}
    for alpha in cfg.alphas:
        for n, q in targets.items():
            q.set_range(*token_wise_range(*extremes[n], alpha))
        coarse[alpha] = torch.mean((predict(qmodel, images, batch_size) - reference) ** 2).item()
    best = min(coarse, key=coarse.get)
    for n, q in targets.items():
        q.set_range(*token_wise_range(*extremes[n], best))
    if log is not None:
        log(f"token-wise clipping: {len(targets)} quantizers, α = {best} (final-output MSE {coarse[best]:.4g})")

    fine_loss = coarse[best]
    if cfg.fine_iters > 0:
        saved = {n: q.scale.detach().clone() for n, q in targets.items()}
        _learn_scales(qmodel, fp_model, calib, list(targets.values()), cfg)
        fine_loss = torch.mean((predict(qmodel, images, batch_size) - reference) ** 2).item()
        if fine_loss > coarse[best]:  # learning made it worse on the search images: keep the coarse ranges
            for n, q in targets.items():
                q.scale.data.copy_(saved[n])
            fine_loss = coarse[best]
        if log is not None:
            log(f"token-wise clipping fine stage: final-output MSE {fine_loss:.4g}")
    return {"quantizers": len(targets), "alpha": best, "coarse": coarse, "fine_loss": fine_loss,
            "seconds": round(time.perf_counter() - t0, 3)}


def _learn_scales(qmodel: nn.Module, fp_model: nn.Module, calib: Tensor, targets: list[Quantizer],
                  cfg: OutlierConfig) -> None:
    device = model_device(qmodel)
    requires = {p: p.requires_grad for p in qmodel.parameters()}
    for p in qmodel.parameters():
        p.requires_grad_(False)
    for q in targets:
        q.learn_scale(True)
    opt = torch.optim.Adam([q.scale for q in targets], lr=cfg.fine_lr)
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(cfg.fine_iters):
            idx = torch.randint(calib.shape[0], (min(cfg.fine_batch_size, calib.shape[0]),), generator=generator)
            x = calib[idx].to(device)
            with torch.no_grad():
                target = fp_model(x)
            loss = torch.mean((qmodel(x) - target) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for q in targets:
            q.learn_scale(False)
            q.scale.data.clamp_(min=torch.finfo(torch.float32).eps)
        for p, r in requires.items():
            p.requires_grad_(r)
