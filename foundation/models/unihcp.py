"""UniHCP (Ci et al., CVPR 2023): a plain ViT, a shared neck + transformer decoder, task queries, and a
task-guided interpreter — one network for pose, parsing, attributes, ReID and pedestrian detection.

    image ─ ViT (timm, dynamic_img_size) ─ tokens (B, N, D) at stride 16
       ├─ neck: two stride-2 transposed convs → F (B, C, H/4, W/4)            dense tasks read F
       └─ proj → memory (B, N, C) + 2-D sine positions through a shared MLP
    task queries (Q, C) ─ decoder × L (cross-attn → self-attn → FFN) ─ after every layer:
       class unit   (shared): linear → one logit per query
       feature unit (shared): MLP(q) · F → one map per query (B, Q, H/4, W/4)
       localisation (detection's own box MLP): offset from the query's anchor → box

``UniHCPShared`` holds what every task shares (neck, memory projection, position MLP, decoder, class
and feature units); ``UniHCPNet`` is one task's network: the encoder and the shared part (owned, or
referenced through ``SharedBackbone`` in a multi-task run) plus the task's queries and its own head
parts. ``UniHCPNet(images)`` returns every decoder layer's outputs, the last one last.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

TASK_KINDS = ("pose", "parsing", "attributes", "reid", "detection")


def sine_embedding(coords: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR/DAB-style sine embedding of points in [0, 1]: (..., 2) [x, y] → (..., dim) [sin/cos(y), sin/cos(x)]."""
    half = dim // 2
    freq = temperature ** (2 * (torch.arange(half, device=coords.device) // 2) / half)
    scaled = coords[..., None] * (2 * math.pi) / freq  # (..., 2, half)
    emb = torch.stack([scaled[..., 0::2].sin(), scaled[..., 1::2].cos()], -1).flatten(-2)  # (..., 2, half)
    return torch.cat([emb[..., 1, :], emb[..., 0, :]], -1)


def grid_points(h: int, w: int, device=None) -> Tensor:
    """Centres of an h × w grid in [0, 1], (h * w, 2) [x, y], row-major."""
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], -1)


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's MLP)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (ConvNeXt's / the released SimpleNeck's Norm2d)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Neck(nn.Module):
    """Stride-16 tokens → a ``width``-channel stride-4 map, as the released ``SimpleNeck``: ConvT D→mid,
    LayerNorm-2d, GELU, ConvT mid→width (ViTDet's simple feature pyramid, the 1/4 level; mid = D)."""

    def __init__(self, embed_dim: int, width: int, mid: int | None = None, norm: str = "layernorm"):
        super().__init__()
        mid = mid or embed_dim
        self.up1 = nn.ConvTranspose2d(embed_dim, mid, 2, stride=2)
        self.norm = LayerNorm2d(mid, eps=1e-6) if norm == "layernorm" else nn.GroupNorm(32 if mid % 32 == 0 else 1, mid)
        self.up2 = nn.ConvTranspose2d(mid, width, 2, stride=2)

    def forward(self, grid: Tensor) -> Tensor:  # (B, D, h, w) -> (B, C, 4h, 4w)
        return self.up2(F.gelu(self.norm(self.up1(grid))))


