"""Uniform affine fake quantization: the arithmetic every quantizer in this package shares.

A tensor ``x`` is quantized with a scale ``s`` and an integer zero point ``z`` onto the grid
``[qmin, qmax]``, exactly as ONNX ``QuantizeLinear``/``DequantizeLinear`` define it (round half to
even *before* adding the zero point)::

    q = clamp(round(x / s) + z, qmin, qmax)          # QuantizeLinear
    x̂ = (q - z) · s                                  # DequantizeLinear

Gradients use the straight-through estimator for ``round`` so that step sizes can be learned
LSQ-style (Esser et al. 2020): ``d x̂ / d s`` flows through ``x / s`` and the final ``· s``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QSpec:
    """How one tensor is quantized.

    ``symmetric``: zero point 0 and a signed grid ``[-2^(b-1), 2^(b-1)-1]``; otherwise an unsigned grid
    ``[0, 2^b-1]`` with a zero point. ``unsigned_if_nonneg`` (OpenVINO): a symmetric tensor that is
    never negative (a ReLU output) uses the unsigned grid with zero point 0. ``pow2_scale`` (Vitis):
    scales are rounded up to a power of two.
    """

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    ch_axis: int = 0
    unsigned_if_nonneg: bool = False
    pow2_scale: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


def compute_qparams(lo: Tensor, hi: Tensor, spec: QSpec) -> tuple[Tensor, Tensor, int, int]:
    """Scale, zero point and grid for the clipping range ``[lo, hi]`` (per tensor or per channel).

    The range is widened to contain 0 so that zero (padding, ReLU) is represented exactly.
    Symmetric scales follow MQBench/PyTorch: ``max(|lo|, hi) / ((qmax - qmin) / 2)``.
    """
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    eps = torch.finfo(torch.float32).eps
    if spec.symmetric:
        if spec.unsigned_if_nonneg and bool((lo >= 0).all()):
            qmin, qmax = unsigned_range(spec.bits)
            scale = hi / qmax
        else:
            qmin, qmax = signed_range(spec.bits)
            scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        scale = scale.clamp_min(eps)
        if spec.pow2_scale:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        zero_point = torch.zeros_like(scale)
    else:
        qmin, qmax = unsigned_range(spec.bits)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
        if spec.pow2_scale:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point, qmin, qmax


def broadcast_shape(x: Tensor, ch_axis: int) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``ch_axis`` of ``x``."""
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return shape


def round_ste(x: Tensor) -> Tensor:
    """``round`` (half to even) in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) · s`` with a straight-through round.

    ``scale``/``zero_point`` are scalars or already broadcastable to ``x``.
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_int(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """The integer grid values (as float) that ``fake_quantize`` dequantizes."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def lp_error(x: Tensor, xq: Tensor, p: float, dims: tuple[int, ...] | None = None) -> Tensor:
    """Mean ``|x - xq|^p`` over ``dims`` (all dims when None)."""
    err = (x - xq).abs().pow(p)
    return err.mean() if dims is None else err.mean(dim=dims)
