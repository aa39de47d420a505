"""Symmetric InfoNCE (CLIP) across ranks, in open_clip's local-loss form.

Each rank scores its own B rows against the columns of every rank (gathered with gradient), with the
positives on the diagonal block of this rank: labels ``rank * B + arange(B)``. Summed over ranks (DDP
averages the gradients) this is exactly the loss of one process on the whole global batch, at
O(B x world B) memory per rank instead of O((world B)^2). Every rank must hold the same B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from foundation.engine.collectives import all_gather_with_grad, world


def _labels(n: int, device: torch.device) -> Tensor:
    rank, _ = world()
    return torch.arange(n, device=device) + rank * n


def one_way_infonce(query: Tensor, all_keys: Tensor, scale: Tensor) -> Tensor:
    """Cross-entropy of ``query`` (B, E) against the gathered ``all_keys`` (world B, E); the positive
    of row i is key ``rank * B + i``. Features are expected L2-normalised; ``scale`` = 1 / temperature."""
    logits = scale.float() * query.float() @ all_keys.float().t()  # (B, world B)
    return F.cross_entropy(logits, _labels(query.shape[0], query.device))


def infonce(image: Tensor, text: Tensor, scale: Tensor, all_image: Tensor | None = None,
            all_text: Tensor | None = None) -> Tensor:
    """(image -> text + text -> image) / 2 for normalised (B, E) embeddings of matching pairs.

    ``all_image`` / ``all_text`` are the gathered embeddings of every rank when the caller has them
    already (several pairs share one gather); by default they are gathered here, with gradient."""
    all_image = all_gather_with_grad(image) if all_image is None else all_image
    all_text = all_gather_with_grad(text) if all_text is None else all_text
    return (one_way_infonce(image, all_text, scale) + one_way_infonce(text, all_image, scale)) / 2


def multi_view_infonce(images: Sequence[Tensor], texts: Sequence[Tensor], scale: Tensor) -> Tensor:
    """DeCLIP's multi-view supervision: the mean of ``infonce`` over every (image view, text view)
    pair (2 x 2 = 4 terms for two augmented images and a caption with its EDA variant); each view is
    gathered once."""
    all_images = [all_gather_with_grad(x) for x in images]
    all_texts = [all_gather_with_grad(t) for t in texts]
    terms = [infonce(i, t, scale, ai, at) for i, ai in zip(images, all_images) for t, at in zip(texts, all_texts)]
    return torch.stack(terms).mean()


__all__ = ["infonce", "multi_view_infonce", "one_way_infonce"]
