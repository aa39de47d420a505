"""Converters from our ``DualEncoder`` to open_clip's ``CLIP`` (model config + state dict) and to timm.

Vision towers:

- a timm ``VisionTransformer`` (class token, token or average pooling, standard blocks) becomes
  open_clip's own ``VisionTransformer``: the same computation with renamed weights. timm's patch
  embedding bias (open_clip's ``conv1`` has none) is folded into the positional embedding of the
  patch tokens; a model without a pre-norm gets ``no_ln_pre``; LayerNorm eps and LayerScale are
  carried over; a 1-channel stem is repeated over RGB / 3 (equal for grey images given as RGB);
- an open_clip vision tower (``vision_open_clip``) is copied as is;
- any other timm backbone uses open_clip's ``timm_model_name`` adapter (``visual.trunk`` +
  ``visual.head.proj``): open_clip creates it by name alone, so only stock architectures (no
  ``model.kwargs``, size overrides or 1-channel input) can go this way.

The text tower maps one to one (open_clip's ``CLIP`` keeps the text weights at the top level). A
Hugging Face text tower (``text.hf_model``) becomes open_clip's ``CustomTextCLIP`` with an
``hf_model_name`` text config pointing at the same local directory (``hf_model_pretrained: false``:
the weights come from the exported state dict, under ``text.``); a tower built from the recipe
(``hf_type``) or one whose vocabulary was resized to another tokenizer has no directory open_clip
could rebuild it from, and is refused with a message saying what to do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from foundation.models.dual_encoder import DualEncoder


class ConversionError(ValueError):
    """The model has a part open_clip cannot represent; the message says which."""


# --------------------------------------------------------------------------------------------------
# timm ViT -> open_clip VisionTransformer


def _layer_norm_eps(module: nn.Module) -> float:
    if not isinstance(module, nn.LayerNorm):
        raise ConversionError(f"open_clip needs LayerNorm here, the model has {type(module).__name__}")
    return module.eps


def _vit_vision_cfg(vit: nn.Module) -> dict[str, Any]:
    from timm.layers import LayerScale, Mlp

    problems = []
    if getattr(vit, "cls_token", None) is None or vit.num_prefix_tokens != 1:
        problems.append("it needs exactly one class token (no register tokens)")
    if vit.pos_embed is None or getattr(vit, "no_embed_class", False):
        problems.append("it needs a learned position embedding that includes the class token")
    if vit.global_pool not in ("token", "avg") or getattr(vit, "attn_pool", None) is not None:
        problems.append(f"global_pool {vit.global_pool!r} (token or avg only)")
    if not isinstance(vit.patch_embed.norm, nn.Identity):
        problems.append("a norm inside the patch embedding")
    block = vit.blocks[0]
    attn = block.attn
    if not (hasattr(attn, "qkv") and isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity)
            and isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)):
        problems.append("attention with q/k norms or a fused layout other than qkv")
    if not isinstance(block.mlp, Mlp) or not isinstance(block.mlp.norm, nn.Identity):
        problems.append("an MLP other than Linear-GELU-Linear")
    elif not (isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none"):
        problems.append(f"activation {block.mlp.act} (exact GELU only)")
    if type(block).__name__ != "Block":
        problems.append(f"block type {type(block).__name__}")
    if problems:
        raise ConversionError("this timm ViT cannot become open_clip's VisionTransformer: " + "; ".join(problems))

    width = vit.embed_dim
    cfg: dict[str, Any] = {
        "image_size": list(vit.patch_embed.img_size),
        "patch_size": vit.patch_embed.patch_size[0],
        "width": width,
        "layers": len(vit.blocks),
        "head_width": width // attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / width,
        "no_ln_pre": isinstance(vit.norm_pre, nn.Identity),
        "pool_type": "tok" if vit.global_pool == "token" else "avg",
        "final_ln_after_pool": vit.global_pool == "avg",
        "norm_kwargs": {"eps": _layer_norm_eps(block.norm1)},
    }
    if isinstance(block.ls1, LayerScale):
        cfg["ls_init_value"] = 1e-5  # any value: the trained gammas are copied over it
    return cfg


def _vit_state_dict(vit: nn.Module, projection: Tensor) -> dict[str, Tensor]:
    from timm.layers import LayerScale

    sd = {k: v.detach() for k, v in vit.state_dict().items()}
    width = vit.embed_dim
    out: dict[str, Tensor] = {}
    weight = sd["patch_embed.proj.weight"]  # (width, C, p, p)
    if weight.shape[1] == 1:
        weight = weight.repeat(1, 3, 1, 1) / 3  # grey stem: the same response to a grey image given as RGB
    elif weight.shape[1] != 3:
        raise ConversionError(f"open_clip's patch embedding takes 3 channels, the model has {weight.shape[1]}")
    out["conv1.weight"] = weight
    pos = sd["pos_embed"][0].clone()  # (1 + N, width)
    if "patch_embed.proj.bias" in sd:
        pos[1:] += sd["patch_embed.proj.bias"]  # added to every patch token either way
    out["positional_embedding"] = pos
    out["class_embedding"] = sd["cls_token"].reshape(width)
    if not isinstance(vit.norm_pre, nn.Identity):
        out["ln_pre.weight"], out["ln_pre.bias"] = sd["norm_pre.weight"], sd["norm_pre.bias"]
    for i, block in enumerate(vit.blocks):
        src, dst = f"blocks.{i}.", f"transformer.resblocks.{i}."
        zeros = lambda n: torch.zeros(n, dtype=weight.dtype)  # noqa: E731
        out[dst + "ln_1.weight"], out[dst + "ln_1.bias"] = sd[src + "norm1.weight"], sd[src + "norm1.bias"]
        out[dst + "attn.in_proj_weight"] = sd[src + "attn.qkv.weight"]
        out[dst + "attn.in_proj_bias"] = sd.get(src + "attn.qkv.bias", zeros(3 * width))
        out[dst + "attn.out_proj.weight"] = sd[src + "attn.proj.weight"]
        out[dst + "attn.out_proj.bias"] = sd.get(src + "attn.proj.bias", zeros(width))
        out[dst + "ln_2.weight"], out[dst + "ln_2.bias"] = sd[src + "norm2.weight"], sd[src + "norm2.bias"]
        hidden = block.mlp.fc1.out_features
        out[dst + "mlp.c_fc.weight"] = sd[src + "mlp.fc1.weight"]
        out[dst + "mlp.c_fc.bias"] = sd.get(src + "mlp.fc1.bias", zeros(hidden))
        out[dst + "mlp.c_proj.weight"] = sd[src + "mlp.fc2.weight"]
        out[dst + "mlp.c_proj.bias"] = sd.get(src + "mlp.fc2.bias", zeros(width))
        if isinstance(block.ls1, LayerScale):
            out[dst + "ls_1.gamma"], out[dst + "ls_2.gamma"] = sd[src + "ls1.gamma"], sd[src + "ls2.gamma"]
    final = "norm" if vit.global_pool == "token" else "fc_norm"
    if not isinstance(getattr(vit, final), nn.LayerNorm):
        raise ConversionError(f"open_clip needs a final LayerNorm ({final}); the model has {getattr(vit, final)}")
    out["ln_post.weight"], out["ln_post.bias"] = sd[f"{final}.weight"], sd[f"{final}.bias"]
    out["proj"] = projection.detach().t()  # (width, embed_dim)
    return out


# --------------------------------------------------------------------------------------------------
# the whole model


def _timm_adapter(model: DualEncoder, backbone: str, stock: bool) -> tuple[dict, dict[str, Tensor]]:
    if not stock:
        raise ConversionError(
            f"{backbone}: open_clip re-creates a timm vision tower by name only, so a model with model.kwargs, "
            "img_size/patch_size overrides or in_chans != 3 cannot be exported; use a stock timm architecture or a ViT"
        )
    cfg = {"timm_model_name": backbone, "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
           "image_size": model.visual.pretrained_cfg.get("input_size", (3, 224, 224))[-1]}
    sd = {f"visual.trunk.{k}": v.detach() for k, v in model.visual.state_dict().items()}
    sd["visual.head.proj.weight"] = model.visual_projection.weight.detach()
    return cfg, sd


def _hf_text_cfg(model: DualEncoder) -> dict[str, Any]:
    """open_clip text_cfg of a Hugging Face text tower; it must be re-creatable from its directory."""
    from transformers import AutoConfig

    cfg = model.text_cfg
    if not cfg.get("hf_model_name"):
        raise ConversionError(
            "the Hugging Face text tower was built from the recipe (model.dual_encoder.text.hf_type): open_clip "
            "re-creates such a tower from a model directory; save its config with "
            "`model.text.transformer.config.save_pretrained(DIR)`, set hf_model: DIR and retrain or re-export")
    ours = model.text.transformer.config
    theirs = AutoConfig.from_pretrained(cfg["hf_model_name"], local_files_only=True, trust_remote_code=False)
    if (theirs.vocab_size, theirs.pad_token_id) != (ours.vocab_size, ours.pad_token_id):
        raise ConversionError(
            f"{cfg['hf_model_name']}: its config has vocab_size {theirs.vocab_size} / pad_token_id {theirs.pad_token_id}, "
            f"the model was resized to its tokenizer's {ours.vocab_size} / {ours.pad_token_id}; open_clip would "
            "rebuild the directory's sizes. Use the directory's own tokenizer (hf_tokenizer) or save the resized "
            "config into the directory")
    text_cfg = {"context_length": cfg["context_length"], "vocab_size": cfg["vocab_size"], "width": cfg["width"],
                "hf_model_name": cfg["hf_model_name"], "hf_model_pretrained": False,
                "hf_pooler_type": cfg["hf_pooler_type"], "hf_proj_type": cfg["hf_proj_type"]}
    if cfg.get("hf_tokenizer_name"):  # else open_clip uses its BPE tokenizer, as we do
        text_cfg["hf_tokenizer_name"] = cfg["hf_tokenizer_name"]
    return text_cfg


def to_open_clip(model: DualEncoder, backbone: str | None = None, stock_backbone: bool = False
                 ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(open_clip model config, open_clip ``CLIP`` state dict) equal to ``model``.

    ``backbone`` is the timm name of a timm vision tower; ``stock_backbone`` says it was created with
    timm's defaults (needed for the ``timm_model_name`` route)."""
    from timm.models.vision_transformer import VisionTransformer

    if model.vision_cfg is not None:  # an open_clip vision tower: already in open_clip's terms
        vision_cfg = dict(model.vision_cfg)
        visual_sd = {f"visual.{k}": v.detach() for k, v in model.visual.state_dict().items()}
    elif isinstance(model.visual, VisionTransformer):
        vision_cfg = _vit_vision_cfg(model.visual)
        visual_sd = {f"visual.{k}": v for k, v in _vit_state_dict(model.visual, model.visual_projection.weight).items()}
    else:
        vision_cfg, visual_sd = _timm_adapter(model, backbone or type(model.visual).__name__, stock_backbone)

    if "hf_model_type" in model.text_cfg:
        text_cfg = _hf_text_cfg(model)
        text_sd = {f"text.{k}": v.detach() for k, v in model.text.state_dict().items()}  # CustomTextCLIP.text
    else:
        text_cfg = {k: v for k, v in model.text_cfg.items() if k != "output_tokens"}
        text_sd = {k: v.detach() for k, v in model.text.state_dict().items() if k != "attn_mask"}  # CLIP: top level
    config: dict[str, Any] = {"embed_dim": model.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if model.quick_gelu:
        config["quick_gelu"] = True
    state = {**visual_sd, **text_sd}
    # open_clip applies exp(logit_scale) unclamped at inference: store the clamped value
    state["logit_scale"] = model.logit_scale.detach().clamp(max=math.log(model.max_logit_scale))
    return config, {k: v.contiguous().clone() for k, v in state.items()}


__all__ = ["ConversionError", "to_open_clip"]
