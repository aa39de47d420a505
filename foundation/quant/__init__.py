"""Post-training quantization of finished checkpoints.

``METHODS`` maps a method name to ``fn(qmodel, fp_model, calib_images, cfg, log) -> dict``: it runs
after BN folding, quantizer placement and calibration, and changes the quantized model in place.
Adding a method: one file here, one line below and its name in ``config.METHOD_NAMES`` (the recipe schema
checks names without importing the methods). See docs/quantization.md.
"""

from foundation.quant.brecq import adaround, brecq, qdrop
from foundation.quant.rtn import rtn

METHODS = {
    "rtn": rtn,
    "adaround": adaround,
    "brecq": brecq,
    "qdrop": qdrop,
}