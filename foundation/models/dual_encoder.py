"""Vision-language dual encoder (CLIP, Radford et al. 2021): two towers, linear projections into a joint
space, a learnable temperature.

- vision tower: any timm backbone by name (ViT, ResNet, CeiT, ...) created with ``num_classes=0`` as a
  feature extractor, followed by ``visual_projection``; or the vision tower of an open_clip model
  config (it projects to ``embed_dim`` itself);
- text tower: open_clip's ``TextTransformer`` (from an open_clip model config and/or by dimensions),
  pooled at the end-of-text token, with its ``text_projection``; tokenised by open_clip's BPE
  tokenizer, whose vocabulary ships inside the open_clip wheel (no network);
- ``logit_scale`` starts at ln(1/0.07); the scale ``exp(logit_scale)`` is clamped at ``max_logit_scale``.

``extra_tokens`` grows the vocabulary past the tokenizer's (DeCLIP's MLM adds a mask token); pooling
therefore looks for the end-of-text id rather than the largest id, which is equivalent for plain text.

The architecture is kept as plain JSON-able dicts (``text_cfg``, ``vision_cfg``) in open_clip's own
terms, so ``foundation.models.open_clip_convert`` can write a model config open_clip loads.
"""

from __future__ import annotations

import difflib
import math
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.config import ModelConfig

# CLIP's text tower (open_clip ViT-B-32 text_cfg): used where neither a config name nor a dimension is given
CLIP_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}
DEFAULT_EMBED_DIM = 512


