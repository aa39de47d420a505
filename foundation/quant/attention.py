"""``nn.MultiheadAttention`` with its projections as called ``nn.Linear`` modules, so they can be quantized.

PyTorch's ``nn.MultiheadAttention`` (the open_clip text and vision transformers use it) applies its
``in_proj_weight`` and ``out_proj`` functionally: placement never sees them called, they stay in float,
and an INT8 export of a CLIP text tower runs a third of its matmuls in FP32 (where onnxruntime's own
quantizer, which reads the exported MatMuls, quantizes them). ``split_attention`` replaces every
self-attention ``nn.MultiheadAttention`` by ``LinearAttention``: the same weights and the same output
(checked on a probe batch; undone otherwise), with ``in_proj`` and ``out_proj`` as called Linear layers.

State-dict names change from ``attn.in_proj_weight`` to ``attn.in_proj.weight`` (``out_proj.*`` keeps its
name); a quantized checkpoint records the replaced modules (``quant.json``: ``linear_attention``) and
``load_quantized`` replaces them again before loading.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearAttention(nn.Module):
    """Multi-head self-attention computing what ``nn.MultiheadAttention`` computes in eval mode."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool, batch_first: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> LinearAttention:
        new = cls(mha.embed_dim, mha.num_heads, mha.in_proj_bias is not None, mha.batch_first)
        with torch.no_grad():
            new.in_proj.weight.copy_(mha.in_proj_weight)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.in_proj.bias.copy_(mha.in_proj_bias)
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.in_proj_weight.device).train(mha.training)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None, need_weights: bool = False,
                attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None, **_) -> tuple[Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)  # (B, N, D)
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = self.in_proj(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # each (B, h, N, d/h)
        scores = (q * (1.0 / math.sqrt(d // h))) @ k.transpose(-2, -1)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(b, h, n, n)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :]
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        out = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _self_attention_only(mha: nn.MultiheadAttention) -> bool:
    return mha._qkv_same_embed_dim and mha.in_proj_weight is not None and mha.bias_k is None and not mha.add_zero_attn


def split_attention(model: nn.Module, example: Tensor) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` of ``model`` (self-attention, no bias_k/v) by
    ``LinearAttention`` in place; returns the replaced names. Undone when the output on ``example`` moves
    (e.g. a module that attends across different query and key tensors)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) and _self_attention_only(m)]
    if not names:
        return []
    with torch.no_grad():
        ref = model(example)
    originals = {}
    for name in names:
        originals[name] = model.get_submodule(name)
        _set(model, name, LinearAttention.from_mha(originals[name]))
    try:
        with torch.no_grad():
            out = model(example)
        same = _close(ref, out)
    except (RuntimeError, ValueError):
        same = False
    if not same:
        for name, mha in originals.items():
            _set(model, name, mha)
        return []
    return names


def replace_attention(model: nn.Module, names: list[str]) -> None:
    """Swap the named ``nn.MultiheadAttention`` modules for ``LinearAttention`` (``load_quantized``)."""
    for name in names:
        _set(model, name, LinearAttention.from_mha(model.get_submodule(name)))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _close(a, b) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + a.abs().max().item()))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return True
