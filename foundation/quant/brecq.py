"""Reconstruction-based PTQ: AdaRound (layer by layer), BRECQ (block by block) and QDrop.

All three run the same loop over *units* in forward order. For each unit:

1. cache its input in the quantized model (everything before it already quantized) and its input
   and output in the FP model, on the calibration images;
2. learn the AdaRound variables of every weight in the unit (and, for BRECQ/QDrop, the activation
   step sizes LSQ-style) to minimise ``‖unit_q(x) − unit_fp(x_fp)‖²`` (summed over channels,
   averaged over the rest, as in the reference code) plus the rounding regulariser;
3. round hard, bake the rounded weights in, freeze the step sizes.

QDrop (Wei et al. 2022) differs in one place: while a unit is reconstructed, every activation
element — the unit's input and every activation quantizer inside it — is quantized with
probability ``quant_prob`` and left in floating point otherwise. ``quant_prob = 1`` never draws a
random number and is BRECQ, bit for bit. BRECQ's Fisher-weighted block loss is replaced by the
plain MSE (as QDrop's reference implementation does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from foundation.quant.adaround import AdaRound, beta_schedule
from foundation.quant.blocks import find_blocks
from foundation.quant.config import QuantConfig, ReconstructionConfig
from foundation.quant.modules import QUANT_LAYERS, Quantizer, quant_layers, quantizers


@dataclass
class Unit:
    """A reconstruction unit: a block, or a layer plus the activation module fused after it."""

    name: str
    modules: list[nn.Module]  # run in sequence
    kind: str  # "block" | "layer"
    quantizers: list[Quantizer] = field(default_factory=list)
    args: tuple = ()  # further (non-tensor) arguments of the first module, e.g. CeiT's grid size
    kwargs: dict = field(default_factory=dict)

    def __call__(self, x: Tensor) -> Tensor:
        x = self.modules[0](x, *self.args, **self.kwargs)
        for m in self.modules[1:]:
            x = m(x)
        return x


class _Stop(Exception):
    pass


def _call_order(model: nn.Module, names: list[str], example: Tensor) -> list[str]:
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def find_units(qmodel: nn.Module, granularity: str, example: Tensor) -> list[Unit]:
    """Reconstruction units in forward order: blocks (``granularity="block"``) and the layers outside
    them, or every layer (``"layer"``). A layer whose output feeds an activation module directly
    (from the placement plan) takes that activation with it."""
    fused_act = {s.name: s.act for s in getattr(qmodel, "quant_sites", [])}
    layer_names = [n for n, _ in quant_layers(qmodel)]
    blocks = [n for n, _, _ in find_blocks(qmodel)] if granularity == "block" else []
    outside = [n for n in layer_names if not any(n.startswith(b + ".") for b in blocks)]
    order = _call_order(qmodel, blocks + outside, example)
    units = []
    for n in order:
        if n in blocks:
            units.append(Unit(n, [qmodel.get_submodule(n)], "block"))
        else:
            mods = [qmodel.get_submodule(n)]
            if fused_act.get(n):
                mods.append(qmodel.get_submodule(fused_act[n]))
            units.append(Unit(n, mods, "layer"))
    for u in units:
        u.quantizers = [q for m in u.modules for _, q in quantizers(m)]
    return units


@torch.no_grad()
def capture(model: nn.Module, first: nn.Module, last: nn.Module, images: Tensor, batch_size: int,
            want_output: bool) -> tuple[Tensor, Tensor | None, tuple, dict]:
    """Inputs of ``first`` (and outputs of ``last``) over ``images``, stored on the CPU, plus the
    further arguments ``first`` was called with (tensors among them must be constants: the same object
    in every call, like a causal attention mask).

    The forward pass stops as soon as what is needed has been seen.
    """
    device = next(model.parameters()).device
    ins: list[Tensor] = []
    outs: list[Tensor] = []
    extra: list = []

    def pre(m, args, kwargs):
        if not extra:
            extra.append((args[1:], kwargs))
        elif not _same_extras(extra[0], (args[1:], kwargs)):
            raise NotImplementedError(f"{type(m).__name__} takes tensor arguments besides its input that change "
                                      "between calls (e.g. a per-sample padding mask); reconstruct it layer by "
                                      "layer (method adaround) instead")
        ins.append(args[0].detach().to("cpu", copy=True))
        if not want_output:
            raise _Stop

    def post(m, args, out):
        outs.append(out.detach().to("cpu", copy=True))
        raise _Stop

    handles = [first.register_forward_pre_hook(pre, with_kwargs=True)]
    if want_output:
        handles.append(last.register_forward_hook(post))
    try:
        for start in range(0, images.shape[0], batch_size):
            try:
                model(images[start:start + batch_size].to(device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return torch.cat(ins), (torch.cat(outs) if want_output else None), *extra[0]


def _same_extras(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """Whether two calls' further arguments agree: tensors must be the very same object (a constant
    such as open_clip's causal attention mask buffer), everything else equal."""
    (a_args, a_kw), (b_args, b_kw) = a, b
    if len(a_args) != len(b_args) or a_kw.keys() != b_kw.keys():
        return False
    pairs = [*zip(a_args, b_args), *((a_kw[k], b_kw[k]) for k in a_kw)]
    return all(x is y if isinstance(x, Tensor) or isinstance(y, Tensor) else x == y for x, y in pairs)


