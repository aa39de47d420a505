"""``foundation predict``: run a UniHCP checkpoint's tasks on one image and draw what they see.

    foundation predict --checkpoint runs/unihcp_tiny_synthetic --image person.png --task all --out pred/

writes ``pred/prediction.png`` (the image with the skeleton, the parsing overlay, the detected boxes and the
present attributes), ``pred/prediction.json`` (every task's outputs in source-image pixels) and, for ReID,
``pred/reid_embedding.npy`` (the L2-normalised feature, a plain ``.npy`` array). Each task sees the image
letterboxed to its own ``data.image_size``, as in evaluation.

A scene (``--mode scene``, or ``auto`` when the detector finds more than one person or one who fills less
than half the picture) goes top-down, as the released code evaluates the per-person tasks, through the module
``foundation export --format unihcp_scene`` writes as one ONNX graph (``foundation.models.unihcp_scene``):
detection on the whole image → each person's box grown to each task's input aspect and ×1.25 about its centre
(the release's ``_box2cs``, ``BOX_PADDING``), sampled bilinearly → pose, parsing, attributes and ReID on each
crop → everything mapped back to the scene's pixels, drawn on one picture, and written as one JSON list of
people (``people``: box, score, each task's crop box, keypoints, present parsing classes, attributes, the row
of ``reid_embeddings.npy``). A single-person picture keeps the path above.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

from foundation.models.unihcp_scene import BOX_PADDING

PALETTE = np.array([[0, 0, 0], [128, 0, 0], [255, 85, 0], [255, 170, 0], [0, 128, 0], [0, 0, 255], [85, 51, 0],
                    [0, 255, 255], [0, 85, 85], [85, 255, 170], [170, 255, 85], [255, 255, 0], [255, 0, 255],
                    [51, 85, 128], [0, 128, 128], [128, 128, 0], [255, 255, 255], [170, 0, 51], [52, 86, 128],
                    [0, 119, 221]], np.uint8)


class PredictError(ValueError):
    """A checkpoint or image ``predict`` cannot use (the CLI prints one line and exits 2)."""


def unihcp_tasks(checkpoint: str | Path, device: str = "cpu") -> tuple[dict, object]:
    """``{task name: (UniHCPTask, its DataConfig)}`` of a checkpoint's UniHCP tasks, and the recipe."""
    from foundation.artefacts import load_task
    from foundation.tasks.unihcp import UniHCPTask

    whole, _, recipe = load_task(checkpoint)
    whole.to(device).eval()
    if recipe.tasks is None:
        found = {recipe.task.name: (whole, recipe.data)} if isinstance(whole, UniHCPTask) else {}
    else:
        found = {n: (whole.tasks[n], e.data) for n, e in recipe.tasks.items() if isinstance(whole.tasks[n], UniHCPTask)}
    if not found:
        raise PredictError(f"{checkpoint}: no UniHCP task (unihcp_*) in this checkpoint")
    return found, recipe


