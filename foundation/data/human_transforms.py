"""Human-centric samples → tensors for training and evaluation (UniHCP's tasks), with the geometric
augmentation applied to the image and its targets alike.

``decode_human_sample(sample, cfg, train)`` is what the shard reader's decoder calls when
``data.human`` is set. Every kind is letterboxed to ``data.image_size`` (aspect kept, the rest black): a
square, or a ``[height, width]`` rectangle (``data.input_hw``: UniHCP's released pose 256×192, ReID 256×128
inputs), so one affine map ``x' = s·x + o`` (one scale for both axes) takes source pixels to input pixels; training adds a scale
jitter (×0.75-1.25 about the centre, as UniHCP's pose/parsing pipelines) and a horizontal flip (p =
``data.augment.hflip``) that also swaps left/right keypoints and parsing classes (pairs from the
manifest's names). ``data.resize`` (detection) replaces the letterbox with per-image sizes, as UniHCP's released
detection pipeline: aspect kept, short side S (training: drawn per image, with the release's optional crop), long
side ≤ L, then padded bottom/right to a multiple of the patch with 0 after normalisation; the same one-scale map
(plus the crop's offset) holds, and ``pad_images`` batches different sizes. Random numbers come from Python's / numpy's global generators, which the reader
reseeds per sample from its position in the stream, so augmentation is exact across resumes.

Output ``{"key", "image": (3, H, W) float normalised, "targets": {...}}`` (H × W the input size); the targets per kind:

| kind | targets |
|---|---|
| pose | ``keypoints`` (K, 3) input pixels + v (0 after leaving the image), ``src_keypoints`` (K, 3), ``box`` (4,) xywh source, ``area`` |
| pose, ``data.pose_crop: top_down`` | the same, and ``affine`` (2, 3): source pixel centres → input pixel centres, in place of ``scale`` / ``offset`` |
| parsing | ``label_map`` (H, W) long, 255 = ignore (padding included) |
| attributes | ``attributes`` (A,) long: 1 / 0 / -1 |
| reid | ``label`` (training id index, -1 off the training split), ``pid``, ``camid``, ``split`` (0 train, 1 query, 2 gallery) |
| parsing (evaluation) | ``src_label_map`` (H, W) uint8: the label map at the source resolution |
| detection | ``boxes`` (N, 4) xyxy input pixels, ``ignore`` (M, 4) xyxy input pixels, ``src_boxes``, ``src_ignore`` (xywh source) |
| detection, ``data.resize`` | the same, and ``input_hw`` (2,): the sample's own padded input size (a batch pads to its largest) |

plus ``scale`` and ``offset`` (the affine map), ``size`` (source H, W) and ``kind``.

Pose with ``data.pose_crop: top_down`` is cropped as UniHCP's release crops it (mmpose's top-down pipeline with
UDP, ``core/data/datasets/images/pos_dataset_dev.py``): ``top_down_box`` grows the person box to the input's
aspect and pads it ×1.25; training shifts its centre once per person (``centre_shift``), flips the source
(p = ``data.augment.hflip``), crops the half body with p 0.3 (``half_body_box``), scales the box by
clip(N(1, 0.5), 0.5, 1.5) and, with probability 0.6, rotates by clip(N(0, 40), -80, 80) degrees
(``data.top_down``); ``top_down_matrix`` then warps the source into ``data.image_size`` in one bilinear
``cv2.warpAffine`` (black outside the source). No letterbox bars: the crop has the input's aspect. ``collate_targets``
stacks equal-shape tensors and keeps the rest (boxes of several people) as lists.
"""

from __future__ import annotations

import functools
import io
import json
import random
import zlib

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from foundation.config import DataConfig, ShortSideResize
from foundation.data.humans import COCO_KEYPOINTS, REID_SPLITS, SEG_KEY, TASK_KINDS, flip_pairs
from foundation.data.manifest import read_manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE_JITTER = (0.75, 1.25)


class HumanDecodeError(ValueError):
    """A human-centric sample that cannot become training targets (the reader counts and skips it)."""


