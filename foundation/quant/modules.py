"""Quantized modules: a ``Quantizer`` per tensor, and the wrappers that put quantizers into a model.

- ``QuantConv2d`` / ``QuantLinear`` replace ``nn.Conv2d`` / ``nn.Linear`` (same parameter names, so
  state dicts and weight surgery keep working) and hold a weight quantizer, an optional input
  quantizer and an optional output quantizer.
- ``QuantOutput`` wraps an activation or average-pool module and quantizes its output.

Where quantizers go is decided by ``placement.plan_placement``; this file only defines the parts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from foundation.quant.fake_quant import QSpec, broadcast_shape, compute_qparams, fake_quantize, round_ste
from foundation.quant.observers import Observer, build_observer

_FULL_8BIT_RANGES = {(0, 255), (-128, 127)}


class Quantizer(nn.Module):
    """Fake-quantizes one tensor: ``x̂ = (clamp(round(x / s) + z, qmin, qmax) − z) · s``.

    State (saved): ``scale``, ``zero_point`` (per tensor or per channel) and ``qrange = [qmin, qmax]``.
    Modes (not saved): ``observer`` set → statistics are collected; ``enabled`` False → identity;
    ``quant_prob`` < 1 → QDrop: each element is quantized with that probability, else kept in float;
    ``rounding`` set → AdaRound decides the weight rounding; ``export`` → ONNX-friendly ops
    (``QuantizeLinear``/``DequantizeLinear`` for 8 bits, float arithmetic below).
    """

    def __init__(self, spec: QSpec, observer: str = "minmax", observer_opts: dict | None = None,
                 role: str = "act") -> None:
        super().__init__()
        self.spec = spec
        self.role = role  # "weight" | "act"
        self.observer_name = observer
        self.observer_opts = dict(observer_opts or {})
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("qrange", torch.tensor([0, 2**spec.bits - 1], dtype=torch.int64))
        self.register_buffer("calibrated", torch.tensor(False))
        self.qmin, self.qmax = 0, 2**spec.bits - 1
        self.ready = False
        self.observer: Observer | None = None
        self.stats_hook = None  # callable(x) used by token-wise clipping to collect per-token ranges
        self.enabled = True
        self.quant_prob = 1.0
        self.rounding: nn.Module | None = None
        self.export = False

    # ---- calibration -------------------------------------------------------------------------
    def start_observing(self) -> None:
        self.observer = build_observer(self.observer_name, self.spec, **self.observer_opts)

    def finish_observing(self) -> None:
        if self.observer is None:
            raise RuntimeError("finish_observing() without start_observing()")
        lo, hi = self.observer.range()
        self.observer = None
        self.set_range(lo, hi)

    def calibrate_tensor(self, x: Tensor) -> None:
        """Calibrate on one tensor at once (weights)."""
        self.start_observing()
        self.observer.update(x)
        self.finish_observing()

    @torch.no_grad()
    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set scale/zero point from a clipping range ``[lo, hi]``."""
        scale, zp, qmin, qmax = compute_qparams(lo, hi, self.spec)
        device = self.qrange.device
        self._assign("scale", scale.to(device))
        self._assign("zero_point", zp.to(device))
        self.qrange.copy_(torch.tensor([qmin, qmax]))
        self.calibrated.fill_(True)
        self._sync()

    def _assign(self, name: str, value: Tensor) -> None:
        current = getattr(self, name)
        if isinstance(current, nn.Parameter):
            current.data = value.clone()
        else:
            setattr(self, name, value.clone())

    def _sync(self) -> None:
        self.qmin, self.qmax = int(self.qrange[0]), int(self.qrange[1])
        self.ready = bool(self.calibrated)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                self._assign(name, torch.empty_like(saved, device=self.qrange.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync()

    # ---- LSQ -----------------------------------------------------------------------------------
    def learn_scale(self, on: bool) -> None:
        """Turn the step size into a trainable parameter (LSQ) or back into a buffer."""
        value = self.scale.detach().clone()
        del self.scale
        if on:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    # ---- forward -------------------------------------------------------------------------------
    def _qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.spec.per_channel:
            shape = broadcast_shape(x, self.spec.ch_axis)
            return self.scale.view(shape), self.zero_point.view(shape)
        return self.scale, self.zero_point

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(x)
        if self.stats_hook is not None:
            self.stats_hook(x)
        if not self.enabled or not self.ready:
            return x
        if self.export:
            return self._export_forward(x)
        scale, zp = self._qparams(x)
        if self.rounding is not None:
            return self.rounding(x, scale, zp, self.qmin, self.qmax)
        xq = fake_quantize(x, scale, zp, self.qmin, self.qmax)
        if self.quant_prob >= 1.0:
            return xq
        if self.quant_prob <= 0.0:
            return x
        return torch.where(torch.rand_like(x) < self.quant_prob, xq, x)

    def apply(self, x: Tensor) -> Tensor:
        """Quantize with the current parameters only (no statistics, no AdaRound) — for a max pool
        that reuses this quantizer: its input is already on this grid, so this is exact. While QDrop
        keeps some elements in float, they stay float here too."""
        if not self.enabled or not self.ready:
            return x
        if self.export:
            return self._export_forward(x)
        if self.quant_prob < 1.0:
            return x
        scale, zp = self._qparams(x)
        return fake_quantize(x, scale, zp, self.qmin, self.qmax)

    def _export_forward(self, x: Tensor) -> Tensor:
        scale = self.scale.detach().float()
        zp = self.zero_point.detach()
        if (self.qmin, self.qmax) in _FULL_8BIT_RANGES:
            if self.spec.per_channel:
                return torch.fake_quantize_per_channel_affine(
                    x, scale, zp.round().int(), self.spec.ch_axis, self.qmin, self.qmax)
            return torch.fake_quantize_per_tensor_affine(x, scale, zp.round().int(), self.qmin, self.qmax)
        scale, zp = self._qparams(x)
        return fake_quantize(x, scale.detach(), zp.detach(), self.qmin, self.qmax)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.spec.per_channel else "per-tensor"
        sym = "sym" if self.spec.symmetric else "asym"
        return f"{self.role}, {self.spec.bits} bit, {sym}, {kind}, range=[{self.qmin}, {self.qmax}]"


class _BiasQuant:
    """Shared by QuantConv2d/QuantLinear: the int32 bias integer kernels use.

    With a quantized input (scale ``s_x``: own input quantizer, or ``input_source`` — the upstream
    quantizer that already quantized it) and quantized weights (``s_w``), onnxruntime and TensorRT
    add ``round(b / (s_x·s_w))`` in int32. Simulating that rounding keeps simulation and deployment
    identical (it is far below one output step, but flips a few roundings otherwise).
    """

    @property
    def input_source(self) -> Quantizer | None:
        src = self.__dict__.get("_input_source")
        return src[0] if src else None

    def set_input_source(self, q: Quantizer | None) -> None:
        self.__dict__["_input_source"] = [q] if q is not None else []  # not a submodule: saved once

    def _quant_forward(self, x: Tensor, op) -> Tensor:
        """input quantizer → ``op(x, quantized weight, quantized bias)`` → output quantizer."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        y = op(x, self.weight_quant(self.weight), self.quant_bias())
        return self.output_quant(y) if self.output_quant is not None else y

    def quant_bias(self) -> Tensor | None:
        b = self.bias
        iq = self.input_quant if self.input_quant is not None else self.input_source
        wq = self.weight_quant
        if b is None or iq is None or not (iq.enabled and iq.ready and wq.enabled and wq.ready):
            return b
        s = (iq.scale * wq.scale).reshape(-1) if wq.spec.per_channel else iq.scale * wq.scale
        return round_ste(b / s) * s


class QuantConv2d(_BiasQuant, nn.Conv2d):
    """``nn.Conv2d`` with a weight quantizer and optional input/output quantizers."""

    input_quant: Quantizer | None
    output_quant: Quantizer | None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quant: Quantizer, input_quant: Quantizer | None,
                   output_quant: Quantizer | None) -> QuantConv2d:
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q.weight_quant, q.input_quant, q.output_quant = weight_quant, input_quant, output_quant
        return q.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        return self._quant_forward(x, self._conv_forward)


class QuantLinear(_BiasQuant, nn.Linear):
    """``nn.Linear`` with a weight quantizer and optional input/output quantizers."""

    input_quant: Quantizer | None
    output_quant: Quantizer | None

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quant: Quantizer, input_quant: Quantizer | None,
                   output_quant: Quantizer | None) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q.weight_quant, q.input_quant, q.output_quant = weight_quant, input_quant, output_quant
        return q.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return self._quant_forward(x, nn.functional.linear)


class QuantOutput(nn.Module):
    """Runs ``module`` and quantizes its output (activations, pools).

    ``tied``: reuse another site's quantizer (not registered here, so its state is saved once) —
    for max pooling, whose output lies on its input's grid.
    """

    def __init__(self, module: nn.Module, output_quant: Quantizer | None, tied: Quantizer | None = None) -> None:
        super().__init__()
        self.module = module
        self.output_quant = output_quant
        self._tied = [tied] if tied is not None else []  # a list: not registered as a submodule

    def forward(self, *args, **kwargs) -> Tensor:
        y = self.module(*args, **kwargs)
        if self.output_quant is not None:
            return self.output_quant(y)
        return self._tied[0].apply(y) if self._tied else y


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def quantizers(model: nn.Module, role: str | None = None) -> Iterator[tuple[str, Quantizer]]:
    """All quantizers (``role`` "weight" or "act" to filter), with their qualified names."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer) and (role is None or m.role == role):
            yield name, m


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            yield name, m


def set_quant_state(model: nn.Module, weight: bool | None = None, act: bool | None = None) -> None:
    """Switch weight and/or activation quantization on or off (None leaves it as it is)."""
    for _, q in quantizers(model):
        flag = weight if q.role == "weight" else act
        if flag is not None:
            q.enabled = flag


def set_quant_prob(model: nn.Module, prob: float) -> None:
    """QDrop: probability that an activation element is quantized (1.0: always, as in BRECQ)."""
    for _, q in quantizers(model, "act"):
        q.quant_prob = prob


def set_export(model: nn.Module, on: bool) -> None:
    for _, q in quantizers(model):
        q.export = on