@torch.no_grad()
def predict_image(tasks: dict, image: Image.Image, device: str = "cpu", score_threshold: float = 0.3,
                  max_boxes: int = 20) -> dict:
    """Every task's prediction on ``image``, in source pixels: ``{name: {"kind", ...}}``."""
    from foundation.data.human_transforms import letterbox_image
    from foundation.losses.unihcp import heatmap_peaks, parsing_prediction

    results = {}
    for name, (task, data) in tasks.items():
        x, s, offset = letterbox_image(image, data)
        size, (in_h, in_w) = x.shape[-1], x.shape[-2:]  # width: one stride for both axes
        out = task.model(x[None].to(device))[-1]
        kind, meta = task.kind, task.meta
        res: dict = {"kind": kind}
        if kind == "pose":
            xy, val = heatmap_peaks(out["maps"].float().cpu(), size / out["maps"].shape[-1])
            src = ((xy[0] + 0.5 - torch.tensor(offset, dtype=torch.float32)) / s - 0.5)
            res["keypoints"] = [[float(a), float(b), float(v)] for (a, b), v in
                                zip(src.tolist(), out["logits"][0].sigmoid().tolist())]
            res["names"], res["skeleton"] = meta.get("keypoint_names"), meta.get("skeleton")
        elif kind == "parsing":
            maps = F.interpolate(out["maps"].float(), size=(in_h, in_w), mode="bilinear", align_corners=False)
            label = parsing_prediction(out["logits"].float(), maps)[0].cpu().numpy().astype(np.uint8)
            # back to the source image: crop the letterbox and resize (nearest)
            x0, y0 = (int(round(v)) for v in offset)
            x1, y1 = int(round(offset[0] + s * image.width)), int(round(offset[1] + s * image.height))
            crop = Image.fromarray(label[max(y0, 0):min(y1, in_h), max(x0, 0):min(x1, in_w)])
            res["label_map"] = np.asarray(crop.resize(image.size, Image.Resampling.NEAREST))
            res["class_names"] = meta.get("class_names")
        elif kind == "attributes":
            probs = out["logits"][0].float().sigmoid().tolist()
            res["attributes"] = dict(zip(meta.get("attribute_names") or map(str, range(len(probs))), probs))
        elif kind == "reid":
            res["embedding"] = F.normalize(out["feature"].float(), dim=1)[0].cpu().numpy()
        elif kind == "detection":
            from torchvision.ops import box_convert, nms

            scores = out["logits"][0].float().sigmoid().cpu()
            scale = torch.tensor([in_w, in_h, in_w, in_h], dtype=torch.float32)  # [0, 1] per axis -> pixels
            boxes = box_convert(out["boxes"][0].float().cpu() * scale, "cxcywh", "xyxy")
            boxes = (boxes.view(-1, 2, 2) - torch.tensor(offset, dtype=torch.float32)) / s
            boxes = boxes.view(-1, 4)
            keep = nms(boxes, scores, 0.5)[:max_boxes]
            keep = keep[scores[keep] >= score_threshold]
            res["boxes"] = boxes[keep].tolist()
            res["scores"] = scores[keep].tolist()
        results[name] = res
    return results


def draw_prediction(image: Image.Image, results: dict) -> Image.Image:
    """The image with every task's output drawn: parsing overlay, boxes, skeleton, attributes."""
    canvas = image.convert("RGB")
    for res in results.values():
        if res["kind"] == "parsing":
            colour = PALETTE[res["label_map"] % len(PALETTE)]
            mask = (res["label_map"] > 0)[..., None]
            arr = np.asarray(canvas).astype(np.float32)
            canvas = Image.fromarray(np.where(mask, 0.5 * arr + 0.5 * colour, arr).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    lines = []
    for name, res in results.items():
        if res["kind"] == "detection":
            for box, score in zip(res["boxes"], res["scores"]):
                draw.rectangle(box, outline=(0, 255, 0), width=2)
                draw.text((box[0] + 2, box[1] + 2), f"{score:.2f}", fill=(0, 255, 0))
        elif res["kind"] == "pose":
            kps = res["keypoints"]
            for a, b in res.get("skeleton") or []:
                if kps[a][2] > 0.5 and kps[b][2] > 0.5:
                    draw.line([tuple(kps[a][:2]), tuple(kps[b][:2])], fill=(255, 0, 0), width=2)
            for x, y, v in kps:
                r = 3 if v > 0.5 else 2
                draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 0), fill=(255, 0, 0) if v > 0.5 else None)
        elif res["kind"] == "attributes":
            present = [n for n, p in res["attributes"].items() if p > 0.5]
            lines.append(f"{name}: " + (", ".join(present) if present else "(none)"))
        elif res["kind"] == "reid":
            lines.append(f"{name}: embedding {len(res['embedding'])}-d")
    return _with_caption(canvas, lines)