def _rec_loss(out: Tensor, target: Tensor) -> Tensor:
    channel_dim = 1 if out.dim() == 4 else -1
    return (out - target).pow(2).sum(channel_dim).mean()


MAX_LR_SCALE = 100.0
MAX_STEP_SIZE_MOVE = 0.01  # of a step size's calibrated value, per iteration


def step_size_groups(scales: list[Tensor], lr: float) -> list[dict]:
    """One Adam group per activation step size, its rate ``lr`` but at most ``MAX_STEP_SIZE_MOVE`` × its
    calibrated value (the smallest element's). Adam moves a parameter by about its rate per iteration whatever
    its magnitude: the scaled rate (4e-5 × 100 = 4e-3 at a few iterations) can exceed a whole 8-bit step of a
    small activation and drive it to zero or past it in a few iterations (a W8A8 QDrop DeCLIP at 3 iterations:
    zero-shot 1.00 → 0.25 without this cap). The cap binds at 3 bits too: BRECQ W3A3 on a digits ResNet-18
    97.68 ± 0.43 with it, 99.26 ± 0.32 without (docs/quantization.md)."""
    return [{"params": [s], "lr": min(lr, MAX_STEP_SIZE_MOVE * float(s.detach().abs().min()))} for s in scales]


def lr_scale(rcfg: ReconstructionConfig) -> float:
    """Multiplier of ``w_lr`` and ``a_lr`` for ``rcfg.iters``: ``lr_reference_iters / iters``, between 1 and
    ``MAX_LR_SCALE``. Adam moves a parameter by about lr per step, so the papers' rates (set for 20,000
    iterations) leave V where it started after a few hundred: the rounding stays soft (h ≈ the fractional
    part) until the end and the hard rounding is round-to-nearest.

    The LSQ activation step sizes are scaled too. Issue 24 suspected that this walks 3-bit step sizes away
    from calibration (BRECQ 81.0 against AdaRound 93.2 at W3A3); over 3 seeds on a digits ResNet-18 the
    scaled rate was the better one (BRECQ 99.26 ± 0.32 against 97.12 ± 1.13 with a_lr absolute; AdaRound
    below both) — docs/quantization.md, *Activation step sizes at 3 bits*."""
    if rcfg.lr_reference_iters is None:
        return 1.0
    return min(max(rcfg.lr_reference_iters / rcfg.iters, 1.0), MAX_LR_SCALE)


def reconstruct_unit(unit: Unit, q_in: Tensor, fp_in: Tensor, fp_out: Tensor, rcfg: ReconstructionConfig, *,
                     quant_prob: float, learn_act: bool, generator: torch.Generator) -> dict:
    """Optimise one unit's rounding (and step sizes); leaves it hard-rounded with frozen step sizes."""
    layers = [m for mod in unit.modules for m in mod.modules() if isinstance(m, QUANT_LAYERS)]
    device = layers[0].weight.device
    rounders = []
    for layer in layers:
        wq = layer.weight_quant
        if wq.enabled and wq.ready:
            scale, _ = wq._qparams(layer.weight)
            wq.rounding = AdaRound(layer.weight, scale).to(device)
            rounders.append(wq.rounding)
    act_qs = [q for q in unit.quantizers if q.role == "act" and q.enabled and q.ready]
    if learn_act:
        for q in act_qs:
            q.learn_scale(True)
    for q in act_qs:
        q.quant_prob = quant_prob

    lr_factor = lr_scale(rcfg)
    w_opt = torch.optim.Adam([r.V for r in rounders], lr=rcfg.w_lr * lr_factor) if rounders else None
    a_params = [q.scale for q in act_qs] if learn_act else []
    a_opt = torch.optim.Adam(step_size_groups(a_params, rcfg.a_lr * lr_factor), lr=rcfg.a_lr) if a_params else None
    a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=rcfg.iters, eta_min=0.0) if a_opt else None

    n = q_in.shape[0]
    warm = rcfg.warmup * rcfg.iters
    rec = torch.zeros(())
    for step in range(rcfg.iters):
        idx = torch.randint(n, (min(rcfg.batch_size, n),), generator=generator)
        x = q_in[idx].to(device)
        if quant_prob < 1.0:
            x = torch.where(torch.rand_like(x) < quant_prob, x, fp_in[idx].to(device))
        with torch.enable_grad():
            rec = _rec_loss(unit(x), fp_out[idx].to(device))
            loss = rec
            if rounders and step >= warm:
                beta = beta_schedule(step, rcfg.iters, rcfg.warmup, rcfg.beta_start, rcfg.beta_end)
                loss = loss + rcfg.round_weight * sum(r.regularizer(beta) for r in rounders)
            if w_opt is None and a_opt is None:
                break
            for opt in (w_opt, a_opt):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            loss.backward()
        for opt in (w_opt, a_opt):
            if opt is not None:
                opt.step()
        if a_sched is not None:
            a_sched.step()

    with torch.no_grad():
        soft_h = torch.cat([r.h().flatten() for r in rounders]) if rounders else torch.zeros(0)
        for layer in layers:
            wq = layer.weight_quant
            if wq.rounding is not None:
                wq.rounding.soft = False
                layer.weight.copy_(wq(layer.weight))  # bake the hard rounding: RTN now reproduces it
                wq.rounding = None
        hard = _rec_loss(unit(x), fp_out[idx].to(device)) if rcfg.iters else rec  # same batch, hard rounding
    for q in act_qs:
        if learn_act:
            q.learn_scale(False)
            q.scale.data.clamp_(min=torch.finfo(torch.float32).eps)
        q.quant_prob = 1.0
    undecided = float(((soft_h > 0.01) & (soft_h < 0.99)).float().mean()) if soft_h.numel() else 0.0
    return {"unit": unit.name, "kind": unit.kind, "final_rec_loss": float(rec.detach()),
            "hard_rec_loss": float(hard), "undecided_rounding": undecided}


