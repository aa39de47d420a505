"""scikit-learn's ``load_digits``: 1,797 real 8x8 handwritten digits (UCI), shipped inside scikit-learn.

Pixels (0..16) are scaled to 0..255 and stored as 8x8 grey PNGs with the digit as label; 20% of each
class is held out as val (``--val-fraction`` to change).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foundation.data import DataError
from foundation.data.sources.base import BuildOptions, Plan, run_plan
from foundation.data.sources.idx import encode

CLASS_NAMES = [str(d) for d in range(10)]


def digits(out: Path, opts: BuildOptions, src: str | None = None) -> dict:
    """Build the digits shards (train / val) with class names ``0``..``9``; returns the manifest."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset ships with scikit-learn: pip install scikit-learn") from None
    if src is not None:
        raise DataError("digits has no --src: it ships inside scikit-learn")
    data = load_digits()
    pixels = np.clip(np.rint(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    tasks = [{"key": f"{i:04d}", "pixels": pixels[i], "label": int(data.target[i])} for i in range(len(pixels))]
    opts.val_fraction = opts.val_fraction or 0.2
    plan = Plan({"train": tasks}, encode, CLASS_NAMES, {"format": "sklearn", "dataset": "digits",
                                                        "path": "sklearn.datasets.load_digits"})
    return run_plan(plan, out, opts)


__all__ = ["CLASS_NAMES", "digits"]