def _with_caption(canvas: Image.Image, lines: list[str]) -> Image.Image:
    """``canvas`` with ``lines`` written on a white band below it (unchanged when there are none)."""
    if not lines:
        return canvas
    framed = Image.new("RGB", (canvas.width, canvas.height + 12 * len(lines) + 4), (255, 255, 255))
    framed.paste(canvas, (0, 0))
    d = ImageDraw.Draw(framed)
    for i, line in enumerate(lines):
        d.text((2, canvas.height + 2 + 12 * i), line, fill=(0, 0, 0))
    return framed


PERSON_TASKS = ("pose", "parsing", "attributes", "reid")


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as the scene graph's input: (1, 3, H, W) RGB in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def is_scene(boxes: list, image: Image.Image, min_cover: float = 0.5) -> bool:
    """Whether detections make ``image`` a scene (top-down per person) rather than a single-person crop: more
    than one person, or one whose box covers less than ``min_cover`` of the picture."""
    if len(boxes) > 1:
        return True
    if not boxes:
        return False
    x0, y0, x1, y1 = boxes[0]
    return (max(x1 - x0, 0) * max(y1 - y0, 0)) < min_cover * image.width * image.height


def scene_module(tasks: dict, device: str = "cpu", max_people: int = 20, score_threshold: float = 0.3):
    """The checkpoint's ``UniHCPScene`` (its first detection task, if any, and its person tasks): what
    ``foundation export --format unihcp_scene`` writes as one ONNX graph."""
    from foundation.models.unihcp_scene import scene_from_tasks

    detectors = [n for n, v in tasks.items() if v[0].kind == "detection"]
    chosen = {n: v for n, v in tasks.items() if v[0].kind in PERSON_TASKS or n in detectors[:1]}
    return scene_from_tasks(chosen, max_people, score_threshold).to(device)


@torch.no_grad()
def detect_people(scene, image: Image.Image, device: str = "cpu") -> tuple[list, list]:
    """The scene module's detections at or above its threshold: boxes (x0, y0, x1, y1, scene pixels), scores."""
    boxes, scores, valid = scene.detect(image_tensor(image).to(device))
    return boxes[valid].cpu().tolist(), scores[valid].cpu().tolist()


@torch.no_grad()
def predict_scene(tasks: dict, image: Image.Image, boxes: list, scores: list | None = None, device: str = "cpu",
                  max_people: int = 20, scene=None) -> list[dict]:
    """Per-person predictions (scene pixels) of the checkpoint's person tasks, one dict per box: each task on
    its own crop of the box (``UniHCPScene.person_outputs``: expanded to the task's input aspect, ×1.25,
    bilinear), the same computation as the exported scene graph."""
    boxes = [list(map(float, b)) for b in boxes[:max_people]]
    person = {n: v for n, v in tasks.items() if v[0].kind in PERSON_TASKS}
    outs: dict = {}
    if person and boxes:
        scene = scene if scene is not None else scene_module(person, device)
        outs = scene.person_outputs(image_tensor(image).to(device), torch.tensor(boxes, device=device))
    people = []
    for i, box in enumerate(boxes):
        entry: dict = {"box": box, "score": float(scores[i]) if scores is not None else None, "crops": {},
                       "tasks": {}}
        for name, (crop, value) in outs.items():
            task = person[name][0]
            kind, meta, value = task.kind, task.meta, value[i].float().cpu()
            r: dict = {"kind": kind, "crop": [float(v) for v in crop[i]]}
            if kind == "pose":
                r["keypoints"] = value.tolist()
                r["names"], r["skeleton"] = meta.get("keypoint_names"), meta.get("skeleton")
            elif kind == "parsing":
                r["label_map"] = value.argmax(0).numpy().astype(np.uint8)  # over the crop box, at the input size
                r["class_names"] = meta.get("class_names")
            elif kind == "attributes":
                probs = value.sigmoid().tolist()
                r["attributes"] = dict(zip(meta.get("attribute_names") or map(str, range(len(probs))), probs))
            else:
                r["embedding"] = value.numpy()
            entry["crops"][name] = r["crop"]
            entry["tasks"][name] = r
        people.append(entry)
    return people