def reconstruct(qmodel: nn.Module, fp_model: nn.Module, calib: Tensor, cfg: QuantConfig, *, granularity: str,
                quant_prob: float, learn_act: bool, log: Callable[[str], None] | None = None) -> dict:
    """Reconstruct every unit of ``qmodel`` in order against ``fp_model`` (same architecture, FP)."""
    device = next(qmodel.parameters()).device
    # QDrop's masks come from the global generator: seed it, without disturbing the caller's stream
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        return _reconstruct(qmodel, fp_model, calib, cfg, granularity, quant_prob, learn_act, log)


def _reconstruct(qmodel: nn.Module, fp_model: nn.Module, calib: Tensor, cfg: QuantConfig, granularity: str,
                 quant_prob: float, learn_act: bool, log: Callable[[str], None] | None) -> dict:
    rcfg = cfg.reconstruction
    generator = torch.Generator().manual_seed(cfg.seed)
    device = next(qmodel.parameters()).device
    for p in qmodel.parameters():
        p.requires_grad_(False)
    units = find_units(qmodel, granularity, calib[:1].to(device))
    results = []
    for i, unit in enumerate(units):
        t0 = time.perf_counter()
        fp_first = fp_model.get_submodule(unit.name)
        fp_last = fp_model.get_submodule(_last_name(qmodel, unit))
        fp_in, fp_out, _, _ = capture(fp_model, fp_first, fp_last, calib, cfg.batch_size, want_output=True)
        q_in, _, unit.args, unit.kwargs = capture(qmodel, unit.modules[0], unit.modules[0], calib, cfg.batch_size,
                                                  want_output=False)
        res = reconstruct_unit(unit, q_in, fp_in, fp_out, rcfg, quant_prob=quant_prob, learn_act=learn_act,
                               generator=generator)
        res["seconds"] = round(time.perf_counter() - t0, 3)
        results.append(res)
        if log is not None:
            log(f"[{i + 1}/{len(units)}] {unit.kind} {unit.name}: rec loss {res['final_rec_loss']:.4g} "
                f"({res['seconds']:.1f} s)")
    return {"units": results}


def _last_name(qmodel: nn.Module, unit: Unit) -> str:
    """The FP-model name of the unit's last module (a fused activation is wrapped in the quantized model)."""
    last = unit.modules[-1]
    for name, m in qmodel.named_modules():
        if m is last:
            return name
    raise KeyError(unit.name)


def adaround(qmodel: nn.Module, fp_model: nn.Module, calib: Tensor, cfg: QuantConfig,
             log: Callable[[str], None] | None = None) -> dict:
    """AdaRound: layer-wise rounding; activation ranges stay as calibrated."""
    return reconstruct(qmodel, fp_model, calib, cfg, granularity="layer", quant_prob=1.0, learn_act=False, log=log)


def brecq(qmodel: nn.Module, fp_model: nn.Module, calib: Tensor, cfg: QuantConfig,
          log: Callable[[str], None] | None = None) -> dict:
    """BRECQ: block-wise rounding plus LSQ activation step sizes, always quantized (QDrop with p = 1)."""
    return reconstruct(qmodel, fp_model, calib, cfg, granularity="block", quant_prob=1.0,
                       learn_act=cfg.reconstruction.learn_act_scale, log=log)


def qdrop(qmodel: nn.Module, fp_model: nn.Module, calib: Tensor, cfg: QuantConfig,
          log: Callable[[str], None] | None = None) -> dict:
    """QDrop: BRECQ where each activation element is quantized with probability ``quant_prob``."""
    return reconstruct(qmodel, fp_model, calib, cfg, granularity="block",
                       quant_prob=cfg.reconstruction.quant_prob,
                       learn_act=cfg.reconstruction.learn_act_scale, log=log)
