"""Calibration passes and batched inference on a stack of images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from foundation.quant.modules import quant_layers, quantizers


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """``model`` outputs for ``images`` (on the model's device), returned on the CPU."""
    device = model_device(model)
    outs = [model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def calibrate(qmodel: nn.Module, images: Tensor, batch_size: int = 64) -> None:
    """Set every quantizer's range: weights from the weights, activations from ``images``.

    Activation statistics are collected with weights fake-quantized and activations in floating
    point (the order MQBench uses); afterwards every quantizer is on.
    """
    for _, layer in quant_layers(qmodel):
        layer.weight_quant.calibrate_tensor(layer.weight)
    acts = [q for _, q in quantizers(qmodel, "act")]
    for q in acts:
        q.enabled = False
        q.start_observing()
    predict(qmodel, images, batch_size)
    for q in acts:
        q.finish_observing()
        q.enabled = True