def _paste(label: np.ndarray, crop: Sequence[float], size: tuple[int, int]) -> tuple[slice, slice, np.ndarray] | None:
    """A label map (h, w) of the crop box (x0, y0, x1, y1; the top-down crop's UDP frame: the box's ends at the
    map's first and last pixel centres) read at each scene pixel (nearest), as the scene rows / columns it covers
    and the labels there (0 where the box leaves the map)."""
    x0, y0, x1, y1 = crop
    h, w = label.shape
    sx0, sy0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    sx1, sy1 = min(int(np.ceil(x1)) + 1, size[0]), min(int(np.ceil(y1)) + 1, size[1])
    if sx1 <= sx0 or sy1 <= sy0:
        return None
    cols = np.floor((np.arange(sx0, sx1) - x0) * (w - 1) / max(x1 - x0, 1e-6) + 0.5).astype(np.int64)
    rows = np.floor((np.arange(sy0, sy1) - y0) * (h - 1) / max(y1 - y0, 1e-6) + 0.5).astype(np.int64)
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None]
    part = label[rows.clip(0, h - 1)][:, cols.clip(0, w - 1)]
    return slice(sy0, sy1), slice(sx0, sx1), np.where(inside, part, 0)


def _scene_label_map(people: list[dict], size: tuple[int, int]) -> np.ndarray | None:
    """The people's parsing maps pasted into one scene-sized map (later people over earlier, background kept)."""
    out = None
    for p in people:
        for r in p["tasks"].values():
            if r["kind"] != "parsing":
                continue
            if out is None:
                out = np.zeros((size[1], size[0]), np.uint8)
            pasted = _paste(r["label_map"], r["crop"], size)
            if pasted is None:
                continue
            rows, cols, part = pasted
            out[rows, cols] = np.where(part > 0, part, out[rows, cols])
    return out


def draw_scene(image: Image.Image, people: list[dict]) -> Image.Image:
    """The scene with every person's parsing, box (numbered), skeleton; attributes as numbered lines below."""
    results: dict = {}
    label = _scene_label_map(people, image.size)
    if label is not None:
        results["parsing"] = {"kind": "parsing", "label_map": label}
    canvas = draw_prediction(image, results)
    draw = ImageDraw.Draw(canvas)
    lines = []
    for i, p in enumerate(people):
        draw.rectangle(p["box"], outline=(0, 255, 0), width=2)
        draw.text((p["box"][0] + 2, p["box"][1] + 2), f"#{i}" + (f" {p['score']:.2f}" if p["score"] is not None
                                                                  else ""), fill=(0, 255, 0))
        for name, r in p["tasks"].items():
            if r["kind"] == "pose":
                canvas = draw_prediction(canvas, {name: r})
                draw = ImageDraw.Draw(canvas)
            elif r["kind"] == "attributes":
                present = [n for n, v in r["attributes"].items() if v > 0.5]
                lines.append(f"#{i} {name}: " + (", ".join(present) if present else "(none)"))
    return _with_caption(canvas, lines)


def _write_scene(people: list[dict], image: Image.Image, out: Path, summary: dict) -> dict:
    embeddings = []
    listing = []
    for p in people:
        entry = {"box": p["box"], "score": p["score"], "crops": p["crops"]}
        for name, r in p["tasks"].items():
            if r["kind"] == "pose":
                entry["keypoints"] = r["keypoints"]
                entry["keypoint_names"] = r.get("names")
            elif r["kind"] == "parsing":
                entry["parsing_classes_present"] = sorted({int(c) for c in np.unique(r["label_map"])} - {0})
            elif r["kind"] == "attributes":
                entry["attributes"] = r["attributes"]
            elif r["kind"] == "reid":
                entry["reid_embedding_row"] = len(embeddings)
                embeddings.append(r["embedding"])
        listing.append(entry)
    draw_scene(image, people).save(out / "prediction.png")
    label = _scene_label_map(people, image.size)
    if label is not None:
        Image.fromarray(label).save(out / "parsing.png")
        summary["label_map_file"] = str(out / "parsing.png")
    if embeddings:
        np.save(out / "reid_embeddings.npy", np.stack(embeddings))
        summary["embeddings_file"] = str(out / "reid_embeddings.npy")
    summary["people"] = listing
    return summary


