"""The artefact gate: what a checkpoint, an export or a quantized model may ask of this process.

Every dictionary read from an artefact (a checkpoint's ``recipe.yaml``, a timm export's ``config.json``, an
open_clip export's ``open_clip_config.json``, a quantized model's ``quant.json``) passes here before it
reaches timm, open_clip, transformers or torch. The rules allow what is known and refuse the rest:

- model names are names this process registered locally (timm's registry, open_clip's bundled configs):
  plain identifiers, so no ``hf-hub:``, ``local-dir:``, URL or path can name a model;
- model keyword arguments pass an allow-list per backbone family (``MODEL_KWARGS``), values plain data;
- files an artefact names (a Hugging Face text tower's directories) must lie inside the artefact; training and
  export copy them in (``bundle_text_tower``, ``copy_hf_files``);
- a recipe read from an artefact has no ``base:`` include;
- outputs written by default go under the run directory (``output_under``).

A refusal is ``ArtefactRefused`` naming the file and key: the CLI prints it as one line and exits 2.
The hubs are switched off for the whole ``foundation`` process (``hubs_offline``) unless the user opts in.
docs/trust.md is the same list for users.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from foundation.config import RecipeError

# set to 1 to let the hubs' libraries reach the network (they are offline by default)
HUB_OPT_IN = "FOUNDATION_ALLOW_HUB"
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a registry name: no ':' (hf-hub:, local-dir:, URLs), no '/'
_WORD = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")  # a string value of a model argument (global_pool: "avg", ...)

# timm / our backbone family (the module that registered the model) -> keyword arguments an artefact may set.
# Sizes and regularisation only: nothing that names a file, a class, a callable or a hub entry.
_VIT = {"img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
        "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "class_token", "no_embed_class", "reg_tokens", "pre_norm",
        "final_norm", "fc_norm", "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate",
        "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "pos_embed"}
MODEL_KWARGS: dict[str, frozenset[str]] = {
    "vision_transformer": frozenset(_VIT),
    "resnet": frozenset({"layers", "channels", "in_chans", "num_classes", "output_stride", "global_pool", "cardinality",
                         "base_width", "stem_width", "stem_type", "replace_stem_pool", "block_reduce_first",
                         "down_kernel_size", "avg_down", "drop_rate", "drop_path_rate", "drop_block_rate",
                         "zero_init_last"}),
    "ceit": frozenset({"img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth",
                       "num_heads", "mlp_ratio", "qkv_bias", "drop_rate", "drop_path_rate"}),
    # the INTERN generalist: its own arguments; the rest go to `base` and pass base's family list
    "intern": frozenset({"base", "experts", "adapter_stages", "num_classes", "in_chans"}),
}

# open_clip model config keys an export may set (open_clip's CLIP / CLIPVisionCfg / CLIPTextCfg, sizes only)
OPEN_CLIP_MODEL = frozenset({"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                             "init_logit_bias", "custom_text"})
OPEN_CLIP_VISION = frozenset({"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value",
                              "patch_dropout", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads",
                              "no_ln_pre", "pos_embed_type", "final_ln_after_pool", "pool_type", "output_tokens",
                              "act_kwargs", "norm_kwargs", "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads",
                              "scale_attn_inner", "scale_attn", "scale_fc", "timm_model_name", "timm_model_pretrained",
                              "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"})
OPEN_CLIP_TEXT = frozenset({"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value",
                            "embed_cls", "pad_id", "no_causal_mask", "final_ln_after_pool", "pool_type", "proj_bias",
                            "proj_type", "output_tokens", "act_kwargs", "norm_kwargs", "eos_id", "block_type",
                            "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                            "scale_fc", "hf_model_name", "hf_tokenizer_name", "hf_model_pretrained",
                            "hf_proj_type", "hf_pooler_type"})
# arguments of the norm / activation layers open_clip builds (nn.LayerNorm, nn.GELU)
OPEN_CLIP_LAYER_KWARGS = {"norm_kwargs": frozenset({"eps", "elementwise_affine", "bias"}),
                          "act_kwargs": frozenset({"approximate"})}
OPEN_CLIP_PREPROCESS = frozenset({"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"})
TIMM_EXPORT = frozenset({"architecture", "num_classes", "in_chans", "kwargs", "pretrained_cfg", "note"})
TIMM_PRETRAINED_CFG = frozenset({"input_size", "mean", "std", "interpolation", "crop_pct"})


class ArtefactRefused(RecipeError):
    """An artefact asks for something the gate does not allow; the message names the file and the key."""


def _refuse(where: str, why: str) -> ArtefactRefused:
    return ArtefactRefused(f"{where}: {why} (refused: artefacts are data; see docs/trust.md)")


# --------------------------------------------------------------------------------------------------
# the process


def hubs_offline(environ: dict[str, str] | None = None) -> bool:
    """Switch the Hugging Face hub and transformers offline for this process unless ``FOUNDATION_ALLOW_HUB=1``;
    returns whether they are offline. The ``foundation`` command calls it first thing."""
    env = os.environ if environ is None else environ
    if env.get(HUB_OPT_IN) == "1":
        return False
    for key in OFFLINE_SWITCHES:
        env[key] = "1"
    return True


def sha256_of(paths: Iterable[str | Path]) -> str:
    """sha256 over the bytes of ``paths`` in order (one file: that file's usual digest)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# values, names and paths


def plain(value: Any, where: str) -> Any:
    """``value`` when it is plain data (numbers, booleans, None, short words, lists/dicts of them)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if not _WORD.match(value):
            raise _refuse(where, f"{value!r} is not a plain value (a word of letters, digits, '_', '-', '.')")
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    raise _refuse(where, f"a {type(value).__name__} is not plain data")


def timm_name(name: Any, where: str) -> str:
    """``name`` when this process registered it with timm (ours included); no hub, path or URL."""
    import timm  # our own backbones are registered: importing the foundation package registers them

    if not isinstance(name, str) or not _NAME.match(name):
        raise _refuse(where, f"{name!r} is not a model name registered here (no hf-hub:, local-dir:, URL or path)")
    if not timm.is_model(name):
        raise _refuse(where, f"{name!r} is not a model registered with timm here")
    return name


def family(name: str) -> str:
    """The backbone family of a registered timm model: the module that registered it."""
    from timm.models._registry import _model_to_module

    return _model_to_module.get(name, "")


def open_clip_name(name: Any, where: str) -> str:
    """``name`` when it is one of open_clip's bundled model configs (no hub, path or URL)."""
    import open_clip

    if not isinstance(name, str) or not _NAME.match(name) or name not in open_clip.list_models():
        raise _refuse(where, f"{name!r} is not an open_clip model config bundled here")
    return name


def inside(path: Any, root: Path, where: str) -> Path:
    """``path`` (relative: to ``root``) resolved, when it lies inside ``root``."""
    if not isinstance(path, str) or not path or "://" in path or path.startswith(("hf-hub:", "local-dir:", "pipe:")):
        raise _refuse(where, f"{path!r} is not a path inside {root}")
    p = Path(path)
    p = (p if p.is_absolute() else root / p).resolve()
    base = Path(root).resolve()
    if p != base and base not in p.parents:
        raise _refuse(where, f"{path} lies outside the artefact ({base})")
    return p


def output_under(path: Path, roots: Iterable[Path], where: str) -> Path:
    """``path`` when it lies under one of ``roots`` (where a command may write by default)."""
    p = Path(path).resolve()
    bases = [Path(r).resolve() for r in roots]
    if not any(p == b or b in p.parents for b in bases):
        raise _refuse(where, f"{p} is outside {', '.join(map(str, bases))}; name an output directory with --out")
    return p


# --------------------------------------------------------------------------------------------------
# model arguments


def model_kwargs(name: str, kwargs: Any, where: str, root: Path | None = None) -> dict[str, Any]:
    """``kwargs`` for ``timm.create_model(name, ...)`` when every key is on ``name``'s family allow-list and
    every value is plain data. The INTERN generalist's ``base`` must be a registered name of another family
    and its ``experts`` paths inside ``root`` (the artefact)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise _refuse(where, f"a mapping of keyword arguments, got {type(kwargs).__name__}")
    fam = family(name)
    allowed = MODEL_KWARGS.get(fam)
    if allowed is None:
        if kwargs:
            raise _refuse(where, f"{name} (family {fam!r}) takes no keyword arguments from an artefact; families "
                                 f"with an allow-list: {sorted(MODEL_KWARGS)}")
        return {}
    out: dict[str, Any] = {}
    base = None
    if fam == "intern":
        base = timm_name(kwargs.get("base", "vit_tiny_patch16_224"), f"{where}.base")
        if family(base) == "intern":
            raise _refuse(f"{where}.base", "a generalist cannot be the base of a generalist")
        rest = {k: v for k, v in kwargs.items() if k not in MODEL_KWARGS["intern"]}
        out.update(model_kwargs(base, rest, where))
    for key, value in kwargs.items():
        if base is not None and key not in MODEL_KWARGS["intern"]:
            continue  # checked against base's family above
        if key not in allowed:
            raise _refuse(f"{where}.{key}", f"not an allowed argument for {fam} backbones (weights come from the "
                                            f"checkpoint or model.init, never a model argument); allowed: {sorted(allowed)}")
        if key == "experts":
            # never opened: the generalist's checkpoint holds its experts' weights, so an artefact's expert list
            # (the training runs' paths) only says how many to build (models/intern.py takes a count)
            if isinstance(value, bool) or not isinstance(value, (list, tuple, int)):
                raise _refuse(f"{where}.experts", "a list of the expert runs, or their number")
            out[key] = value if isinstance(value, int) else len(value)
        elif key == "base":
            out[key] = base
        else:
            out[key] = plain(value, f"{where}.{key}")
    return out


# --------------------------------------------------------------------------------------------------
# artefact files


def read_artefact_yaml(file: Path) -> dict:
    """A YAML mapping read from an artefact (``yaml.safe_load``); a ``base:`` include is refused."""
    try:
        data = yaml.safe_load(Path(file).read_text())
    except yaml.YAMLError as e:
        raise _refuse(str(file), f"not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _refuse(str(file), f"unreadable ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _refuse(str(file), f"a recipe is a mapping, got {type(data).__name__}")
    if "base" in data:
        raise _refuse(f"{file}: base", "a recipe read from a checkpoint includes no other file")
    return data


def check_model_section(model: Any, root: Path, where: str) -> dict:
    """A recipe's ``model:`` mapping read from an artefact: local names, allowed kwargs, files inside ``root``."""
    if not isinstance(model, Mapping):
        return model  # the schema reports it
    model = dict(model)
    backbone = timm_name(model.get("backbone", "resnet18"), f"{where}.backbone")
    model["kwargs"] = model_kwargs(backbone, model.get("kwargs") or {}, f"{where}.kwargs", root)
    dual = model.get("dual_encoder")
    if isinstance(dual, Mapping):
        dual = dict(dual)
        if dual.get("vision_open_clip") is not None:
            open_clip_name(dual["vision_open_clip"], f"{where}.dual_encoder.vision_open_clip")
        text = dual.get("text")
        if isinstance(text, Mapping):
            text = dict(text)
            if text.get("open_clip") is not None:
                open_clip_name(text["open_clip"], f"{where}.dual_encoder.text.open_clip")
            if text.get("hf_type") is not None:
                plain(text["hf_type"], f"{where}.dual_encoder.text.hf_type")
            for key, _ in HF_TEXT_DIRS:  # copied into every step directory by training (bundle_text_tower)
                if text.get(key) is not None:
                    at = f"{where}.dual_encoder.text.{key}"
                    directory = inside(text[key], root, at)
                    if not directory.is_dir():
                        raise _refuse(at, f"{text[key]!r} is not a directory inside the checkpoint (nothing is "
                                          "downloaded)")
                    text[key] = str(directory)
            dual["text"] = text
        model["dual_encoder"] = dual
    return model


# a Hugging Face text tower's directories in a recipe -> the folder an artefact holds their copy in
HF_TEXT_DIRS = (("hf_model", "hf_text_model"), ("hf_tokenizer", "hf_tokenizer"))
_NOT_BUNDLED = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".py")  # weights and code