class DecoderLayer(nn.Module):
    """Cross-attention to the image → self-attention among the queries → FFN; post-norm (Mask2Former)."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.cross = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, q_pos: Tensor, memory: Tensor, m_pos: Tensor) -> Tensor:
        # q (B, Q, C), memory (B, N, C)
        q = self.norms[0](q + self.drop(self.cross(q + q_pos, memory + m_pos, memory, need_weights=False)[0]))
        k = q + q_pos
        q = self.norms[1](q + self.drop(self.self_attn(k, k, q, need_weights=False)[0]))
        return self.norms[2](q + self.drop(self.ffn(q)))


class UniHCPShared(nn.Module):
    """Everything the tasks share after the encoder: neck, memory projection, position MLP, decoder,
    and the interpreter's class unit and feature unit."""

    def __init__(self, embed_dim: int, width: int = 256, layers: int = 9, heads: int = 8, ffn: int = 2048,
                 dropout: float = 0.0, neck_mid: int | None = None, neck_norm: str = "layernorm"):
        super().__init__()
        self.width = width
        self.neck = Neck(embed_dim, width, neck_mid, neck_norm)
        self.proj = nn.Linear(embed_dim, width)
        self.pos_mlp = MLP(width, width, width, 2)  # 2-D sine embedding -> position (memory and anchors)
        self.layers = nn.ModuleList(DecoderLayer(width, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.class_unit = nn.Linear(width, 1)
        self.feature_unit = MLP(width, width, width, 3)

    def position(self, points: Tensor) -> Tensor:
        """Points in [0, 1] (..., 2) → positions (..., C): sine embedding through the shared MLP."""
        return self.pos_mlp(sine_embedding(points, self.width))


def _token_grid(encoder: nn.Module, images: Tensor) -> tuple[Tensor, int, int]:
    """The encoder's patch tokens (B, N, D) (prefix tokens dropped) and the grid (h, w)."""
    tokens = encoder.forward_features(images)
    tokens = tokens[:, int(getattr(encoder, "num_prefix_tokens", 0)):]
    patch = encoder.patch_embed.patch_size
    h, w = images.shape[-2] // patch[0], images.shape[-1] // patch[1]
    return tokens, h, w


class UniHCPNet(nn.Module):
    """One task's UniHCP network. ``forward(images) -> list`` of per-layer outputs (the last = final):

    - pose: ``logits`` (B, K) visibility, ``maps`` (B, K, H/4, W/4) heatmaps
    - parsing: ``logits`` (B, C) class presence, ``maps`` (B, C, H/4, W/4) masks
    - attributes: ``logits`` (B, A)
    - reid: ``feature`` (B, R·C) concatenated query outputs, ``logits`` (B, ids) after BN → classifier
    - detection: ``logits`` (B, Q) person scores, ``boxes`` (B, Q, 4) normalised cx, cy, w, h
    """

    def __init__(self, kind: str, encoder: nn.Module, shared: nn.Module, num_queries: int, *,
                 num_ids: int = 0, det_patterns: int = 3, deep_supervision: bool = True,
                 initial_prediction: bool = False, reid_feature_norm: bool = False):
        super().__init__()
        if kind not in TASK_KINDS:
            raise ValueError(f"UniHCP task kind {kind!r}: choose from {TASK_KINDS}")
        self.kind, self.deep_supervision = kind, deep_supervision
        # Mask2Former / the release: a prediction from the queries alone, before the first layer, is supervised too
        self.initial_prediction = initial_prediction
        self.reid_feature_norm = reid_feature_norm
        self.encoder = encoder
        self.shared = shared
        width = shared.width
        if kind == "detection":
            # anchor queries: learnable points (positions through the shared MLP) x content patterns
            self.det_patterns = det_patterns
            self.anchors = nn.Parameter(torch.rand(num_queries, 2))
            self.query_feat = nn.Parameter(torch.randn(det_patterns, width))
            self.box_mlp = MLP(width, width, 4, 3)
            nn.init.zeros_(self.box_mlp.layers[-1].weight)
            nn.init.zeros_(self.box_mlp.layers[-1].bias)
        else:
            # content and position embeddings of the task queries (nn.Embedding's N(0, 1), as Mask2Former)
            self.query_feat = nn.Parameter(torch.randn(num_queries, width))
            self.query_pos = nn.Parameter(torch.randn(num_queries, width))
        if kind == "reid":
            self.bn = nn.BatchNorm1d(num_queries * width)
            self.bn.bias.requires_grad_(False)  # BNNeck (Luo et al.): no shift
            self.classifier = nn.Linear(num_queries * width, num_ids, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)

    def queries(self, batch: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Content (B, Q, C), positions (B, Q, C) and, for detection, the anchors (B, Q, 2)."""
        if self.kind == "detection":
            anchors = self.anchors.clamp(0.0, 1.0)
            a, p = anchors.shape[0], self.det_patterns
            content = self.query_feat[:, None].expand(p, a, -1).reshape(p * a, -1)
            pos = self.shared.position(anchors).repeat(p, 1)
            anchors = anchors.repeat(p, 1)
            return content.expand(batch, -1, -1), pos.expand(batch, -1, -1), anchors.expand(batch, -1, -1)
        return self.query_feat.expand(batch, -1, -1), self.query_pos.expand(batch, -1, -1), None

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        shared = self.shared
        tokens, h, w = _token_grid(self.encoder, images)  # (B, h*w, D)
        b = tokens.shape[0]
        memory = shared.proj(tokens)  # (B, N, C)
        m_pos = shared.position(grid_points(h, w, tokens.device)).to(memory.dtype).expand(b, -1, -1)
        fmap = None
        if self.kind in ("pose", "parsing"):
            fmap = shared.neck(tokens.transpose(1, 2).reshape(b, -1, h, w))  # (B, C, 4h, 4w)
        q, q_pos, anchors = self.queries(b)
        outputs = []
        layers = shared.layers
        if self.deep_supervision and self.initial_prediction and self.training:
            outputs.append(self.interpret(q, fmap, anchors))
        for i, layer in enumerate(layers):
            q = layer(q, q_pos, memory, m_pos)
            if self.deep_supervision and self.training or i == len(layers) - 1:
                outputs.append(self.interpret(q, fmap, anchors))
        return outputs

    def interpret(self, q: Tensor, fmap: Tensor | None, anchors: Tensor | None) -> dict[str, Tensor]:
        """The task-guided interpreter on a layer's query outputs q (B, Q, C): the decoder LayerNorm, then
        the units (ReID's feature: the raw outputs concatenated, as released, unless ``reid_feature_norm``)."""
        shared = self.shared
        if self.kind == "reid":
            feature = (shared.norm(q) if self.reid_feature_norm else q).flatten(1)  # (B, R*C)
            return {"feature": feature, "logits": self.classifier(self.bn(feature))}
        q = shared.norm(q)
        out = {"logits": shared.class_unit(q).squeeze(-1)}  # (B, Q)
        if fmap is not None:
            out["maps"] = torch.einsum("bqc,bchw->bqhw", shared.feature_unit(q), fmap)
        if self.kind == "detection":
            delta = self.box_mlp(q)  # (B, Q, 4)
            centre = (torch.logit(anchors, eps=1e-4) + delta[..., :2]).sigmoid()
            size = (delta[..., 2:] - 2.0).sigmoid()  # starts near 0.12 of the image
            out["boxes"] = torch.cat([centre, size], -1)
        return out

    def no_weight_decay(self) -> set[str]:
        names = {n for n in ("query_feat", "query_pos", "anchors") if hasattr(self, n)}
        inner = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return names | {f"encoder.{n}" for n in inner}


__all__ = ["MLP", "LayerNorm2d", "Neck", "DecoderLayer", "TASK_KINDS", "UniHCPNet", "UniHCPShared", "grid_points", "sine_embedding"]