@functools.lru_cache(maxsize=64)
def _manifest_task(url: str) -> dict:
    try:
        manifest = read_manifest(url) if url else None
    except Exception:  # an unreadable manifest: fall back to what the sample shows
        manifest = None
    return dict((manifest or {}).get("human_task") or {})


def _kind(sample: dict, info: dict) -> str:
    kind = info.get("kind")
    if kind in TASK_KINDS:
        return kind
    if SEG_KEY in sample:
        return "parsing"
    labels = _labels(sample)
    for key, k in (("keypoints", "pose"), ("attributes", "attributes"), ("pid", "reid"), ("boxes", "detection")):
        if key in labels:
            return k
    raise HumanDecodeError("not a human-centric sample (no seg.png, keypoints, attributes, pid or boxes)")


def _labels(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        raise HumanDecodeError("no json entry with the labels")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HumanDecodeError(f"unreadable JSON: {e}") from None


def _image(sample: dict, keys: list[str]) -> Image.Image:
    for k in keys:
        if k in sample:
            try:
                with Image.open(io.BytesIO(sample[k])) as img:
                    return img.convert("RGB")
            except Exception as e:  # PIL raises many types
                raise HumanDecodeError(f"corrupt image: {type(e).__name__}: {e}") from None
    raise HumanDecodeError(f"no image (looked for {';'.join(keys)})")


@functools.lru_cache(maxsize=8)
def _identity_index(url: str) -> dict[int, list[tuple[str, int, int]]]:
    """pid → [(shard, offset, size) of each training image of that id] over the train split of the shard set
    holding ``url`` (tar headers and the small json members are read once per process)."""
    import tarfile
    from pathlib import Path

    manifest = read_manifest(url)
    if manifest is None or "train" not in manifest.get("splits", {}):
        raise HumanDecodeError(f"{url}: data.id_instances needs the shard set's manifest with a train split")
    root = Path(url).parent
    index: dict[int, list[tuple[str, int, int]]] = {}
    for shard in manifest["splits"]["train"]["shards"]:
        path = str(root / shard["name"])
        images, pids = {}, {}
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext in ("jpg", "jpeg", "png", "webp"):
                    images[key] = (path, member.offset_data, member.size)
                elif ext == "json":
                    try:
                        pids[key] = int(json.loads(tar.extractfile(member).read())["pid"])
                    except (ValueError, KeyError, TypeError):
                        continue
        for key, pid in pids.items():
            if key in images and pid > 0:
                index.setdefault(pid, []).append(images[key])
    return index


def _read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _affine(w: int, h: int, size: int | tuple[int, int], train: bool) -> tuple[float, np.ndarray]:
    """Letterbox (w, h) into size × size (or a (height, width) rectangle), with a random scale about the
    centre when training."""
    th, tw = _hw(size)
    s = th / max(w, h) if th == tw else min(th / h, tw / w)  # the square's own expression, bit for bit
    if train:
        s *= random.uniform(*SCALE_JITTER)
    offset = np.array([(tw - s * w) / 2, (th - s * h) / 2], np.float64)
    return s, offset


def _short_side_hw(h: int, w: int, short: int, max_long: int | None) -> tuple[int, int]:
    """(height, width) with the short side ``short`` and the long side at most ``max_long`` (``short`` lowered
    until it fits), truncated to whole pixels: DETR's ``get_size_with_aspect_ratio``, as UniHCP releases it."""
    if max_long is not None and max(w, h) / min(w, h) * short > max_long:
        short = int(round(max_long * min(w, h) / max(w, h)))
    if min(w, h) == short:
        return h, w
    return (int(short * h / w), short) if w < h else (short, int(short * w / h))


def _per_image_affine(w: int, h: int, rs: ShortSideResize, train: bool) -> tuple[float, np.ndarray, tuple[int, int]]:
    """``data.resize``: the scale and offset taking source pixels to input pixels, and the input's (height, width)
    before padding. Training draws the short side from ``rs.short`` and, with probability ``rs.crop_prob``, first
    resizes to one of ``rs.crop_short`` and crops a random region (the release's RandomSelect: a crop is one more
    offset)."""
    if train and random.random() < rs.crop_prob:
        h1, w1 = _short_side_hw(h, w, random.choice(rs.crop_short), None)
        s1 = min(h1, w1) / min(h, w)
        cw = random.randint(rs.crop_size[0], min(w1, rs.crop_size[1]))
        ch = random.randint(rs.crop_size[0], min(h1, rs.crop_size[1]))
        top, left = random.randint(0, h1 - ch), random.randint(0, w1 - cw)
        oh, ow = _short_side_hw(ch, cw, random.choice(rs.short), rs.max_long)
        s2 = min(oh, ow) / min(ch, cw)
        return s1 * s2, np.array([-left * s2, -top * s2], np.float64), (oh, ow)
    oh, ow = _short_side_hw(h, w, random.choice(rs.short) if train else rs.eval_short, rs.max_long)
    return min(oh, ow) / min(h, w), np.zeros(2, np.float64), (oh, ow)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(C, H, W) padded bottom/right with 0 (after normalisation, as the release's ``round_padding``) to a
    multiple of ``multiple`` on both sides."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple), value=0.0)


def pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    """Images of different sizes (``data.resize``) as one batch: each padded bottom/right with 0 to the largest
    height and width (the top-left origin is kept, so each sample's scale and offset still hold)."""
    h = max(x.shape[-2] for x in images)
    w = max(x.shape[-1] for x in images)
    return torch.stack([F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]), value=0.0) for x in images])