def copy_hf_files(src: Path, dst: Path) -> None:
    """A Hugging Face directory's config and tokenizer files copied into ``dst``: no weights (the artefact's
    own safetensors hold them) and no code."""
    dst.mkdir(parents=True, exist_ok=True)
    if Path(src).resolve() == dst.resolve():
        return
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith(_NOT_BUNDLED):
            shutil.copyfile(f, dst / f.name)


def bundle_text_tower(recipe: str | dict, root: Path) -> str | dict:
    """A resolved recipe (YAML text or plain data, returned the same way) whose Hugging Face text tower
    directories (``model.dual_encoder.text.hf_model`` / ``hf_tokenizer``) are copied into ``root``
    (``copy_hf_files``) and named relative to it, so a checkpoint or a quantized tower rebuilds from inside
    itself (``check_model_section`` reads no other directory)."""
    text_form = isinstance(recipe, str)
    if text_form and "hf_model" not in recipe and "hf_tokenizer" not in recipe:
        return recipe
    recipe_yaml = recipe
    recipe = yaml.safe_load(recipe) if text_form else copy.deepcopy(recipe)
    dual = ((recipe or {}).get("model") or {}).get("dual_encoder") or {}
    text = dual.get("text") or {}
    copies: dict[Path, str] = {}
    for key, folder in HF_TEXT_DIRS:
        if not text.get(key) or not Path(text[key]).expanduser().is_dir():
            continue  # unset, or already missing: building the model says so
        src = Path(text[key]).expanduser().resolve()
        if src not in copies:
            copy_hf_files(src, Path(root) / folder)
            copies[src] = folder
        text[key] = copies[src]
    if not text_form:
        return recipe
    return yaml.safe_dump(recipe, sort_keys=False) if copies else recipe_yaml


