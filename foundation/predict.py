"""``foundation predict``: run a UniHCP checkpoint's tasks on one image and draw what they see.

    foundation predict --checkpoint runs/unihcp_tiny_synthetic --image person.png --task all --out pred/

writes ``pred/prediction.png`` (the image with the skeleton, the parsing overlay, the detected boxes and the
present attributes), ``pred/prediction.json`` (every task's outputs in source-image pixels) and, for ReID,
``pred/reid_embedding.npy`` (the L2-normalised feature, a plain ``.npy`` array). Each task sees the image
letterboxed to its own ``data.image_size``, as in evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

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
        size = x.shape[-1]
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
            maps = F.interpolate(out["maps"].float(), size=(size, size), mode="bilinear", align_corners=False)
            label = parsing_prediction(out["logits"].float(), maps)[0].cpu().numpy().astype(np.uint8)
            # back to the source image: crop the letterbox and resize (nearest)
            x0, y0 = (int(round(v)) for v in offset)
            x1, y1 = int(round(offset[0] + s * image.width)), int(round(offset[1] + s * image.height))
            crop = Image.fromarray(label[max(y0, 0):min(y1, size), max(x0, 0):min(x1, size)])
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
            boxes = box_convert(out["boxes"][0].float().cpu() * size, "cxcywh", "xyxy")
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
    if lines:
        text_h = 12 * len(lines) + 4
        framed = Image.new("RGB", (canvas.width, canvas.height + text_h), (255, 255, 255))
        framed.paste(canvas, (0, 0))
        d = ImageDraw.Draw(framed)
        for i, line in enumerate(lines):
            d.text((2, canvas.height + 2 + 12 * i), line, fill=(0, 0, 0))
        canvas = framed
    return canvas


def run_predict(checkpoint: str, image_path: str, task: str, out_dir: str, device: str = "cpu",
                score_threshold: float = 0.3) -> dict:
    """``foundation predict``: writes prediction.png, prediction.json and (ReID) reid_embedding.npy."""
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
    results = predict_image(tasks, image, device, score_threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw_prediction(image, results).save(out / "prediction.png")
    summary: dict = {"checkpoint": str(checkpoint), "image": str(image_path), "png": str(out / "prediction.png")}
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


__all__ = ["PredictError", "draw_prediction", "predict_image", "run_predict", "unihcp_tasks"]
