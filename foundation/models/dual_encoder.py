"""Vision-language dual encoder (CLIP, Radford et al. 2021): two towers, linear projections into a joint
space, a learnable temperature.

- vision tower: any timm backbone by name (ViT, ResNet, CeiT, ...) created with ``num_classes=0`` as a
  feature extractor, followed by ``visual_projection``; or the vision tower of an open_clip model
  config (it projects to ``embed_dim`` itself);
- text tower: open_clip's ``TextTransformer`` (from an open_clip model config and/or by dimensions),
  pooled at the end-of-text token, with its ``text_projection``; tokenised by open_clip's BPE
  tokenizer, whose vocabulary ships inside the open_clip wheel (no network);
- or a Hugging Face text tower (``text.hf_model`` / ``text.hf_type``): open_clip's ``HFTextEncoder``
  around a ``transformers`` model (BERT, RoBERTa, ...) from a local directory (its ``config.json`` and
  safetensors weights; never remote code, never a pickle) or from a config built from the recipe's
  dimensions (random init), pooled at the first token or by the mean over non-padding tokens, then
  projected. Tokenised by a local HF tokenizer directory (``text.hf_tokenizer``) or, without one, by
  open_clip's BPE tokenizer with the model's vocabulary sized to it (padding id 0, as open_clip pads);
- ``logit_scale`` starts at ln(1/0.07); the scale ``exp(logit_scale)`` is clamped at ``max_logit_scale``.

``extra_tokens`` grows the vocabulary past the tokenizer's (DeCLIP's MLM adds a mask token); pooling
therefore looks for the end-of-text id rather than the largest id, which is equivalent for plain text.

Paired starts: the towers are built from the run's random stream exactly as for plain CLIP; the added token
rows (and a task's heads) are drawn afterwards on their own stream (``seeded``: forked from, seeded by, and
restoring the run's stream). So under one seed CLIP and every DeCLIP variant start from the same vision
tower and the same text weights (the added rows aside), and CLIP's start is what it always was; a method
comparison then compares methods, not initialisations.

The architecture is kept as plain JSON-able dicts (``text_cfg``, ``vision_cfg``) in open_clip's own
terms, so ``foundation.models.open_clip_convert`` can write a model config open_clip loads.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import math
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.config import ModelConfig

# CLIP's text tower (open_clip ViT-B-32 text_cfg): used where neither a config name nor a dimension is given
CLIP_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}
DEFAULT_EMBED_DIM = 512


@contextlib.contextmanager
def seeded(name: str) -> Iterator[None]:
    """Run the block (building a part called ``name``) on its own CPU random stream, seeded from the seed the
    run set (``torch.initial_seed()``, i.e. the last ``torch.manual_seed``) and ``name``; the outer stream is
    restored afterwards, so what else is built, and in which order, never shifts a part's initial weights."""
    digest = hashlib.sha256(f"{torch.initial_seed()}/{name}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        yield


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
        names = {f"text.{n}" for n in getattr(self.text, "no_weight_decay", lambda: set())()}
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


class HFTokenizer:
    """A local Hugging Face tokenizer directory behind open_clip's tokenizer interface:
    ``tokenizer(texts, context_length) -> (B, context_length)`` ids, padded with its own padding id.
    Loaded with ``local_files_only`` and ``trust_remote_code=False``: nothing is downloaded or executed."""

    def __init__(self, path: str | Path, context_length: int):
        from transformers import AutoTokenizer

        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True, trust_remote_code=False)
        self.context_length = context_length
        tok = self.tokenizer
        self.sot_token_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        self.eot_token_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.pad_token_id = tok.pad_token_id
        if None in (self.sot_token_id, self.eot_token_id, self.pad_token_id):
            raise ValueError(f"model.dual_encoder.text.hf_tokenizer: {self.path} has no start (cls/bos), end "
                             "(sep/eos) or padding token; a text tower needs all three")

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                              max_length=context_length or self.context_length)["input_ids"]


HF_POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}  # recipe name -> open_clip pooler


def _local_dir(path: str, key: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"model.dual_encoder.text.{key}: {path!r} is not a directory; give a local Hugging Face "
                         "directory (save_pretrained output): nothing is downloaded")
    return directory.resolve()


def _hf_transformer(config, model_dir: Path | None) -> nn.Module:
    """The transformers model: safetensors weights from ``model_dir`` when it has them, else random init."""
    from transformers import AutoModel

    kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta") else {}
    if model_dir is not None and any(model_dir.glob("*.safetensors")):
        return AutoModel.from_pretrained(model_dir, config=config, local_files_only=True, trust_remote_code=False,
                                         use_safetensors=True, **kwargs)
    if model_dir is not None and any(model_dir.glob("*.bin")):
        raise ValueError(f"model.dual_encoder.text.hf_model: {model_dir} holds PyTorch pickle weights (*.bin), "
                         "which are never loaded (loading a pickle can run code); re-save them with "
                         "save_pretrained(..., safe_serialization=True)")
    return AutoModel.from_config(config, **kwargs)