def top_down_box(box_xywh, aspect_wh: float, padding: float = 1.25) -> tuple[float, float, float, float]:
    """The released top-down crop of a person box ``[x, y, w, h]``: ``(cx, cy, w, h)`` in the box's pixels.

    The centre is the box's (``x + w/2, y + h/2``); the side that is short for ``aspect_wh`` (the input's width /
    height, 192 / 256 for pose) grows so that ``w / h == aspect_wh`` (a box already at that aspect is kept), then
    both sides × ``padding`` (1.25 as released). mmpose's ``_xywh2cs`` (UniHCP ``pos_dataset_dev.py``), without
    its ÷ 200 ``pixel_std``."""
    x, y, w, h = (float(v) for v in box_xywh)
    cx, cy = x + w * 0.5, y + h * 0.5
    w, h = grow_to_aspect(w, h, aspect_wh)
    return cx, cy, w * padding, h * padding


def grow_to_aspect(w: float, h: float, aspect_wh: float) -> tuple[float, float]:
    """The side that is short for ``aspect_wh`` (width / height) grown so that ``w / h == aspect_wh`` (mmpose's
    ``_xywh2cs`` and ``half_body_transform``); a box already at that aspect is kept."""
    if w > aspect_wh * h:
        return w, w / aspect_wh
    if w < aspect_wh * h:
        return h * aspect_wh, h
    return w, h


UPPER_BODY_PARTS = ("nose", "eye", "ear", "shoulder", "elbow", "wrist", "head", "neck", "thorax")


def upper_body_ids(names) -> list[int]:
    """The joints of the half-body crop's upper half, by name: COCO's 0-10 (face, shoulders, elbows, wrists) and
    MPII's 7-15 (thorax, neck, head, shoulders, elbows, wrists), the release's ``upper_body_ids``."""
    return [i for i, n in enumerate(names) if any(part in str(n).lower() for part in UPPER_BODY_PARTS)]


def half_body_box(kps: np.ndarray, upper: list[int], aspect_wh: float, padding: float,
                  choice: float) -> tuple[float, float, float, float] | None:
    """mmpose's ``TopDownHalfBodyTransform.half_body_transform`` (UniHCP ``pose_transforms.py``): the visible
    joints of the upper body when ``choice`` (a standard normal draw, as released) < 0.5 and more than two are
    visible, else of the lower body if more than two are, else the upper; ``(cx, cy, w, h)``: their mean, their
    extent grown to ``aspect_wh`` and × ``padding`` (1.5). None with fewer than two joints."""
    visible = kps[:, 2] > 0
    up = [i for i in range(len(kps)) if visible[i] and i in upper]
    low = [i for i in range(len(kps)) if visible[i] and i not in upper]
    selected = up if (choice < 0.5 and len(up) > 2) or len(low) <= 2 else low
    if len(selected) < 2:
        return None
    pts = kps[selected, :2]
    cx, cy = pts.mean(0)
    w, h = grow_to_aspect(*(float(v) for v in pts.max(0) - pts.min(0)), aspect_wh)
    return float(cx), float(cy), w * padding, h * padding


