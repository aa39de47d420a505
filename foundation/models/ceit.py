"""CeiT: Convolution-enhanced image Transformer (Yuan et al. 2021).

"Incorporating Convolution Designs into Visual Transformers", https://arxiv.org/abs/2103.11816;
official code https://github.com/coeusguo/ceit. A DeiT-style ViT with three changes:

* ``ImageToTokens`` (I2T): a small conv stem (conv 7x7/2 -> BN -> max-pool 3x3/2) extracts low-level
  features, and the patch embedding cuts *those* into tokens instead of raw pixels;
* ``LocallyEnhancedFeedForward`` (LeFF): the MLP of every block becomes 1x1 conv -> depthwise 3x3
  conv -> 1x1 conv on the patch tokens laid back out as a 2-D map (the class token bypasses it);
* ``LayerwiseClassAttention`` (LCA): the class tokens of all layers, plus a layer-position embedding,
  are attended to by the last one, which becomes the image representation.

Registered with timm (``ceit_{tiny,small,base}_patch16_{224,384}`` and the tiny ``ceit_test``), so
``timm.create_model("ceit_tiny_patch16_224")`` works after ``import foundation``.

``patch_size`` is the *effective* patch over the input image, as in the model names: the stem
downsamples by 4, so the token-embedding conv has kernel and stride ``patch_size // 4`` (4 for the
paper's patch16). At 224 px, patch 16 gives 14x14 = 196 tokens; at 32 px, patch 16 gives 2x2 = 4
tokens and patch 8 gives 4x4 = 16.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from torch import Tensor, nn

__all__ = ["CeiT", "ImageToTokens", "LocallyEnhancedFeedForward", "LayerwiseClassAttention"]

STEM_STRIDE = 4  # conv stride 2 then max-pool stride 2
GLOBAL_POOLS = ("token", "avg")


def _halve(n: int) -> int:
    """Output length of a stride-2 layer with 'same' padding (conv 7/p3 and max-pool 3/p1): ceil(n / 2)."""
    return (n - 1) // 2 + 1


class ImageToTokens(nn.Module):
    """I2T: conv 7x7 stride 2 (no bias) -> BN -> max-pool 3x3 stride 2, then patch-embed the feature map.

    ``patch_size`` is the effective patch over the input; it must be a multiple of 4 (the stem stride).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        stem_chans: int = 64,
    ) -> None:
        super().__init__()
        if patch_size < STEM_STRIDE or patch_size % STEM_STRIDE:
            raise ValueError(
                f"CeiT patch_size is the effective patch over the input and must be a multiple of "
                f"{STEM_STRIDE} (the conv stem's stride), got {patch_size}"
            )
        kernel = patch_size // STEM_STRIDE
        self.img_size = height, width = to_2tuple(img_size)
        self.grid_size = (_halve(_halve(height)) // kernel, _halve(_halve(width)) // kernel)
        if min(self.grid_size) < 1:
            raise ValueError(f"img_size {img_size} is too small for CeiT patch_size {patch_size}: no tokens")
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        self.conv = nn.Conv2d(in_chans, stem_chans, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(stem_chans)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.bn(self.conv(x)))  # (B, stem_chans, H/4, W/4)
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention; with ``last_query_only`` only the last token asks (used by LCA)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, last_query_only: bool = False) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if last_query_only:
            q = q[:, :, -1:]  # (B, heads, 1, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Nq, head_dim)
        x = x.transpose(1, 2).reshape(batch, q.shape[2], dim)  # (B, Nq, D)
        return self.proj_drop(self.proj(x))


