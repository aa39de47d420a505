"""Round-to-nearest: the calibrated ranges and plain rounding, nothing learned (the baseline)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from foundation.quant.config import QuantConfig


def rtn(qmodel: nn.Module, fp_model: nn.Module, calib: Tensor, cfg: QuantConfig,
        log: Callable[[str], None] | None = None) -> dict:
    """Nothing to optimise: calibration already set every scale, weights round to nearest."""
    return {}
