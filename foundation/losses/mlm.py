"""Masked language modelling (BERT, Devlin et al. 2019) as DeCLIP's text self-supervision (TSS).

Of the tokens that are not special (start/end of text, padding after the end), ``mask_prob`` are
selected; a selected token becomes the mask token with probability 0.8, a random ordinary token with
0.1, and stays unchanged with 0.1. The loss is the cross-entropy of a linear head on the text tower's
token outputs at the selected positions only (a full (B, L, vocab) logit tensor is never built).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100  # label of positions that are not predicted


def special_token_mask(tokens: Tensor, sot_id: int, eot_id: int) -> Tensor:
    """True at start/end-of-text tokens and at the padding after the end of text. Padding is found by
    position, since open_clip pads with id 0, which is also an ordinary token."""
    is_eot = tokens == eot_id
    after_eot = (is_eot.long().cumsum(dim=1) - is_eot.long()) > 0  # strictly after the first EOT
    return (tokens == sot_id) | is_eot | after_eot


def mask_tokens(tokens: Tensor, *, mask_id: int, sot_id: int, eot_id: int, num_ordinary: int,
                mask_prob: float = 0.15, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(masked tokens (B, L), labels (B, L): the original id at selected positions, ``IGNORE`` elsewhere).

    Random replacements are drawn from the ordinary ids ``[0, num_ordinary)``."""
    shape, device = tokens.shape, tokens.device
    rand = lambda: torch.rand(shape, device=device, generator=generator)  # noqa: E731
    selected = (rand() < mask_prob) & ~special_token_mask(tokens, sot_id, eot_id)
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE))
    action = rand()
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(num_ordinary, shape, device=device, generator=generator)
    masked = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mlm_loss(token_features: Tensor, labels: Tensor, head: nn.Module) -> Tensor:
    """Cross-entropy of ``head`` (width -> vocab) on the token features (B, L, width) at labelled
    positions. With no labelled position the loss is an exact 0 that still touches ``head`` (so DDP
    sees every parameter used)."""
    selected = labels != IGNORE
    if not bool(selected.any()):
        return head(token_features[:, 0]).sum() * 0.0
    logits = head(token_features[selected])  # (M, vocab)
    return F.cross_entropy(logits.float(), labels[selected])


__all__ = ["IGNORE", "mask_tokens", "mlm_loss", "special_token_mask"]