def centre_shift(key: str, box_xywh, prob: float, extent: float) -> tuple[float, float]:
    """The release's ``_xywh2cs`` training shift of the box centre, drawn once per person when its dataset is
    built (not per epoch): with probability ``prob`` by ``extent`` × (U(0, 1) - 0.5) × (w, h). Here drawn from the
    sample's key, so a person keeps one shift for the whole run and across resumes."""
    rng = np.random.default_rng(zlib.crc32(str(key).encode()))
    if prob <= 0 or rng.random() >= prob:
        return 0.0, 0.0
    dx, dy = extent * (rng.random(2) - 0.5)
    return float(dx * box_xywh[2]), float(dy * box_xywh[3])


def top_down_matrix(center: tuple[float, float], size_wh: tuple[float, float], out_hw: tuple[int, int],
                    rotation: float = 0.0) -> np.ndarray:
    """(2, 3) float64: source pixel centres → input pixel centres for the crop of ``size_wh`` about ``center``,
    rotated by ``rotation`` degrees, into ``out_hw`` (height, width). UDP's unbiased warp as released
    (``get_warp_matrix(r, 2c, out - 1, size)``, UniHCP ``core/data/transforms/post_transforms.py``): the centre
    lands on ((W-1)/2, (H-1)/2) and the crop's width on W - 1 pixel steps."""
    th, tw = out_hw
    theta = np.deg2rad(rotation)
    cos, sin = np.cos(theta), np.sin(theta)
    sx, sy = (tw - 1.0) / size_wh[0], (th - 1.0) / size_wh[1]
    cx, cy = center
    return np.array([[cos * sx, -sin * sx, sx * (-cx * cos + cy * sin + 0.5 * size_wh[0])],
                     [sin * sy, cos * sy, sy * (-cx * sin - cy * cos + 0.5 * size_wh[1])]], np.float64)


