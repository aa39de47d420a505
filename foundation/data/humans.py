"""Human-centric samples in shards: the five task kinds, their manifest entry, and decoding a raw sample.

Every human-centric shard set holds one task, named with its vocabulary in ``manifest.json`` under
``human_task`` (see docs/human_centric.md):

| kind | sample entries | ``human_task`` fields |
|---|---|---|
| ``pose`` | ``jpg``/``png`` person crop, ``json`` {keypoints K×[x, y, v], box [x, y, w, h], crop [x0, y0, x1, y1]} | ``keypoint_names``, ``skeleton``, ``flip_pairs``, ``sigmas`` |
| ``parsing`` | ``jpg``/``png`` image, ``seg.png`` single-channel label map (255 = ignore) | ``class_names`` |
| ``attributes`` | ``jpg``/``png`` image, ``json`` {attributes: [1, 0, -1, ...]} (-1 = unknown) | ``attribute_names`` |
| ``reid`` | ``jpg``/``png`` image, ``json`` {pid, camid, split}, ``cls`` (train: contiguous id index) | ``num_ids`` |
| ``detection`` | ``jpg``/``png`` image, ``json`` {boxes, visible, heads, ignore}: lists of [x, y, w, h] | ``class_names`` |

Pose keypoints and boxes are in the crop's pixel coordinates; ``crop`` is the crop's region in the source
image (it may reach outside it: that part is black), so ``keypoints[:, :2] + crop[:2]`` are the source
image's coordinates. ``v`` follows COCO: 0 not labelled, 1 labelled but occluded, 2 visible.

The ``decode_*`` functions turn a raw sample (``{"__key__", ext: bytes}``, as ``iter_raw_samples`` yields)
into numpy targets; ``DECODERS`` maps a kind to its decoder.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from foundation.data import DataError

TASK_KINDS = ("pose", "parsing", "attributes", "reid", "detection")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SEG_KEY = "seg.png"
IGNORE_LABEL = 255
REID_SPLITS = ("train", "query", "gallery")

COCO_KEYPOINTS = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle"]
# 0-based pairs (COCO's own ``skeleton`` is 1-based)
COCO_SKELETON = [[15, 13], [13, 11], [16, 14], [14, 12], [11, 12], [5, 11], [6, 12], [5, 6], [5, 7], [6, 8],
                 [7, 9], [8, 10], [1, 2], [0, 1], [0, 2], [1, 3], [2, 4], [3, 5], [4, 6]]
# per-keypoint OKS sigmas of COCO (pycocotools' COCOeval defaults)
COCO_SIGMAS = [0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087,
               0.087, 0.089, 0.089]
# LIP / CIHP parsing classes (index = label value)
LIP_CLASSES = ["background", "hat", "hair", "glove", "sunglasses", "upper_clothes", "dress", "coat", "socks", "pants",
               "jumpsuits", "scarf", "skirt", "face", "left_arm", "right_arm", "left_leg", "right_leg", "left_shoe",
               "right_shoe"]


class HumanSampleError(DataError):
    """A raw sample (or manifest) that does not hold what its task needs (missing entry, wrong shape)."""


def flip_pairs(names: list[str]) -> list[list[int]]:
    """Index pairs of keypoints that swap under a horizontal flip: ``left_x`` ↔ ``right_x`` (also l_/r_)."""
    index = {n.lower(): i for i, n in enumerate(names)}
    pairs = []
    for name, i in index.items():
        for left, right in (("left_", "right_"), ("left-", "right-"), ("l_", "r_")):
            if name.startswith(left) and right + name[len(left):] in index:
                pairs.append([i, index[right + name[len(left):]]])
    return sorted(pairs)


def pose_task(names: list[str], skeleton: list[list[int]], sigmas: list[float] | None) -> dict:
    """The manifest's ``human_task`` entry of a pose shard set."""
    return {"kind": "pose", "keypoint_names": list(names), "skeleton": [list(map(int, s)) for s in skeleton],
            "flip_pairs": flip_pairs(names), "sigmas": None if sigmas is None else [float(s) for s in sigmas]}


def task_info(manifest_or_dir: dict | str | Path) -> dict:
    """The ``human_task`` entry of a manifest (a dict, its path, or the shard directory)."""
    manifest = manifest_or_dir
    if not isinstance(manifest, dict):
        path = Path(manifest_or_dir)
        manifest = json.loads((path / "manifest.json" if path.is_dir() else path).read_text())
    info = manifest.get("human_task")
    if not info or info.get("kind") not in TASK_KINDS:
        where = "this manifest" if isinstance(manifest_or_dir, dict) else f"{manifest_or_dir}: the manifest"
        raise HumanSampleError(f"{where} names no human-centric task (human_task.kind): build the shards with a "
                               "human-centric converter or `foundation data synthetic-humans`")
    return info