def build_hf_text_tower(text, embed_dim: int, extra_tokens: int = 0) -> tuple[nn.Module, object, dict]:
    """(open_clip ``HFTextEncoder`` returning (pooled projection, token features), tokenizer, text_cfg)
    for ``model.dual_encoder.text`` with ``hf_model`` or ``hf_type`` set."""
    import transformers
    from open_clip.hf_configs import arch_dict
    from open_clip.hf_model import HFTextEncoder

    key = "model.dual_encoder.text"
    if text.hf_model and text.hf_type:
        raise ValueError(f"{key}: set hf_model (a directory) or hf_type (an architecture), not both")
    if text.open_clip:
        raise ValueError(f"{key}: open_clip names an open_clip text tower; it cannot be combined with hf_model/hf_type")
    model_dir = _local_dir(text.hf_model, "hf_model") if text.hf_model else None
    if model_dir is not None:
        given = [k for k in ("width", "heads", "layers", "mlp_ratio") if getattr(text, k) is not None]
        if given:
            raise ValueError(f"{key}: {', '.join(given)} come from {model_dir}/config.json with hf_model; leave them unset")
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        if config.model_type not in arch_dict:
            raise ValueError(f"{key}.hf_model: {model_dir} is a {config.model_type!r} model; open_clip's HF text "
                             f"tower knows {sorted(arch_dict)}")
        names = arch_dict[config.model_type]["config_names"]
        limit = getattr(config, names["context_length"], None) if names["context_length"] else None
        context_length = text.context_length or min(CLIP_TEXT_CFG["context_length"], limit or 10**9)
    else:
        if text.hf_type not in arch_dict:
            close = difflib.get_close_matches(str(text.hf_type), list(arch_dict), n=3, cutoff=0.5)
            raise ValueError(f"{key}.hf_type: unknown architecture {text.hf_type!r}"
                             + (f"; did you mean {close}?" if close else "") + f" (allowed: {sorted(arch_dict)})")
        names = arch_dict[text.hf_type]["config_names"]
        dims = {k: getattr(text, k) if getattr(text, k) is not None else CLIP_TEXT_CFG[k]
                for k in ("context_length", "width", "heads", "layers", "mlp_ratio")}
        context_length = dims["context_length"]
        fields = {names["width"]: dims["width"], names["heads"]: dims["heads"], names["layers"]: dims["layers"]}
        if names["context_length"]:  # RoBERTa's positions start after the padding id
            fields[names["context_length"]] = context_length + (2 if "roberta" in text.hf_type else 0)
        config = transformers.AutoConfig.for_model(text.hf_type, **fields)
        if hasattr(config, "initializer_range"):
            # the architecture's init std (BERT: 0.02) is tuned to its base width (768); scale it as width**-0.5
            # so that a narrow tower's tokens are not all but equal at init (CLS pooling then cannot learn)
            reference = transformers.AutoConfig.for_model(text.hf_type)
            config.initializer_range = reference.initializer_range * math.sqrt(
                getattr(reference, names["width"]) / dims["width"])
        for ffn in ("intermediate_size", "d_ff", "encoder_ffn_dim"):
            if hasattr(config, ffn):
                setattr(config, ffn, int(dims["width"] * dims["mlp_ratio"]))
        limit = getattr(config, names["context_length"], None) if names["context_length"] else None
    if limit is not None and context_length > limit:
        raise ValueError(f"{key}.context_length: {context_length} tokens, but the model has {limit} positions")

    if text.hf_tokenizer:
        if extra_tokens:
            raise ValueError(f"{key}.hf_tokenizer: DeCLIP's MLM (task.declip.tss_weight > 0) adds its own mask token "
                             "to open_clip's BPE vocabulary and is not wired to a Hugging Face tokenizer's [MASK]; "
                             "leave hf_tokenizer unset (BPE) or set task.declip.tss_weight: 0")
        tokenizer = HFTokenizer(_local_dir(text.hf_tokenizer, "hf_tokenizer"), context_length)
        vocab_size, pad_id = len(tokenizer), tokenizer.pad_token_id
    else:
        tokenizer = create_tokenizer(context_length)
        vocab_size, pad_id = len(tokenizer.encoder), 0  # open_clip pads with 0

    if model_dir is None or not any(model_dir.glob("*.safetensors")):  # random init: size it right away
        config.vocab_size, config.pad_token_id = vocab_size, pad_id
    transformer = _hf_transformer(config, model_dir)
    if transformer.get_input_embeddings().num_embeddings != vocab_size:
        transformer.resize_token_embeddings(vocab_size)  # the tokenizer's vocabulary, not the directory's
    if extra_tokens:  # added after the tokenizer's rows, on their own stream: those rows stay as without them
        vocab_size += extra_tokens
        with seeded("text.extra_tokens"):
            transformer.resize_token_embeddings(vocab_size)
    transformer.config.vocab_size = vocab_size
    transformer.config.pad_token_id = pad_id
    pooler = HF_POOLERS[text.hf_pooler]
    tower = HFTextEncoder(str(model_dir or text.hf_type), embed_dim, config=transformer.config, pooler_type=pooler,
                          proj_type=text.hf_proj, pretrained=False, output_tokens=True)
    tower.transformer = transformer  # replaces the randomly initialised copy HFTextEncoder built from the config
    width = getattr(transformer.config, names["width"])
    text_cfg = {"context_length": context_length, "vocab_size": vocab_size, "width": width,
                "hf_model_name": str(model_dir) if model_dir else None, "hf_model_type": transformer.config.model_type,
                "hf_tokenizer_name": tokenizer.path if isinstance(tokenizer, HFTokenizer) else None,
                "hf_pooler_type": pooler, "hf_proj_type": text.hf_proj}
    return tower, tokenizer, text_cfg