def check_recipe(data: dict, root: Path, where: str) -> dict:
    """The raw recipe mapping of a checkpoint, gated: its model section (``check_model_section``); data paths
    are checked where they are used (``foundation.data.local_spec``)."""
    data = dict(data)
    if "base" in data:  # also for a recipe held inside another file (a quantized model's quant.json)
        raise _refuse(f"{where}: base", "a recipe read from an artefact includes no other file")
    if "model" in data:
        data["model"] = check_model_section(data["model"], root, f"{where}: model")
    return data


def _keys(data: Any, allowed: frozenset[str], where: str) -> dict:
    if not isinstance(data, Mapping):
        raise _refuse(where, f"a mapping, got {type(data).__name__}")
    extra = sorted(set(map(str, data)) - allowed)
    if extra:
        raise _refuse(f"{where}.{extra[0]}", f"not an allowed key; allowed: {sorted(allowed)}")
    return dict(data)


def check_timm_export(cfg: Any, root: Path) -> dict:
    """A ``foundation export --format timm`` ``config.json``: a registered architecture, allowed kwargs,
    plain preprocessing."""
    where = str(root / "config.json")
    cfg = _keys(cfg, TIMM_EXPORT, where)
    name = timm_name(cfg.get("architecture"), f"{where}: architecture")
    out = {"architecture": name, "kwargs": model_kwargs(name, cfg.get("kwargs") or {}, f"{where}: kwargs")}
    for key in ("num_classes", "in_chans"):
        value = cfg.get(key, 0 if key == "num_classes" else 3)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100_000:
            raise _refuse(f"{where}: {key}", f"{value!r} is not a count")
        out[key] = value
    pc = cfg.get("pretrained_cfg")
    out["pretrained_cfg"] = plain(_keys(pc, TIMM_PRETRAINED_CFG, f"{where}: pretrained_cfg"),
                                  f"{where}: pretrained_cfg") if pc else None
    return out