def affine_points(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Points (..., 2) through a (2, 3) affine."""
    return xy @ m[:, :2].T + m[:, 2]


def invert_affine(m: np.ndarray) -> np.ndarray:
    """The (2, 3) affine undoing ``m`` (input pixels → source pixels for a top-down crop)."""
    a = np.linalg.inv(m[:, :2])
    return np.concatenate([a, -a @ m[:, 2:]], 1)


def _top_down_pose(sample: dict, img: Image.Image, cfg: DataConfig, train: bool, info: dict) -> dict:
    """``data.pose_crop: top_down``: the release's crop of the person box (see the module docstring)."""
    import cv2

    th, tw = cfg.input_hw
    labels = _labels(sample)
    kps = np.asarray(labels.get("keypoints", []), np.float64).reshape(-1, 3)
    if not len(kps):
        raise HumanDecodeError("pose sample without keypoints")
    w, h = img.size
    box = np.asarray(labels.get("box", [0, 0, w, h]), np.float64).reshape(4)
    if not (box[2] > 0 and box[3] > 0):
        raise HumanDecodeError(f"pose box {box.tolist()} has no area")
    td = cfg.top_down
    cx, cy, bw, bh = top_down_box(box, tw / th, td.padding)
    flip_src = np.array([[1.0, 0, 0], [0, 1, 0]])
    rotation = 0.0
    flip = train and random.random() < cfg.augment.hflip
    if train:  # the release's order: the build-time centre shift; flip the source (and the centre), half body,
        # then scale and rotation (the half-body box is taken before mirroring its centre: the same box)
        dx, dy = centre_shift(sample.get("__key__", ""), box, td.centre_shift_prob, td.centre_shift)
        cx, cy = cx + dx, cy + dy
        names = info.get("keypoint_names") or (COCO_KEYPOINTS if len(kps) == 17 else ())
        if (kps[:, 2] > 0).sum() > td.half_body_joints and np.random.rand() < td.half_body_prob:
            half = half_body_box(kps, upper_body_ids(names), tw / th, td.half_body_padding, np.random.randn())
            if half is not None:
                cx, cy, bw, bh = half
        if flip:
            flip_src = np.array([[-1.0, 0, w - 1], [0, 1, 0]])  # fliplr_joints: x -> width - 1 - x
            cx = w - 1 - cx
        sf, rf = td.scale_factor, td.rot_factor
        factor = float(np.clip(np.random.randn() * sf + 1, 1 - sf, 1 + sf))
        bw, bh = bw * factor, bh * factor
        r = float(np.clip(np.random.randn() * rf, -2 * rf, 2 * rf))
        rotation = r if np.random.rand() <= td.rot_prob else 0.0
    m = top_down_matrix((cx, cy), (bw, bh), (th, tw), rotation)
    m = np.concatenate([m[:, :2] @ flip_src[:, :2], (m[:, :2] @ flip_src[:, 2:] + m[:, 2:])], 1)  # m ∘ flip
    rgb = cv2.warpAffine(np.asarray(img), m, (tw, th), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(0, 0, 0))
    out = kps.copy()
    out[:, :2] = affine_points(m, kps[:, :2])
    if flip:
        pairs = info.get("flip_pairs") or (flip_pairs(COCO_KEYPOINTS) if len(kps) == 17 else [])
        for a, b in pairs:
            out[[a, b]] = out[[b, a]]
    inside = (out[:, 0] >= 0) & (out[:, 0] < tw) & (out[:, 1] >= 0) & (out[:, 1] < th)
    out[~inside, 2] = 0
    targets = {"kind": "pose", "affine": torch.tensor(m, dtype=torch.float64), "size": torch.tensor([h, w]),
               "keypoints": torch.tensor(out, dtype=torch.float32),
               "src_keypoints": torch.tensor(kps, dtype=torch.float32),
               "box": torch.tensor(box, dtype=torch.float32),
               "area": torch.tensor(float(labels.get("area") or box[2] * box[3]), dtype=torch.float32)}
    return {"key": sample.get("__key__", ""), "image": _normalise(Image.fromarray(rgb), cfg), "targets": targets}


def _warp(img: Image.Image, s: float, offset: np.ndarray, size: int | tuple[int, int], resample, fill) -> Image.Image:
    # PIL's affine maps output pixels to input pixels: x_in = (x_out - o) / s
    th, tw = _hw(size)
    return img.transform((tw, th), Image.Transform.AFFINE, (1 / s, 0, -offset[0] / s, 0, 1 / s, -offset[1] / s),
                         resample=resample, fillcolor=fill)


def _normalise(img: Image.Image, cfg: DataConfig) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(cfg.mean or IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(cfg.std or IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def _xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def decode_human_sample(sample: dict, cfg: DataConfig, train: bool) -> dict:
    """One raw sample → ``{"key", "image", "targets"}`` (see the module docstring); ``HumanDecodeError`` on bad input."""
    info = _manifest_task(str(sample.get("__url__", "")))
    kind = _kind(sample, info)
    if kind == "pose" and cfg.pose_crop == "top_down":
        return _top_down_pose(sample, _image(sample, [k for k in cfg.image_key.split(";") if k]), cfg, train, info)
    size = cfg.image_size
    img = _image(sample, [k for k in cfg.image_key.split(";") if k])
    w, h = img.size
    if cfg.resize is not None:  # per-image sizes; the padding to a multiple is added after normalisation
        s, offset, size = _per_image_affine(w, h, cfg.resize, train)
    else:
        s, offset = _affine(w, h, size, train)
    th, tw = _hw(size)
    flip = train and random.random() < cfg.augment.hflip
    bilinear = Image.Resampling.BILINEAR
    out_img = _warp(img, s, offset, size, bilinear, (0, 0, 0))
    targets: dict = {"kind": kind, "scale": torch.tensor(s, dtype=torch.float32),
                     "offset": torch.tensor(offset, dtype=torch.float32), "size": torch.tensor([h, w])}

    def fwd(xy: np.ndarray) -> np.ndarray:  # source pixels -> input pixels (before the flip)
        return xy * s + offset

    if kind == "pose":
        labels = _labels(sample)
        kps = np.asarray(labels.get("keypoints", []), np.float64).reshape(-1, 3)
        if not len(kps):
            raise HumanDecodeError("pose sample without keypoints")
        box = np.asarray(labels.get("box", [0, 0, w, h]), np.float64).reshape(4)
        out = kps.copy()
        out[:, :2] = fwd(kps[:, :2]) + 0.5 * s - 0.5  # pixel centres
        if flip:
            out[:, 0] = tw - 1 - out[:, 0]
            pairs = info.get("flip_pairs") or (flip_pairs(COCO_KEYPOINTS) if len(kps) == 17 else [])
            for a, b in pairs:
                out[[a, b]] = out[[b, a]]
        inside = (out[:, 0] >= 0) & (out[:, 0] < tw) & (out[:, 1] >= 0) & (out[:, 1] < th)
        out[~inside, 2] = 0
        targets.update(keypoints=torch.tensor(out, dtype=torch.float32),
                       src_keypoints=torch.tensor(kps, dtype=torch.float32),
                       box=torch.tensor(box, dtype=torch.float32),
                       area=torch.tensor(float(labels.get("area") or box[2] * box[3]), dtype=torch.float32))
    elif kind == "parsing":
        if SEG_KEY not in sample:
            raise HumanDecodeError(f"no {SEG_KEY} label map")
        try:
            with Image.open(io.BytesIO(sample[SEG_KEY])) as seg:
                if seg.mode not in ("L", "P"):
                    raise HumanDecodeError(f"label map mode {seg.mode}, expected one channel")
                seg = seg.copy()
        except HumanDecodeError:
            raise
        except Exception as e:
            raise HumanDecodeError(f"corrupt label map: {type(e).__name__}: {e}") from None
        if seg.size != (w, h):
            raise HumanDecodeError(f"label map {seg.size} != image {(w, h)}")
        lab = np.asarray(_warp(seg.convert("L"), s, offset, size, Image.Resampling.NEAREST, 255), np.int64)
        if flip:
            lab = lab[:, ::-1].copy()
            swapped = lab.copy()
            for a, b in flip_pairs(info.get("class_names") or []):
                swapped[lab == a], swapped[lab == b] = b, a
            lab = swapped
        targets["label_map"] = torch.from_numpy(lab)
        if not train:  # evaluation scores parsing at the original resolution (as LIP / CIHP results are reported)
            targets["src_label_map"] = torch.from_numpy(np.asarray(seg.convert("L"), np.uint8).copy())
    elif kind == "attributes":
        attrs = np.asarray(_labels(sample).get("attributes", []), np.int64)
        if attrs.ndim != 1 or not len(attrs) or not np.isin(attrs, (-1, 0, 1)).all():
            raise HumanDecodeError("attributes must be a list of 1 / 0 / -1")
        targets["attributes"] = torch.from_numpy(attrs)
    elif kind == "reid":
        labels = _labels(sample)
        split = str(labels.get("split", "train"))
        if split not in REID_SPLITS:
            raise HumanDecodeError(f"reid split {split!r} is not one of {REID_SPLITS}")
        cls = sample.get("cls")
        label = int(cls.decode().strip()) if cls is not None else -1
        if train and label < 0:
            raise HumanDecodeError("reid training sample without its id index (cls)")
        targets.update(label=torch.tensor(label), pid=torch.tensor(int(labels.get("pid", -1))),
                       camid=torch.tensor(int(labels.get("camid", 0))), split=torch.tensor(REID_SPLITS.index(split)))
        if train and cfg.id_instances > 1:  # P x K: K - 1 more images of this identity, augmented on their own
            url = str(sample.get("__url__", ""))
            if not url or "://" in url:
                raise HumanDecodeError("data.id_instances needs local shards")
            pool = _identity_index(url).get(int(labels.get("pid", -1)), [])
            if not pool:
                raise HumanDecodeError(f"id {labels.get('pid')} has no training images in the index")
            views = [out_img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out_img]
            for j in np.random.randint(len(pool), size=cfg.id_instances - 1):
                with Image.open(io.BytesIO(_read_at(*pool[j]))) as other:
                    other = other.convert("RGB")
                so, oo = _affine(other.width, other.height, size, train)
                view = _warp(other, so, oo, size, bilinear, (0, 0, 0))
                if random.random() < cfg.augment.hflip:
                    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                views.append(view)
            return {"key": sample.get("__key__", ""), "image": torch.stack([_normalise(v, cfg) for v in views]),
                    "targets": targets}
    elif kind == "detection":
        labels = _labels(sample)
        src_boxes = np.asarray(labels.get("boxes") or [], np.float64).reshape(-1, 4)
        src_ignore = np.asarray(labels.get("ignore") or [], np.float64).reshape(-1, 4)
        if (src_boxes[:, 2:] < 0).any():
            raise HumanDecodeError("a box with a negative size")

        def place(b: np.ndarray) -> np.ndarray:
            xyxy = _xywh_to_xyxy(b)
            xyxy = np.concatenate([fwd(xyxy[:, :2]), fwd(xyxy[:, 2:])], 1)
            if flip:
                xyxy = np.stack([tw - xyxy[:, 2], xyxy[:, 1], tw - xyxy[:, 0], xyxy[:, 3]], 1)
            return np.clip(xyxy, 0, np.array([tw, th, tw, th], np.float64))

        boxes, ignore = place(src_boxes), place(src_ignore)
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1) & ((boxes[:, 3] - boxes[:, 1]) > 1)
        targets.update(boxes=torch.tensor(boxes[keep], dtype=torch.float32).reshape(-1, 4),
                       ignore=torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4),
                       src_boxes=torch.tensor(src_boxes, dtype=torch.float32).reshape(-1, 4),
                       src_ignore=torch.tensor(src_ignore, dtype=torch.float32).reshape(-1, 4))
    if flip:
        out_img = out_img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = _normalise(out_img, cfg)
    if cfg.resize is not None:
        image = _pad_to_multiple(image, cfg.resize.multiple)
        targets["input_hw"] = torch.tensor(image.shape[-2:])  # its own padded size, before a batch pads it further
    return {"key": sample.get("__key__", ""), "image": image, "targets": targets}


def letterbox_image(img: Image.Image, cfg: DataConfig) -> tuple[torch.Tensor, float, np.ndarray]:
    """An image as evaluation sees it: letterboxed to ``data.image_size`` and normalised, (3, H, W), with the
    scale and offset that map source pixels to input pixels (``foundation predict``)."""
    img = img.convert("RGB")
    if cfg.resize is not None:  # per-image size: the evaluation short side, padded to the multiple
        s, offset, size = _per_image_affine(img.width, img.height, cfg.resize, train=False)
        x = _normalise(_warp(img, s, offset, size, Image.Resampling.BILINEAR, (0, 0, 0)), cfg)
        return _pad_to_multiple(x, cfg.resize.multiple), s, offset
    s, offset = _affine(img.width, img.height, cfg.image_size, train=False)
    return _normalise(_warp(img, s, offset, cfg.image_size, Image.Resampling.BILINEAR, (0, 0, 0)), cfg), s, offset


def collate_targets(items: list[dict]) -> dict:
    """Per-sample target dicts → one dict: equal-shape tensors stacked, others (boxes) kept as lists."""
    out: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        elif isinstance(values[0], str):
            out[key] = values[0] if len(set(values)) == 1 else values
        else:
            out[key] = values
    return out


__all__ = ["HumanDecodeError", "affine_points", "collate_targets", "decode_human_sample", "invert_affine",
           "top_down_box", "top_down_matrix", "half_body_box", "centre_shift", "upper_body_ids", "letterbox_image", "pad_images"]
