"""Reconstruction blocks found from a model's structure (BRECQ reconstructs block by block).

A block is a module whose class name says it is a residual unit — timm/torchvision ResNet
``BasicBlock``/``Bottleneck``, MobileNet ``InvertedResidual``/``DepthwiseSeparableConv``/
``EdgeResidual``, transformer blocks (timm ``Block``, ``ResPostBlock``, ``LayerScaleBlock``…, CeiT
``Block`` and ``LayerwiseClassAttention``, open_clip ``ResidualAttentionBlock``: any class name ending
in ``Block``) — that contains at
least one Conv2d/Linear and no smaller block. Layers outside every block (stem, patch embedding,
classifier) are reconstructed one by one.
"""

from __future__ import annotations

import re

from torch import nn

BLOCK_PATTERNS: dict[str, re.Pattern] = {
    "residual": re.compile(r"^(BasicBlock|Bottleneck|BottleneckBlock|ResBottleneck)$"),
    "inverted_residual": re.compile(r"^(InvertedResidual|DepthwiseSeparableConv|EdgeResidual|"
                                    r"UniversalInvertedResidual|CondConvResidual)$"),
    "transformer": re.compile(r"(Block|BlockClassAttn|LayerwiseClassAttention)$"),
}


def block_kind(m: nn.Module) -> str | None:
    """"residual" | "inverted_residual" | "transformer" | None, from the class name."""
    cls = type(m).__name__
    for kind, pattern in BLOCK_PATTERNS.items():
        if pattern.search(cls):
            return kind
    return None


def _has_layers(m: nn.Module) -> bool:
    return any(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules())


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, module, kind)`` of the innermost blocks, in registration order."""
    candidates = [(n, m, block_kind(m)) for n, m in model.named_modules() if n and block_kind(m) and _has_layers(m)]
    names = [n for n, _, _ in candidates]
    return [(n, m, k) for n, m, k in candidates if not any(o != n and o.startswith(n + ".") for o in names)]