def add_token_rows(text: nn.Module, extra: int) -> None:
    """Grow an open_clip ``TextTransformer``'s token embedding by ``extra`` rows after the tokenizer's (std
    0.02, open_clip's init), drawn on their own stream: the existing rows and every other weight are kept."""
    old = text.token_embedding
    with torch.no_grad(), seeded("text.extra_tokens"):  # the module's own default init draws too: inside
        grown = nn.Embedding(old.num_embeddings + extra, old.embedding_dim).to(old.weight)
        grown.weight[: old.num_embeddings] = old.weight
        nn.init.normal_(grown.weight[old.num_embeddings:], std=0.02)
    text.token_embedding = grown
    text.vocab_size = grown.num_embeddings


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


def build_dual_encoder(cfg: ModelConfig, in_chans: int = 3, extra_tokens: int = 0,
                       visual: nn.Module | None = None) -> DualEncoder:
    """The dual encoder a recipe's ``model`` section describes (see ``DualEncoderConfig``); ``visual``: a
    given vision tower (a multi-task run's shared backbone) instead of ``model.backbone``."""
    from open_clip.model import _build_text_tower, _build_vision_tower

    from foundation.models.factory import create_backbone

    de = cfg.dual_encoder
    hf = de.text.hf_model is not None or de.text.hf_type is not None
    text_cfg, text_embed_dim, quick_gelu = ({}, None, False) if hf else resolve_text_cfg(cfg)
    vision_full = open_clip_config(de.vision_open_clip, "model.dual_encoder.vision_open_clip") if de.vision_open_clip else None
    embed_dim = de.embed_dim or text_embed_dim or (vision_full or {}).get("embed_dim") or DEFAULT_EMBED_DIM
    if vision_full is not None and not de.text.open_clip:
        quick_gelu = bool(vision_full.get("quick_gelu", False))

    if hf:
        text, tokenizer, text_cfg = build_hf_text_tower(de.text, embed_dim, extra_tokens)
    else:
        tokenizer = create_tokenizer(text_cfg["context_length"])
        text_cfg["vocab_size"] = len(tokenizer.encoder)
        if not text_cfg.get("embed_cls"):
            # pool at the end-of-text token: an added token (the mask) has a larger id than EOT
            text_cfg.update(pool_type="eos", eos_id=tokenizer.eot_token_id)
        text = _build_text_tower(embed_dim, {**text_cfg, "output_tokens": True}, quick_gelu)
        if extra_tokens:
            add_token_rows(text, extra_tokens)
            text_cfg["vocab_size"] += extra_tokens

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
        if visual is None:
            visual = create_backbone(cfg.model_copy(update={"num_classes": 0}), in_chans=in_chans)
        visual_dim = getattr(visual, "head_hidden_size", None) or visual.num_features
    return DualEncoder(
        visual, visual_dim, text, embed_dim, tokenizer=tokenizer, text_cfg=text_cfg, vision_cfg=vision_cfg,
        quick_gelu=quick_gelu, init_logit_scale=de.init_logit_scale, max_logit_scale=de.max_logit_scale,
        extra_tokens=extra_tokens,
    )


__all__ = ["DualEncoder", "HFTokenizer", "ImageTower", "TextTower", "add_token_rows", "build_dual_encoder",
           "build_hf_text_tower", "create_tokenizer", "open_clip_config", "resolve_text_cfg", "seeded"]
