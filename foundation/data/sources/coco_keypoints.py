"""COCO keypoints JSON (``person_keypoints_*.json``) → top-down person crops with their keypoints.

SRC is an annotation file (the split ``--split``), or a COCO root holding
``annotations/person_keypoints_{train,val}*.json`` (splits train / val, from the names). Images are found under ``--image-root``, else ``<root>/<train2017|val2017>/`` next to
``annotations/``, else the JSON's folder. The file is parsed with pycocotools.

Each person annotation becomes one sample, cropped as top-down pose estimators do (HRNet / mmpose
``_box2cs``): the box is widened or heightened to the input aspect ratio (3:4 by default) about its
centre, then scaled by 1.25. The crop keeps the source's pixels (no resize; outside the image is
black); keypoints and box are moved into the crop. ``--pose-context F`` (F > 0) keeps more: the square
about the box's centre with side F × the padded box's diagonal, widened by the largest centre shift and
joined with the same square about each half-body box (``context_region``), cut to the image: every source
pixel that the released training jitter (``data.pose_crop: top_down``: box × up to 1.5, any rotation) reads, so the
top-down crop made from the shard equals the one made from the source image (F = 1.5). A letterbox recipe
wants F = 0 (the person fills the crop). Crowd annotations and people without labelled keypoints are left
out, as in training (counted in the manifest's ``source``). A box with a non-positive size, keypoints outside
the image or a keypoint count that is not the category's, a missing or unreadable image are bad input:
skipped and reported.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from foundation.config import TopDownConfig
from foundation.data import DataError
from foundation.data.human_transforms import half_body_box, top_down_box, upper_body_ids
from foundation.data.humans import COCO_KEYPOINTS, COCO_SIGMAS, json_entry, pose_task
from foundation.data.sources.base import BuildOptions, Plan, Skip, sanitize_key

ASPECT_RATIO = 192 / 256  # width / height of the usual top-down input
PADDING = 1.25


def crop_region(box: list[float], aspect_ratio: float = ASPECT_RATIO, padding: float = PADDING) -> list[int]:
    """[x0, y0, x1, y1] (integers, may reach outside the image) of the top-down crop of an xywh box."""
    cx, cy, w, h = top_down_box(box, aspect_ratio, padding)
    x0, y0 = int(np.floor(cx - w / 2)), int(np.floor(cy - h / 2))
    return [x0, y0, x0 + max(1, int(round(w))), y0 + max(1, int(round(h)))]


def context_region(box: list[float], context: float, image_wh: tuple[int, int],
                   kps: np.ndarray | None = None, upper: list[int] = ()) -> list[int]:
    """[x0, y0, x1, y1] inside the image: every pixel the released training crop can read, for jitter up to
    ``context`` (the box scaled by up to ``context``, any rotation: a square about a crop's centre whose side is
    ``context`` × its diagonal). The crops: the top-down box with its centre shifted by up to ± half
    ``centre_shift`` × (w, h), and, given the keypoints, the half-body boxes of the upper body (``upper``: its
    joints' indices) and of the lower body.
    Plus a pixel for the bilinear neighbours, cut to the image (outside it the warp reads black either way)."""
    td = TopDownConfig()
    cx, cy, w, h = top_down_box(box, ASPECT_RATIO, PADDING)
    half = context * float(np.hypot(w, h)) / 2
    sx, sy = td.centre_shift / 2 * box[2], td.centre_shift / 2 * box[3]
    x0, y0, x1, y1 = cx - half - sx, cy - half - sy, cx + half + sx, cy + half + sy
    if kps is not None and (kps[:, 2] > 0).sum() > td.half_body_joints:
        for choice in (0.0, 1.0):  # the upper body's box, then the lower's (or the upper's again)
            part = half_body_box(kps, upper, ASPECT_RATIO, td.half_body_padding, choice)
            if part is not None:
                px, py, pw, ph = part
                r = context * float(np.hypot(pw, ph)) / 2
                x0, y0, x1, y1 = min(x0, px - r), min(y0, py - r), max(x1, px + r), max(y1, py + r)
    x0, y0, x1, y1 = int(np.floor(x0)) - 1, int(np.floor(y0)) - 1, int(np.ceil(x1)) + 2, int(np.ceil(y1)) + 2
    return [max(x0, 0), max(y0, 0), min(x1, image_wh[0]), min(y1, image_wh[1])]


def crop_pixels(image: np.ndarray, region: list[int]) -> np.ndarray:
    """``image[y0:y1, x0:x1]`` with the part outside the image filled with zeros."""
    x0, y0, x1, y1 = region
    h, w = image.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], image.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def _load(path: Path):
    from pycocotools.coco import COCO

    coco = COCO()
    try:
        coco.dataset = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable COCO JSON ({e})") from None
    if not isinstance(coco.dataset, dict) or "annotations" not in coco.dataset:
        raise DataError(f"{path}: not a COCO annotation file (no 'annotations')")
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _split_of(name: str, default: str) -> str:
    low = name.lower()
    return "train" if "train" in low else "val" if "val" in low else "test" if "test" in low else default


def _image_root(ann: Path, opts: BuildOptions) -> Path:
    if opts.image_root:
        return Path(opts.image_root)
    stem = ann.stem.split("_")[-1]  # person_keypoints_val2017 → val2017
    for candidate in (ann.parent.parent / stem, ann.parent / stem):
        if candidate.is_dir():
            return candidate
    return ann.parent


def plan(src: Path, opts: BuildOptions) -> Plan:
    files = sorted((src / "annotations").glob("person_keypoints_*.json")) if src.is_dir() else [src]
    if not files:
        raise DataError(f"{src}: no annotations/person_keypoints_*.json; give the annotation file")
    splits: dict[str, list] = {}
    info = None
    filtered = {"crowd": 0, "no_keypoints": 0}
    for ann in files:
        coco = _load(ann)
        cats = [c for c in coco.dataset.get("categories", []) if c.get("keypoints")]
        if not cats:
            raise DataError(f"{ann}: no category with 'keypoints' names; not a COCO keypoints file")
        cat = cats[0]
        names = list(cat["keypoints"])
        skeleton = [[a - 1, b - 1] for a, b in cat.get("skeleton", [])]  # COCO's skeleton is 1-based
        these = pose_task(names, skeleton, COCO_SIGMAS if names == COCO_KEYPOINTS else None)
        upper = upper_body_ids(names)
        if info is not None and these != info:
            raise DataError(f"{ann}: keypoint names differ from the other annotation files'")
        info = these
        root = _image_root(ann, opts)
        split = _split_of(ann.stem, opts.split) if len(files) > 1 or src.is_dir() else opts.split
        tasks = splits.setdefault(split, [])
        for ann_id in sorted(coco.getAnnIds(catIds=[cat["id"]])):
            a = coco.anns[ann_id]
            if a.get("iscrowd"):
                filtered["crowd"] += 1
                continue
            if not a.get("num_keypoints", sum(v > 0 for v in a.get("keypoints", [])[2::3])):
                filtered["no_keypoints"] += 1
                continue
            img = coco.imgs.get(a.get("image_id"), {})
            file_name = img.get("file_name", f"<image {a.get('image_id')} not listed>")
            key = f"{len(tasks):08d}_{sanitize_key(Path(file_name).stem)}_{ann_id}"
            tasks.append({"key": key, "path": str(root / file_name), "ann": str(ann), "box": a.get("bbox"),
                          "keypoints": a.get("keypoints"), "num_names": len(names), "image_id": a.get("image_id"),
                          "area": a.get("area"), "context": opts.pose_context, "upper_body": upper,
                          "id": ann_id, "size": [img.get("width"), img.get("height")]})
    return Plan(splits, encode, None, {"format": "coco_keypoints", "path": str(src.resolve()), "filtered": filtered},
                manifest_extra={"human_task": info})


def encode(task: dict) -> dict:
    where = f"{task['ann']}: annotation {task['id']} ({task['path']})"
    box = task["box"]
    if not isinstance(box, list) or len(box) != 4:
        raise Skip(f"{where}: bbox {box!r} is not [x, y, w, h]")
    if box[2] <= 0 or box[3] <= 0:
        raise Skip(f"{where}: box with non-positive size {box}")
    kps = np.asarray(task["keypoints"] or [], np.float64)
    if kps.size != 3 * task["num_names"]:
        raise Skip(f"{where}: {kps.size // 3} keypoints, the category names {task['num_names']}")
    kps = kps.reshape(-1, 3)
    try:
        raw = Path(task["path"]).read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            fmt = im.format
            image = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise Skip(f"{where}: missing or unreadable image ({e})") from None
    except Exception as e:  # PIL raises many types for bad files
        raise Skip(f"{where}: unreadable image ({type(e).__name__}: {e})") from None
    h, w = image.shape[:2]
    if None not in task["size"] and task["size"] != [w, h]:
        raise Skip(f"{where}: image is {w}x{h}, the annotation says {task['size'][0]}x{task['size'][1]}")
    labelled = kps[:, 2] > 0
    xy = kps[labelled, :2]
    if ((xy < 0) | (xy > [w, h])).any():
        raise Skip(f"{where}: keypoints outside the {w}x{h} image")
    region = (context_region(box, task["context"], (w, h), kps, task.get("upper_body", ())) if task.get("context")
              else crop_region(box))
    crop = crop_pixels(image, region)
    kps[labelled, :2] -= region[:2]
    buf = io.BytesIO()
    if fmt == "JPEG":  # keep the source's kind: JPEG stays JPEG, lossless sources stay lossless
        Image.fromarray(crop).save(buf, "JPEG", quality=95)
        ext = "jpg"
    else:
        Image.fromarray(crop).save(buf, "PNG")
        ext = "png"
    labels = {"keypoints": kps.round(3).tolist(), "box": [box[0] - region[0], box[1] - region[1], box[2], box[3]],
              "crop": region, "area": task["area"] if task["area"] is not None else box[2] * box[3],
              "image_id": task["image_id"], "id": task["id"], "source": Path(task["path"]).name}
    return {ext: buf.getvalue(), "json": json_entry(labels)}
