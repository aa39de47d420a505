"""``foundation export``: a finished checkpoint in another library's format.

- ``open_clip``: a dual-encoder checkpoint as open_clip's ``CLIP``. Writes into ``--out``::

      <name>.json                   model config: open_clip.add_model_config("<out>/<name>.json")
      open_clip_model.safetensors   weights:      open_clip.create_model_and_transforms("<name>", pretrained=...)
      open_clip_config.json         model config + preprocessing (our mean/std/size), for "local-dir:<out>"
      hf_text_model/                a Hugging Face text tower's config and tokenizer files (no weights), named
                                    relative to <out> in open_clip_config.json: the export stands alone

- ``timm``: the vision tower alone (a dual encoder's, or a classifier) as timm weights plus a
  ``config.json`` with the arguments for ``timm.create_model(..., checkpoint_path=<out>/model.safetensors)``.

- ``unihcp_scene``: a UniHCP checkpoint's scene pipeline (detection → top-down person crops → pose / parsing /
  attributes / ReID, ``foundation.models.unihcp_scene``) as one FP32 ONNX graph ``scene.onnx`` at a fixed scene
  size, and ``scene.json`` (inputs, outputs and their shapes, each task's names, the settings, and onnxruntime's
  largest difference from PyTorch per output on a random scene, measured at export).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from foundation.config import Recipe
from foundation.trust import copy_hf_files

FORMATS = ("open_clip", "timm", "unihcp_scene")


def _preprocess_cfg(recipe: Recipe) -> dict[str, Any]:
    from foundation.data.transforms import normalization

    mean, std = normalization(recipe.data)
    if len(mean) == 1:  # grey images reach open_clip as RGB: the same statistics on each channel
        mean, std = mean * 3, std * 3
    return {"size": recipe.data.image_size, "mode": "RGB", "mean": list(mean), "std": list(std),
            "interpolation": recipe.data.augment.interpolation, "resize_mode": "shortest", "fill_color": 0}


def _stock_backbone(recipe: Recipe) -> bool:
    m = recipe.model
    in_chans = m.in_chans if m.in_chans is not None else recipe.data.in_chans
    return not m.kwargs and m.img_size is None and m.patch_size is None and in_chans == 3


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _bundle_hf_dirs(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """A Hugging Face text tower's directories (config and tokenizer files; no weights, which the export's
    safetensors hold, and no code) copied into the export. ``config`` (``<name>.json``, for open_clip on this
    machine) names the copies by absolute path; the returned config (``open_clip_config.json``) names them
    relative to the export, so a moved export still rebuilds, and the artefact gate reads such a directory
    only inside the export (docs/trust.md)."""
    text = config.get("text_cfg") or {}
    portable_text, copies = dict(text), {}
    for key, folder in (("hf_model_name", "hf_text_model"), ("hf_tokenizer_name", "hf_tokenizer")):
        if not text.get(key) or not Path(text[key]).is_dir():
            continue
        src = Path(text[key]).resolve()
        if src not in copies:
            copy_hf_files(src, out / folder)  # as training does into each checkpoint (foundation.trust)
            copies[src] = folder
        text[key] = str((out / copies[src]).resolve())
        portable_text[key] = copies[src]
    return {**config, "text_cfg": portable_text} if text else config


def export_open_clip(model: nn.Module, recipe: Recipe, out: Path, name: str | None = None) -> dict[str, Any]:
    from foundation.models.dual_encoder import DualEncoder
    from foundation.models.open_clip_convert import to_open_clip

    if not isinstance(model, DualEncoder):
        raise ValueError(f"--format open_clip needs a clip/declip checkpoint; this one is task {recipe.task.name!r}")
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", name or recipe.name)
    config, state = to_open_clip(model, backbone=recipe.model.backbone, stock_backbone=_stock_backbone(recipe))
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "open_clip_model.safetensors"
    save_file(state, str(weights))
    portable = _bundle_hf_dirs(config, out)
    _write_json(out / f"{name}.json", config)
    _write_json(out / "open_clip_config.json", {"model_cfg": portable, "preprocess_cfg": _preprocess_cfg(recipe)})
    return {
        "format": "open_clip", "name": name, "model_config": str(out / f"{name}.json"), "weights": str(weights),
        "open_clip_config": str(out / "open_clip_config.json"),
        "usage": f"open_clip.add_model_config('{out / (name + '.json')}'); "
                 f"open_clip.create_model_and_transforms('{name}', pretrained='{weights}')  "
                 f"# or create_model_and_transforms('local-dir:{out}') for our preprocessing",
    }


def export_timm(model: nn.Module, recipe: Recipe, out: Path, backbone_only: bool = False) -> dict[str, Any]:
    from foundation.models.dual_encoder import DualEncoder

    dual = isinstance(model, DualEncoder) or backbone_only
    if isinstance(model, DualEncoder) and model.vision_cfg is not None:
        raise ValueError("--format timm: this model's vision tower is open_clip's (model.dual_encoder.vision_open_clip), "
                         "not a timm model; export it with --format open_clip")
    tower = model.visual if isinstance(model, DualEncoder) else model
    m = recipe.model
    kwargs = dict(m.kwargs)
    for key in ("img_size", "patch_size"):
        if getattr(m, key) is not None:
            kwargs[key] = getattr(m, key)
    in_chans = m.in_chans if m.in_chans is not None else recipe.data.in_chans
    pre = _preprocess_cfg(recipe)
    config = {
        "architecture": m.backbone, "num_classes": 0 if dual else m.num_classes, "in_chans": in_chans,
        "kwargs": kwargs,
        "pretrained_cfg": {"input_size": [in_chans, recipe.data.image_size, recipe.data.image_size],
                           "mean": pre["mean"][:in_chans], "std": pre["std"][:in_chans],
                           "interpolation": pre["interpolation"], "crop_pct": recipe.data.augment.crop_pct},
        "note": "timm.create_model(architecture, num_classes=num_classes, in_chans=in_chans, "
                "checkpoint_path='model.safetensors', **kwargs); our own backbones (ceit_*) need `import foundation.models`",
    }
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in tower.state_dict().items()}, str(weights))
    _write_json(out / "config.json", config)
    return {"format": "timm", "weights": str(weights), "config": str(out / "config.json"), **config}


def export_unihcp_scene(checkpoint: str | Path, out: Path, scene_size: tuple[int, int] = (720, 1280),
                        max_people: int = 20, score_threshold: float = 0.3) -> dict[str, Any]:
    """``scene.onnx`` + ``scene.json`` (module docstring) of a UniHCP checkpoint with a detection task and at
    least one person task; ValueError (one line) otherwise."""
    import numpy as np
    import torch

    from foundation.models.unihcp_scene import ONNX_OPSET, PERSON_OUTPUTS, export_scene_onnx
    from foundation.predict import scene_module, unihcp_tasks
    from foundation.quant.onnx_export import ort_session

    h, w = (int(v) for v in scene_size)
    if h < 1 or w < 1 or max_people < 1:
        raise ValueError(f"--scene-size {h} {w} / --max-people {max_people}: sizes and counts must be positive")
    tasks, _ = unihcp_tasks(checkpoint)
    kinds = {n: t.kind for n, (t, _) in tasks.items()}
    if "detection" not in kinds.values() or set(kinds.values()) <= {"detection"}:
        raise ValueError(f"--format unihcp_scene needs a detection task and a person task (pose, parsing, attributes "
                         f"or reid); this checkpoint's UniHCP tasks are {kinds}")
    scene = scene_module(tasks, "cpu", max_people, score_threshold)
    out.mkdir(parents=True, exist_ok=True)
    graph = export_scene_onnx(scene, out / "scene.onnx", (h, w))
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = [t.numpy() for t in scene(image)]
    got = ort_session(graph).run(None, {"image": image.numpy()})
    names = scene.output_names()
    diff = {n: float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) for n, a, b in zip(names, ref, got)}
    detector = next(n for n, k in kinds.items() if k == "detection")  # scene_module takes the first
    meta_keys = ("keypoint_names", "skeleton", "class_names", "attribute_names")
    info = {
        "format": "unihcp_scene", "graph": "scene.onnx", "opset": ONNX_OPSET, "checkpoint": str(checkpoint),
        "input": {"name": "image", "shape": [1, 3, h, w], "layout": "RGB, float32 in [0, 1] (ToTensor's range)"},
        "outputs": {n: list(a.shape) for n, a in zip(names, ref)},
        "detector": detector, "max_people": scene.max_people, "score_threshold": scene.score_threshold,
        "nms_iou": scene.nms_iou, "box_padding": scene.padding,
        "tasks": {n: {"kind": p.deploy.kind, "input_size": list(p.deploy.image_size),
                      "output": f"{n}.{PERSON_OUTPUTS[p.deploy.kind]}",
                      **{k: tasks[n][0].meta.get(k) for k in meta_keys if tasks[n][0].meta.get(k) is not None}}
                  for n, p in scene.people.items()},
        "onnxruntime_max_abs_diff": diff,
    }
    _write_json(out / "scene.json", info)
    return {"format": "unihcp_scene", "graph": str(out / "scene.onnx"), "config": str(out / "scene.json"),
            "outputs": info["outputs"], "onnxruntime_max_abs_diff": diff}


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str, name: str | None = None,
                      task: str | None = None, scene_size: tuple[int, int] = (720, 1280), max_people: int = 20,
                      score_threshold: float = 0.3) -> dict[str, Any]:
    """Export a checkpoint (or a run directory: its newest checkpoint) to ``fmt`` in ``out``. A multi-task
    run exports its shared backbone alone as timm weights, or one (clip/declip) ``task`` as open_clip; a
    UniHCP run its scene pipeline as one ONNX graph (``unihcp_scene``)."""
    from foundation.artefacts import load_model, load_task

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {list(FORMATS)}")
    if fmt == "unihcp_scene":
        return export_unihcp_scene(checkpoint, Path(out), scene_size, max_people, score_threshold)
    if fmt == "timm" and task is None:
        whole, _, recipe = load_task(checkpoint)
        if recipe.tasks is not None:  # the shared backbone, without any task's head
            view = recipe.model_copy(update={"model": recipe.model.model_copy(update={"num_classes": 0}),
                                             "data": next(iter(recipe.tasks.values())).data, "tasks": None})
            return export_timm(whole.backbone, view, Path(out), backbone_only=True)
    model, recipe = load_model(checkpoint, task=task)
    if fmt == "open_clip":
        return export_open_clip(model, recipe, Path(out), name)
    return export_timm(model, recipe, Path(out))


__all__ = ["FORMATS", "export_checkpoint", "export_open_clip", "export_timm", "export_unihcp_scene"]