class DualEncoder(nn.Module):
    """Image and text encoders into one embedding space; ``forward`` returns normalised embeddings.

    ``visual`` maps (B, C, H, W) to (B, visual_dim) features, projected by ``visual_projection``, or
    (with ``visual_dim=None``) straight to (B, embed_dim). ``text`` is an open_clip ``TextTransformer``
    built with ``output_tokens=True``: it returns the projected pooled embedding and the token features
    after the final LayerNorm.
    """

    def __init__(
        self, visual: nn.Module, visual_dim: int | None, text: nn.Module, embed_dim: int, *, tokenizer,
        text_cfg: dict, vision_cfg: dict | None = None, quick_gelu: bool = False,
        init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float = 100.0, extra_tokens: int = 0,
    ):
        super().__init__()
        self.visual = visual
        self.visual_projection = None
        if visual_dim is not None:
            self.visual_projection = nn.Linear(visual_dim, embed_dim, bias=False)
            nn.init.normal_(self.visual_projection.weight, std=visual_dim**-0.5)
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.max_logit_scale = max_logit_scale
        self.embed_dim = embed_dim
        self.tokenizer = tokenizer  # open_clip SimpleTokenizer: list[str] -> (B, context_length) long
        self.text_cfg = text_cfg  # open_clip CLIPTextCfg fields of `text`
        self.vision_cfg = vision_cfg  # open_clip CLIPVisionCfg fields of `visual`; None for a timm backbone
        self.quick_gelu = quick_gelu
        self.vocab_size = text_cfg["vocab_size"]
        self.sot_token_id = tokenizer.sot_token_id
        self.eot_token_id = tokenizer.eot_token_id
        self.mask_token_id = self.vocab_size - extra_tokens if extra_tokens else None  # first added token

    @property
    def context_length(self) -> int:
        return self.text_cfg["context_length"]

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        x = self.visual(images)  # (B, visual_dim) or (B, embed_dim)
        if self.visual_projection is not None:
            x = self.visual_projection(x)  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(pooled projected embedding (B, embed_dim), token features after ln_final (B, L, width))."""
        return self.text(tokens)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        x, _ = self.text(tokens)  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer(texts, context_length=self.context_length)

    def scale(self) -> Tensor:
        """The temperature's inverse, exp(logit_scale), clamped at ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(normalised image embeddings (B, E), normalised text embeddings (B, E), scale ())."""
        return self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True), self.scale()

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` the two towers: tasks call ``encode_image`` / ``encode_text_tokens``, not
        ``forward``, so compiling this module's own call would leave them eager."""
        self.visual.compile(*args, **kwargs)
        self.text.compile(*args, **kwargs)

    def no_weight_decay(self) -> set[str]:
        """Position embeddings and class tokens (norms, biases and the temperature are 1-D: no decay anyway)."""
        names = {f"text.{n}" for n in self.text.no_weight_decay()}
        names |= {f"visual.{n}" for n in getattr(self.visual, "no_weight_decay", lambda: set())()}
        return names


class ImageTower(nn.Module):
    """A dual encoder's image side as one module: images → (unnormalised) embeddings. Shares the
    dual encoder's modules and state-dict names (``visual.*``, ``visual_projection.*``); used where a
    tool takes a single-input model, e.g. post-training quantization."""

    def __init__(self, dual: DualEncoder):
        super().__init__()
        self.visual = dual.visual
        self.visual_projection = dual.visual_projection

    def forward(self, images: Tensor) -> Tensor:
        x = self.visual(images)
        return self.visual_projection(x) if self.visual_projection is not None else x


class TextTower(nn.Module):
    """A dual encoder's text side as one module: token ids → (unnormalised) pooled embeddings
    (``text.*`` state-dict names)."""

    def __init__(self, dual: DualEncoder):
        super().__init__()
        self.text = dual.text

    def forward(self, tokens: Tensor) -> Tensor:
        return self.text(tokens)[0]


# --------------------------------------------------------------------------------------------------
# building


def create_tokenizer(context_length: int):
    """open_clip's BPE tokenizer (vocabulary from the open_clip wheel; works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def open_clip_config(name: str, what: str) -> dict:
    """The model config ``name`` from open_clip's registry (a deep copy); ``what`` names the recipe key."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else "; see open_clip.list_models()"
        raise ValueError(f"{what}: unknown open_clip model config {name!r}{hint}")
    return deepcopy(cfg)


def resolve_text_cfg(cfg: ModelConfig) -> tuple[dict, int | None, bool]:
    """(open_clip text_cfg, the named config's embed_dim or None, its quick_gelu) for ``cfg.dual_encoder.text``."""
    text = cfg.dual_encoder.text
    base, embed_dim, quick_gelu = dict(CLIP_TEXT_CFG), None, False
    if text.open_clip:
        full = open_clip_config(text.open_clip, "model.dual_encoder.text.open_clip")
        if full["text_cfg"].get("hf_model_name") or full["text_cfg"].get("hf_tokenizer_name"):
            raise ValueError(f"model.dual_encoder.text.open_clip: {text.open_clip!r} uses a Hugging Face text "
                             "tower; only open_clip's own TextTransformer (BPE tokenizer) is supported")
        base.update(full["text_cfg"])
        embed_dim, quick_gelu = full["embed_dim"], bool(full.get("quick_gelu", False))
    for key in ("context_length", "width", "heads", "layers", "mlp_ratio"):
        if getattr(text, key) is not None:
            base[key] = getattr(text, key)
    return base, embed_dim, quick_gelu


def build_dual_encoder(cfg: ModelConfig, in_chans: int = 3, extra_tokens: int = 0) -> DualEncoder:
    """The dual encoder a recipe's ``model`` section describes (see ``DualEncoderConfig``)."""
    from open_clip.model import _build_text_tower, _build_vision_tower

    from foundation.models.factory import create_backbone

    de = cfg.dual_encoder
    text_cfg, text_embed_dim, quick_gelu = resolve_text_cfg(cfg)
    vision_full = open_clip_config(de.vision_open_clip, "model.dual_encoder.vision_open_clip") if de.vision_open_clip else None
    embed_dim = de.embed_dim or text_embed_dim or (vision_full or {}).get("embed_dim") or DEFAULT_EMBED_DIM
    if vision_full is not None and not de.text.open_clip:
        quick_gelu = bool(vision_full.get("quick_gelu", False))

    tokenizer = create_tokenizer(text_cfg["context_length"])
    text_cfg["vocab_size"] = len(tokenizer.encoder) + extra_tokens
    if not text_cfg.get("embed_cls"):
        # pool at the end-of-text token: an added token (the mask) has a larger id than EOT
        text_cfg.update(pool_type="eos", eos_id=tokenizer.eot_token_id)
    text = _build_text_tower(embed_dim, {**text_cfg, "output_tokens": True}, quick_gelu)

    if vision_full is not None:
        channels = cfg.in_chans if cfg.in_chans is not None else in_chans
        if channels != 3:
            raise ValueError("model.dual_encoder.vision_open_clip: open_clip vision towers take RGB images; "
                             "set data.in_chans: 3 (and leave model.in_chans unset)")
        vision_cfg = vision_full["vision_cfg"]
        if cfg.img_size is not None:
            vision_cfg["image_size"] = cfg.img_size
        if cfg.patch_size is not None:
            vision_cfg["patch_size"] = cfg.patch_size
        visual, visual_dim = _build_vision_tower(embed_dim, vision_cfg, quick_gelu), None
    else:
        vision_cfg = None
        visual = create_backbone(cfg.model_copy(update={"num_classes": 0}), in_chans=in_chans)
        visual_dim = getattr(visual, "head_hidden_size", None) or visual.num_features
    return DualEncoder(
        visual, visual_dim, text, embed_dim, tokenizer=tokenizer, text_cfg=text_cfg, vision_cfg=vision_cfg,
        quick_gelu=quick_gelu, init_logit_scale=de.init_logit_scale, max_logit_scale=de.max_logit_scale,
        extra_tokens=extra_tokens,
    )


__all__ = ["DualEncoder", "ImageTower", "TextTower", "build_dual_encoder", "create_tokenizer", "open_clip_config", "resolve_text_cfg"]
