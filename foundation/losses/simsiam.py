"""SimSiam (Chen & He 2021) as DeCLIP's image self-supervision (ISS) on two augmented views.

Projector: 3 fully-connected layers, each followed by BatchNorm (ReLU after the first two); predictor:
a bottleneck of 2 layers (BN + ReLU on the hidden one, none on the output). The loss is the symmetric
negative cosine similarity between one view's prediction and the other's projection, the projection
behind a stop-gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SimSiamHead(nn.Module):
    """``forward(x) -> (z, p)``: projection z (B, dim) and prediction p (B, dim) of features x (B, in_dim)."""

    def __init__(self, in_dim: int, dim: int = 1024, pred_dim: int = 512):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim), nn.BatchNorm1d(dim),
        )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_dim, dim),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projector(x)
        return z, self.predictor(z)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """-cos(p, stopgrad(z)), averaged over the batch."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


def simsiam_loss(p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
    """Symmetric SimSiam loss: (D(p1, z2) + D(p2, z1)) / 2, in [-1, 1]."""
    return (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2


__all__ = ["SimSiamHead", "negative_cosine", "simsiam_loss"]
