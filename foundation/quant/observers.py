"""Observers: collect statistics of a tensor during calibration and turn them into a clipping range.

Each observer sees the tensor batch by batch (``update``) and returns ``(lo, hi)``, per tensor (0-d)
or per channel (1-d along ``spec.ch_axis``). The quantizer turns that range into a scale and zero
point with ``compute_qparams``.

- ``minmax``: running min and max (MQBench ``MinMaxObserver``).
- ``ema_minmax``: exponential moving average of each batch's min and max (``EMAMinMaxObserver``).
- ``mse``: per batch, shrink ``[min, max]`` by 1 %, 2 %, ... and keep the range whose fake-quantized
  tensor has the smallest ``L_p`` error (``MSEObserver``, p = 2 by default; p = 2.4 is the
  "Lp search" of Nahshan et al.; searched coarse-to-fine); ranges are averaged over batches.
- ``percentile``: the p-th and (100-p)-th percentiles of each batch, averaged over batches.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from foundation.quant.fake_quant import QSpec, compute_qparams, fake_quantize, lp_error

# Activations are large; range searches on a strided subsample are as good and far cheaper.
_MAX_SEARCH_ELEMENTS = 1 << 18


def _as_rows(x: Tensor, spec: QSpec) -> Tensor:
    """(C, K) per channel or (1, K) per tensor, detached, float32."""
    x = x.detach().float()
    if spec.per_channel:
        return x.transpose(0, spec.ch_axis).reshape(x.shape[spec.ch_axis], -1)
    return x.reshape(1, -1)


def _subsample(rows: Tensor) -> Tensor:
    if rows.shape[0] == 1 and rows.shape[1] > _MAX_SEARCH_ELEMENTS:
        step = rows.shape[1] // _MAX_SEARCH_ELEMENTS + 1
        return rows[:, ::step]
    return rows


def _finish(lo: Tensor, hi: Tensor, spec: QSpec) -> tuple[Tensor, Tensor]:
    return (lo, hi) if spec.per_channel else (lo.reshape(()), hi.reshape(()))


class Observer(abc.ABC):
    """Base: running ``lo``/``hi`` as (C,) vectors (C = 1 per tensor)."""

    def __init__(self, spec: QSpec) -> None:
        self.spec = spec
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.batches = 0

    @abc.abstractmethod
    def update(self, x: Tensor) -> None:
        """Fold one batch of the observed tensor into the running range."""

    def range(self) -> tuple[Tensor, Tensor]:
        if self.lo is None or self.hi is None:
            raise RuntimeError("observer saw no data: run calibration batches through the model first")
        return _finish(self.lo, self.hi, self.spec)


class MinMaxObserver(Observer):
    def update(self, x: Tensor) -> None:
        rows = _as_rows(x, self.spec)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.batches += 1


class EMAMinMaxObserver(Observer):
    def __init__(self, spec: QSpec, momentum: float = 0.9) -> None:
        super().__init__(spec)
        self.momentum = momentum

    def update(self, x: Tensor) -> None:
        rows = _as_rows(x, self.spec)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi
        self.batches += 1


class _AveragingObserver(Observer):
    """Averages a per-batch range estimate over batches."""

    @abc.abstractmethod
    def _batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(lo, hi) per row of one batch."""

    def update(self, x: Tensor) -> None:
        lo, hi = self._batch_range(_subsample(_as_rows(x, self.spec)))
        n = self.batches
        self.lo = lo if self.lo is None else (self.lo * n + lo) / (n + 1)
        self.hi = hi if self.hi is None else (self.hi * n + hi) / (n + 1)
        self.batches += 1


class MSEObserver(_AveragingObserver):
    """Search the clipping range ``shrink · [min, max]`` with the smallest ``L_p`` error.

    Candidates are ``shrink = 1, 0.99, …, 1 − 0.01·(steps − 1)`` (MQBench's grid). The search is
    coarse-to-fine — every 5th candidate, then the 1 % steps around the best one, per channel — which
    finds the grid's optimum whenever the error is unimodal in ``shrink`` at a third of the cost.
    """

    def __init__(self, spec: QSpec, p: float = 2.0, steps: int = 80) -> None:
        super().__init__(spec)
        self.p = p
        self.steps = steps

    def _errors(self, rows: Tensor, lo0: Tensor, hi0: Tensor, shrink: Tensor) -> Tensor:
        lo, hi = lo0 * shrink, hi0 * shrink
        scale, zp, qmin, qmax = compute_qparams(lo, hi, self.spec)
        xq = fake_quantize(rows, scale[:, None], zp[:, None], qmin, qmax)
        return lp_error(rows, xq, self.p, dims=(1,))

    def _batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        lo0, hi0 = rows.amin(dim=1), rows.amax(dim=1)
        floor = 1.0 - 0.01 * (self.steps - 1)
        best_shrink = torch.ones_like(lo0)
        best_err = torch.full_like(lo0, float("inf"))

        def consider(shrink: Tensor) -> None:
            nonlocal best_shrink, best_err
            err = self._errors(rows, lo0, hi0, shrink)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_shrink = torch.where(better, shrink, best_shrink)

        for i in range(0, self.steps, 5):
            consider(torch.full_like(lo0, 1.0 - 0.01 * i))
        center = best_shrink.clone()
        for d in (-4, -3, -2, -1, 1, 2, 3, 4):
            consider((center + 0.01 * d).clamp(floor, 1.0))
        return lo0 * best_shrink, hi0 * best_shrink


class PercentileObserver(_AveragingObserver):
    def __init__(self, spec: QSpec, percentile: float = 99.99) -> None:
        super().__init__(spec)
        self.q = percentile / 100.0

    def _batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        q = torch.tensor([1.0 - self.q, self.q], dtype=rows.dtype, device=rows.device)
        lo_hi = torch.quantile(rows, q, dim=1)  # (2, C)
        return lo_hi[0], lo_hi[1]


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema_minmax": EMAMinMaxObserver,
    "mse": MSEObserver,
    "percentile": PercentileObserver,
}


def build_observer(name: str, spec: QSpec, *, ema_momentum: float = 0.9, lp: float = 2.0,
                   mse_steps: int = 80, percentile: float = 99.99) -> Observer:
    """An observer by name (a key of ``OBSERVERS``) with its options."""
    if name == "ema_minmax":
        return EMAMinMaxObserver(spec, momentum=ema_momentum)
    if name == "mse":
        return MSEObserver(spec, p=lp, steps=mse_steps)
    if name == "percentile":
        return PercentileObserver(spec, percentile=percentile)
    if name == "minmax":
        return MinMaxObserver(spec)
    raise ValueError(f"unknown observer {name!r}; choose from {sorted(OBSERVERS)}")