class LocallyEnhancedFeedForward(nn.Module):
    """LeFF: patch tokens -> 2-D map -> 1x1 expand -> depthwise kxk -> 1x1 project (each with BN) -> tokens.

    The class token (index 0) is passed through unchanged: it has no place on the spatial map.
    """

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, hidden_dim, kernel_size=1)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.conv2 = nn.Conv2d(
            hidden_dim, hidden_dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=hidden_dim
        )
        self.bn2 = nn.BatchNorm2d(hidden_dim)
        self.conv3 = nn.Conv2d(hidden_dim, dim, kernel_size=1)
        self.bn3 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        cls_token, tokens = x[:, :1], x[:, 1:]  # (B, 1, D), (B, N, D)
        batch, _, dim = tokens.shape
        y = tokens.transpose(1, 2).reshape(batch, dim, *grid_size)  # (B, D, gh, gw)
        y = self.act(self.bn1(self.conv1(y)))  # (B, hidden, gh, gw)
        y = self.act(self.bn2(self.conv2(y)))  # (B, hidden, gh, gw)
        y = self.bn3(self.conv3(y))  # (B, D, gh, gw)
        return torch.cat([cls_token, y.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + N, D)


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + LeFF(LN(x)).

    As in the official code, the residual around LeFF adds LN(class token) to the class token, since
    LeFF passes its (normalised) class token through.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.leff = LocallyEnhancedFeedForward(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, 1 + N, D)
        return x + self.drop_path(self.leff(self.norm2(x), grid_size))  # (B, 1 + N, D)


class LayerwiseClassAttention(nn.Module):
    """LCA: the last layer's class token attends over the class tokens of all layers, then an MLP.

    Input: the class token output by each of the ``depth`` blocks, (B, depth, D); a learnable
    layer-position embedding tells the layers apart. Output: the refined last class token, (B, 1, D).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.pos_layer_embed = nn.Parameter(torch.zeros(1, depth, dim))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, cls_tokens: Tensor) -> Tensor:
        x = cls_tokens + self.pos_layer_embed  # (B, depth, D)
        x = x[:, -1:] + self.attn(self.norm1(x), last_query_only=True)  # (B, 1, D)
        return x + self.mlp(self.norm2(x))  # (B, 1, D)


class CeiT(nn.Module):
    """CeiT: I2T stem, encoder blocks with LeFF, layer-wise class-token attention, LayerNorm, classifier.

    Args:
        img_size: input size; fixed, since the position embedding and LeFF's 2-D map depend on it.
        patch_size: effective patch over the input (a multiple of 4); the token-embedding conv after
            the x4 stem has kernel ``patch_size // 4``.
        in_chans: input channels.
        num_classes: classifier outputs; 0 makes the head an identity (``forward`` returns features).
        global_pool: ``"token"`` (the paper: the LCA class token) or ``"avg"`` (mean of the last
            layer's patch tokens; the LCA then does not reach the logits).
        embed_dim: token width.
        depth: number of encoder blocks.
        num_heads: attention heads (in the blocks and in LCA).
        mlp_ratio: hidden width of LeFF and of LCA's MLP, relative to ``embed_dim``.
        qkv_bias: bias in the query/key/value projection.
        drop_rate: dropout after the position embedding, the attention projections and LCA's MLP.
        drop_path_rate: stochastic depth, rising linearly over the blocks to this value (not in LCA).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        self.i2t = ImageToTokens(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.i2t.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.i2t.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        drop_paths = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, 0 -> rate
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop=drop_rate, drop_path=dp)
            for dp in drop_paths
        )
        self.lca = LayerwiseClassAttention(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_rate)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        for param in (self.cls_token, self.pos_embed, self.lca.pos_layer_embed):
            trunc_normal_(param, std=0.02)
        self.apply(_init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "lca.pos_layer_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, for timm's layer-wise learning-rate decay."""
        return {
            "stem": r"^cls_token|^pos_embed|^i2t",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^lca|^norm", (99999,))],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward. In training mode LeFF's BN running stats then update twice."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (freshly initialised) head with ``num_classes`` outputs; 0 gives an identity."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_linear)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image (B, C, H, W) -> normalised tokens (B, 1 + N, D): [LCA class token, last layer's patch tokens]."""
        x = self.i2t(x)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        x = self.pos_drop(x)
        cls_tokens = []
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, self.grid_size)
            else:
                x = block(x, self.grid_size)
            cls_tokens.append(x[:, 0])
        cls_token = self.lca(torch.stack(cls_tokens, dim=1))  # (B, depth, D) -> (B, 1, D)
        return self.norm(torch.cat([cls_token, x[:, 1:]], dim=1))  # (B, 1 + N, D)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, 1 + N, D) -> pooled features (B, D) or logits (B, num_classes)."""
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _init_linear(module: nn.Module) -> None:
    """Linear layers as in DeiT/CeiT: truncated normal (std 0.02), zero bias. Convs keep PyTorch's init."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _cfg(input_size: tuple[int, int, int] = (3, 224, 224), crop_pct: float = 0.875) -> dict[str, Any]:
    return {
        "url": "",  # no published weights are fetched: everything trains from scratch here
        "num_classes": 1000,
        "input_size": input_size,
        "pool_size": None,
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "i2t.conv",
        "classifier": "head",
    }


default_cfgs = generate_default_cfgs(
    {
        "ceit_tiny_patch16_224": _cfg(),
        "ceit_small_patch16_224": _cfg(),
        "ceit_base_patch16_224": _cfg(),
        "ceit_tiny_patch16_384": _cfg((3, 384, 384), crop_pct=1.0),
        "ceit_small_patch16_384": _cfg((3, 384, 384), crop_pct=1.0),
        "ceit_base_patch16_384": _cfg((3, 384, 384), crop_pct=1.0),
        "ceit_test": _cfg((3, 32, 32), crop_pct=1.0),
    }
)


def _create_ceit(variant: str, pretrained: bool, arch: dict[str, Any], **kwargs: Any) -> CeiT:
    """Build through timm (pretrained cfg, ``checkpoint_path`` loading); ``kwargs`` override ``arch``."""
    model = build_model_with_cfg(CeiT, variant, pretrained, **{**arch, **kwargs})
    # The cfg describes the model as built, so timm.data.resolve_data_config(model=...) gives e.g.
    # (1, 32, 32) for a 32 px single-channel override instead of the variant's default size, with
    # mean/std averaged over RGB when the channel count is not 3 (else timm's Normalize fails).
    in_chans = model.i2t.conv.in_channels
    cfg = {**model.pretrained_cfg, "input_size": (in_chans, *model.i2t.img_size)}
    if in_chans != 3:
        cfg["mean"] = (sum(cfg["mean"]) / 3,) * in_chans
        cfg["std"] = (sum(cfg["std"]) / 3,) * in_chans
    model.pretrained_cfg = model.default_cfg = cfg
    return model


# Variant builders take any CeiT argument as a keyword (img_size, patch_size, in_chans, num_classes, ...).


@register_model
def ceit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> CeiT:
    """CeiT-T (paper: 6.4 M parameters), 224 px."""
    return _create_ceit("ceit_tiny_patch16_224", pretrained, dict(embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def ceit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> CeiT:
    """CeiT-S (paper: 24.2 M parameters), 224 px."""
    return _create_ceit("ceit_small_patch16_224", pretrained, dict(embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def ceit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> CeiT:
    """CeiT-B, 224 px."""
    return _create_ceit("ceit_base_patch16_224", pretrained, dict(embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def ceit_tiny_patch16_384(pretrained: bool = False, **kwargs: Any) -> CeiT:
    """CeiT-T at 384 px (576 tokens)."""
    return _create_ceit("ceit_tiny_patch16_384", pretrained, dict(embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def ceit_small_patch16_384(pretrained: bool = False, **kwargs: Any) -> CeiT:
    """CeiT-S at 384 px (576 tokens)."""
    return _create_ceit("ceit_small_patch16_384", pretrained, dict(embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def ceit_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> CeiT:
    """CeiT-B at 384 px (576 tokens)."""
    return _create_ceit("ceit_base_patch16_384", pretrained, dict(embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def ceit_test(pretrained: bool = False, **kwargs: Any) -> CeiT:
    """Tiny CeiT for tests: width 32, depth 2, 2 heads, 32 px, effective patch 8 (4x4 = 16 tokens)."""
    arch = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 32 px comes from the cfg's input_size
    return _create_ceit("ceit_test", pretrained, arch, **kwargs)