def json_entry(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def png_entry(array: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 array (H, W) or (H, W, 3)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, "PNG")
    return buf.getvalue()


def image_bytes(sample: dict) -> bytes:
    for k in IMAGE_KEYS:
        if k in sample:
            return sample[k]
    raise HumanSampleError(f"{sample.get('__key__')}: no image entry ({'/'.join(IMAGE_KEYS)})")


def decode_image(sample: dict) -> np.ndarray:
    """The sample's image as uint8 (H, W, 3) RGB."""
    with Image.open(io.BytesIO(image_bytes(sample))) as img:
        return np.asarray(img.convert("RGB"))


def _labels(sample: dict) -> dict:
    if "json" not in sample:
        raise HumanSampleError(f"{sample.get('__key__')}: no json entry with the labels")
    data = sample["json"]
    return json.loads(data) if isinstance(data, (bytes, str)) else data


def _boxes(value) -> np.ndarray:
    return np.asarray(value if value is not None else [], dtype=np.float32).reshape(-1, 4)


def decode_pose(sample: dict) -> dict:
    """``image`` (H, W, 3) uint8, ``keypoints`` (K, 3) float32 [x, y, v] in crop pixels, ``box`` (4,) xywh,
    ``crop`` (4,) the crop's [x0, y0, x1, y1] in the source image."""
    labels = _labels(sample)
    return {"image": decode_image(sample), "keypoints": np.asarray(labels["keypoints"], np.float32).reshape(-1, 3),
            "box": np.asarray(labels["box"], np.float32), "crop": np.asarray(labels["crop"], np.float32)}


def decode_parsing(sample: dict) -> dict:
    """``image`` (H, W, 3) uint8, ``label_map`` (H, W) uint8 (class index, 255 = ignore)."""
    if SEG_KEY not in sample:
        raise HumanSampleError(f"{sample.get('__key__')}: no {SEG_KEY} label map")
    with Image.open(io.BytesIO(sample[SEG_KEY])) as seg:
        if seg.mode not in ("L", "P"):
            raise HumanSampleError(f"{sample.get('__key__')}: label map mode {seg.mode}, expected one channel")
        label_map = np.asarray(seg)
    image = decode_image(sample)
    if label_map.shape != image.shape[:2]:
        raise HumanSampleError(f"{sample.get('__key__')}: label map {label_map.shape} != image {image.shape[:2]}")
    return {"image": image, "label_map": label_map.astype(np.uint8)}


def decode_attributes(sample: dict) -> dict:
    """``image`` (H, W, 3) uint8, ``attributes`` (A,) int8: 1 present, 0 absent, -1 unknown."""
    return {"image": decode_image(sample), "attributes": np.asarray(_labels(sample)["attributes"], np.int8)}


def decode_reid(sample: dict) -> dict:
    """``image`` (H, W, 3) uint8, ``pid`` (-1 junk, 0 distractor), ``camid``, ``split`` (train/query/gallery)."""
    labels = _labels(sample)
    return {"image": decode_image(sample), "pid": int(labels["pid"]), "camid": int(labels["camid"]),
            "split": str(labels["split"])}


def decode_detection(sample: dict) -> dict:
    """``image`` (H, W, 3) uint8; ``boxes`` (N, 4) full-body, ``visible`` (N, 4), ``heads`` (N, 4) (may be
    empty), ``ignore`` (M, 4) regions: float32 [x, y, w, h]."""
    labels = _labels(sample)
    return {"image": decode_image(sample), "boxes": _boxes(labels.get("boxes")),
            "visible": _boxes(labels.get("visible")), "heads": _boxes(labels.get("heads")),
            "ignore": _boxes(labels.get("ignore"))}


DECODERS: dict[str, Callable[[dict], dict]] = {
    "pose": decode_pose,
    "parsing": decode_parsing,
    "attributes": decode_attributes,
    "reid": decode_reid,
    "detection": decode_detection,
}

__all__ = ["COCO_KEYPOINTS", "COCO_SIGMAS", "COCO_SKELETON", "DECODERS", "HumanSampleError", "IGNORE_LABEL",
           "LIP_CLASSES", "REID_SPLITS", "SEG_KEY", "TASK_KINDS", "decode_attributes", "decode_detection",
           "decode_image", "decode_parsing", "decode_pose", "decode_reid", "flip_pairs", "json_entry", "png_entry",
           "pose_task", "task_info"]
