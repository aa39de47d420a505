"""AdaRound (Nagel et al. 2020): learn whether each weight rounds down or up.

The quantized weight is ``s · (clamp(⌊w/s⌋ + h(V) + z, qmin, qmax) − z)`` with the rectified sigmoid
``h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)``, ζ = 1.1, γ = −0.1. ``V`` starts where ``h(V)`` equals the
fractional part of ``w/s`` (so the soft-quantized weight *is* the FP weight) and is trained against
the reconstruction error plus ``λ·Σ(1 − |2h − 1|^β)``, which pushes every ``h`` to 0 or 1 as β is
annealed from 20 to 2 after a warm-up. At the end rounding is hard: up where ``h(V) ≥ 0.5``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ZETA = 1.1
GAMMA = -0.1


class AdaRound(nn.Module):
    """The rounding variables ``V`` of one weight tensor (plugged into its ``Quantizer.rounding``)."""

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        w = weight.detach() / scale
        rest = w - torch.floor(w)  # in [0, 1)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    def h(self) -> Tensor:
        """Rectified sigmoid: the soft rounding offset in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def offset(self) -> Tensor:
        return self.h() if self.soft else (self.V >= 0).to(self.V.dtype)

    def forward(self, w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        q = torch.clamp(torch.floor(w / scale) + self.offset() + zero_point, qmin, qmax)
        return (q - zero_point) * scale

    def regularizer(self, beta: float) -> Tensor:
        """``Σ(1 − |2h − 1|^β)``: zero only when every ``h`` is exactly 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def beta_schedule(step: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float:
    """β at ``step``: ``start`` during the warm-up, then linear down to ``end`` at the last step."""
    warm = warmup * iters
    if step < warm:
        return start
    rel = (step - warm) / max(iters - warm, 1e-12)
    return end + (start - end) * max(0.0, 1.0 - rel)