def run_predict(checkpoint: str, image_path: str, task: str, out_dir: str, device: str = "cpu",
                score_threshold: float = 0.3, mode: str = "auto") -> dict:
    """``foundation predict``: writes prediction.png, prediction.json and (ReID) reid_embedding.npy; a scene
    (``mode`` scene, or auto-detected) writes one entry per person under ``people`` (see the module doc)."""
    try:
        with Image.open(image_path) as img:
            image = img.convert("RGB")
    except FileNotFoundError:
        raise PredictError(f"--image {image_path}: no such file") from None
    except Exception as e:  # PIL raises many types on bad input
        raise PredictError(f"--image {image_path}: not a readable image ({type(e).__name__}: {e})") from None
    tasks, _ = unihcp_tasks(checkpoint, device)
    if task != "all":
        if task not in tasks:
            raise PredictError(f"--task {task!r}: this checkpoint's UniHCP tasks are {sorted(tasks)} (or all)")
        tasks = {task: tasks[task]}
    if mode not in ("auto", "scene", "single"):
        raise PredictError(f"--mode {mode!r}: choose auto, scene or single")
    out = Path(out_dir)
    detector = next((n for n, v in tasks.items() if v[0].kind == "detection"), None)
    if mode == "scene" and detector is None:
        raise PredictError(f"--mode scene needs a detection task in the checkpoint; its tasks are {sorted(tasks)}")
    if mode != "single" and detector is not None and len(tasks) > 1:
        scene = scene_module({n: v for n, v in tasks.items() if v[0].kind != "detection" or n == detector}, device,
                             score_threshold=score_threshold)
        boxes, scores = detect_people(scene, image, device)
        if mode == "scene" or is_scene(boxes, image):
            people = predict_scene(tasks, image, boxes, scores, device, scene=scene)
            out.mkdir(parents=True, exist_ok=True)
            summary = {"checkpoint": str(checkpoint), "image": str(image_path), "png": str(out / "prediction.png"),
                       "mode": "scene", "detector": detector, "score_threshold": score_threshold,
                       "box_padding": BOX_PADDING, "crop": "the box's shorter side grown to the task's input aspect, "
                       "x1.25 about its centre, UDP warp sampled bilinearly (roi_align)"}
            summary = _write_scene(people, image, out, summary)
            (out / "prediction.json").write_text(json.dumps(summary, indent=2, default=float))
            return summary
    results = predict_image(tasks, image, device, score_threshold)
    out.mkdir(parents=True, exist_ok=True)
    draw_prediction(image, results).save(out / "prediction.png")
    summary: dict = {"checkpoint": str(checkpoint), "image": str(image_path), "png": str(out / "prediction.png"),
                     "mode": "single"}
    for name, res in results.items():
        entry = {k: v for k, v in res.items() if k not in ("label_map", "embedding", "skeleton")}
        if res["kind"] == "reid":
            np.save(out / "reid_embedding.npy", res["embedding"])
            entry["embedding_file"] = str(out / "reid_embedding.npy")
        if res["kind"] == "parsing":
            Image.fromarray(res["label_map"]).save(out / "parsing.png")
            entry["label_map_file"] = str(out / "parsing.png")
            entry["classes_present"] = sorted({int(c) for c in np.unique(res["label_map"])})
        summary[name] = entry
    (out / "prediction.json").write_text(json.dumps(summary, indent=2))
    return summary


__all__ = ["BOX_PADDING", "PredictError", "detect_people", "draw_prediction", "draw_scene", "image_tensor", "is_scene",
           "predict_image", "predict_scene", "run_predict", "scene_module", "unihcp_tasks"]
