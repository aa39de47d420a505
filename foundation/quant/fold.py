"""Batch-norm folding: ``BN(conv(x))`` → ``conv'(x)`` with ``W' = W·γ/σ`` and ``b' = (b − μ)·γ/σ + β``.

Conv→BN pairs are found from the data flow of one probe forward pass (the BN's input is the conv's
output tensor, unmodified: ``placement.tensor_key``), so any module layout works: timm ResNets (``conv1``/``bn1``, downsample
``Sequential``), MobileNets (``BatchNormAct2d``, whose activation stays in place of the BN), etc.
The folded model is checked against the original on the probe batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from foundation.quant.placement import tensor_key


def _replacement(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays after folding: timm's BatchNormAct2d keeps its activation; plain BN disappears.

    (BatchNormAct2d's ``drop`` is a training-time regulariser and an identity in eval mode.)
    """
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) else nn.Identity()


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d, in place.

    Returns the folded (conv name, bn name) pairs. Raises if the folded model's output differs.
    """
    model.eval()
    conv_out: dict[str, tuple] = {}
    bn_in: dict[str, tuple] = {}
    alive: list[Tensor] = []  # keeps recorded tensors alive so their storage is not reused
    handles = []
    modules = dict(model.named_modules())

    def remember(store: dict, name: str, t: Tensor) -> None:
        if name not in store:
            alive.append(t)
            store[name] = tensor_key(t)

    for name, m in modules.items():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda mod, a, out, name=name: remember(conv_out, name, out)))
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            handles.append(m.register_forward_pre_hook(lambda mod, a, name=name: remember(bn_in, name, a[0])))
    try:
        reference = model(example)
    finally:
        for h in handles:
            h.remove()
    alive.clear()

    producer = {key: conv for conv, key in conv_out.items()}
    pairs = [(producer[key], bn) for bn, key in bn_in.items() if key in producer]

    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
        beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
        g = gamma * inv_std  # (C_out,)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * g.view(-1, 1, 1, 1))
        new_bias = (bias - bn.running_mean) * g + beta
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.detach().clone())
        else:
            conv.bias.copy_(new_bias)
        parent_name, _, attr = bn_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _replacement(bn))

    out = model(example)
    tol = 1e-3 * reference.abs().max().item() + 1e-5
    err = (out - reference).abs().max().item()
    if err > tol:
        raise RuntimeError(f"batch-norm folding changed the model output by {err:.3g} (tolerance {tol:.3g}); "
                           f"folded pairs: {pairs}")
    return pairs