def check_open_clip_config(cfg: Any, root: Path) -> dict:
    """An open_clip export's ``open_clip_config.json``: allowed keys, plain values, a registered timm tower
    without pretrained weights, a Hugging Face text tower only from a directory inside the export and never
    pretrained from the hub."""
    where = str(root / "open_clip_config.json")
    cfg = _keys(cfg, frozenset({"model_cfg", "preprocess_cfg"}), where)
    model = _keys(cfg.get("model_cfg"), OPEN_CLIP_MODEL, f"{where}: model_cfg")
    vision = _keys(model.get("vision_cfg", {}), OPEN_CLIP_VISION, f"{where}: model_cfg.vision_cfg")
    text = _keys(model.get("text_cfg", {}), OPEN_CLIP_TEXT, f"{where}: model_cfg.text_cfg")
    for part, name in ((vision, "vision_cfg"), (text, "text_cfg")):
        for key, allowed in OPEN_CLIP_LAYER_KWARGS.items():
            if part.get(key) is not None:
                _keys(part[key], allowed, f"{where}: model_cfg.{name}.{key}")
    if vision.get("timm_model_name") is not None:
        timm_name(vision["timm_model_name"], f"{where}: model_cfg.vision_cfg.timm_model_name")
    for part, key in ((vision, "timm_model_pretrained"), (text, "hf_model_pretrained")):
        if part.get(key):
            raise _refuse(f"{where}: {key}", "pretrained weights would be downloaded; an export carries its own")
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key) is not None:
            directory = inside(text[key], root, f"{where}: model_cfg.text_cfg.{key}")
            if not directory.is_dir():
                raise _refuse(f"{where}: model_cfg.text_cfg.{key}", f"{text[key]!r} is not a directory inside the export")
            text[key] = str(directory)
    safe = {k: v for k, v in text.items() if k not in ("hf_model_name", "hf_tokenizer_name")}
    text = {**plain(safe, f"{where}: model_cfg.text_cfg"), **{k: text[k] for k in text if k not in safe}}
    model = {**plain({k: v for k, v in model.items() if k not in ("vision_cfg", "text_cfg")}, f"{where}: model_cfg"),
             "vision_cfg": plain(vision, f"{where}: model_cfg.vision_cfg"), "text_cfg": text}
    pre = cfg.get("preprocess_cfg") or {}
    pre = plain(_keys(pre, OPEN_CLIP_PREPROCESS, f"{where}: preprocess_cfg"), f"{where}: preprocess_cfg")
    return {"model_cfg": model, "preprocess_cfg": pre}


__all__ = ["ArtefactRefused", "HUB_OPT_IN", "MODEL_KWARGS", "check_model_section", "check_open_clip_config",
           "check_recipe", "check_timm_export", "hubs_offline", "inside", "model_kwargs", "open_clip_name",
           "bundle_text_tower", "copy_hf_files", "output_under", "plain", "read_artefact_yaml", "sha256_of", "timm_name"]
