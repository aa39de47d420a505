"""Synthetic humans with exact labels for the five human-centric tasks (tests and ``make demo``).

These are drawings, not photographs: real datasets come in through the converters (docs/human_centric.md).
An identity is a body (proportions, skin and hair colour) and an outfit (hat, hair length, sleeve length,
trousers / shorts / skirt, bag, each garment a colour and a pattern). A view draws the identity in a
random pose (limb angles), scale and place in front of one camera's background. Every pixel belongs to
one parsing class, and the colours are painted from the class map, so the labels are exact:

* the keypoints (COCO's 17, in COCO order) are the joints the limbs are drawn from, hidden (v = 1)
  where another body part is drawn over them;
* the parsing label map is the class map itself; the attributes are the outfit that chose the classes;
* an identity looks the same (same garment colours and patterns) in every camera;
* detection scenes place several identities, painted far to near, so nearer people occlude farther
  ones: full boxes come from each person drawn alone, visible boxes from what is left in the scene,
  and crowds of tiny people are ignore regions.

``generate(out, n, seed)`` writes ``out/{pose,parsing,attributes,reid,detection}/`` shards with their
manifests (see foundation/data/humans.py for the sample schema). The same seed gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from foundation.data import DataError
from foundation.data.humans import COCO_KEYPOINTS, COCO_SIGMAS, COCO_SKELETON, json_entry, png_entry, pose_task
from foundation.data.shards import prepare_output, read_manifest, write_manifest, write_split

CLASSES = ["background", "hat", "hair", "face", "upper_clothes", "pants", "skirt", "left_arm", "right_arm",
           "left_leg", "right_leg", "left_shoe", "right_shoe", "bag"]
C = {name: i for i, name in enumerate(CLASSES)}
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
           "black": (30, 30, 30), "white": (235, 235, 235)}
PATTERNS = ("solid", "stripes", "checks")
ATTRIBUTES = (["hat", "long_hair", "long_sleeves", "trousers", "shorts", "skirt", "bag", "upper_stripes",
               "upper_checks"] + [f"upper_{c}" for c in COLOURS] + [f"lower_{c}" for c in COLOURS])
CAMERAS = 6
TASKS = ("pose", "parsing", "attributes", "reid", "detection")
SKIN = [(241, 194, 160), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172)]
HAIR = [(20, 20, 20), (90, 56, 37), (180, 140, 70), (120, 120, 120)]


@dataclass(frozen=True)
class Identity:
    """What stays the same across cameras: body and outfit."""

    pid: int
    width: float  # body width factor
    skin: tuple
    hair_colour: tuple
    hat: bool
    long_hair: bool
    long_sleeves: bool
    lower: str  # trousers | shorts | skirt
    bag: bool
    upper: tuple  # (colour name, pattern)
    lower_look: tuple
    hat_colour: str
    bag_colour: str

    def attributes(self) -> list[int]:
        values = {"hat": self.hat, "long_hair": self.long_hair, "long_sleeves": self.long_sleeves,
                  "trousers": self.lower == "trousers", "shorts": self.lower == "shorts",
                  "skirt": self.lower == "skirt", "bag": self.bag, "upper_stripes": self.upper[1] == "stripes",
                  "upper_checks": self.upper[1] == "checks"}
        values.update({f"upper_{c}": self.upper[0] == c for c in COLOURS})
        values.update({f"lower_{c}": self.lower_look[0] == c for c in COLOURS})
        return [int(values[a]) for a in ATTRIBUTES]


def make_identity(pid: int, seed: int) -> Identity:
    rng = np.random.default_rng([seed, 1, pid])
    names = list(COLOURS)
    upper, lower = rng.choice(len(names), 2, replace=False)
    return Identity(
        pid=pid, width=float(rng.uniform(0.85, 1.15)), skin=SKIN[rng.integers(len(SKIN))],
        hair_colour=HAIR[rng.integers(len(HAIR))], hat=bool(rng.random() < 0.3), long_hair=bool(rng.random() < 0.4),
        long_sleeves=bool(rng.random() < 0.5), lower=("trousers", "shorts", "skirt")[rng.integers(3)],
        bag=bool(rng.random() < 0.35), upper=(names[upper], PATTERNS[rng.integers(3)]),
        lower_look=(names[lower], PATTERNS[rng.integers(2)]), hat_colour=names[rng.integers(len(names))],
        bag_colour=names[rng.integers(len(names))])


def _dir(angle: float, side: int) -> np.ndarray:
    """Unit vector ``angle`` radians from straight down, away from the body on ``side`` (+1 left = image right)."""
    return np.array([side * math.sin(angle), math.cos(angle)])


def skeleton(ident: Identity, rng: np.random.Generator) -> np.ndarray:
    """(17, 2) joints of a random pose, in units of body height, origin at the top centre (y down)."""
    k = np.zeros((17, 2))
    lean = rng.uniform(-0.03, 0.03)
    neck, pelvis = np.array([lean, 0.17]), np.array([0.0, 0.5])
    head = np.array([lean, 0.09])
    k[0] = head + [0, 0.018]  # nose
    k[1], k[2] = head + [0.024, -0.008], head + [-0.024, -0.008]  # eyes (person's left = image right)
    k[3], k[4] = head + [0.055, 0.0], head + [-0.055, 0.0]  # ears
    sw, hw = 0.10 * ident.width, 0.055 * ident.width
    for side, (s, e, w) in ((1, (5, 7, 9)), (-1, (6, 8, 10))):
        k[s] = neck + [side * sw, 0.025]
        a = rng.uniform(-0.15, 1.2)
        k[e] = k[s] + 0.17 * _dir(a, side)
        k[w] = k[e] + 0.15 * _dir(a + rng.uniform(-1.2, 1.2), side)
    for side, (h, kn, an) in ((1, (11, 13, 15)), (-1, (12, 14, 16))):
        k[h] = pelvis + [side * hw, 0.0]
        t = rng.uniform(-0.12, 0.35)
        k[kn] = k[h] + 0.23 * _dir(t, side)
        k[an] = k[kn] + 0.22 * _dir(t - rng.uniform(-0.1, 0.5), side)
    return k


# body parts, drawn back to front; a joint is visible when the part on top at its pixel is one of its own
PARTS = ["none", "hair_back", "left_shin", "left_thigh", "left_shoe", "right_shin", "right_thigh", "right_shoe",
         "lower_body", "neck", "torso", "left_upper_arm", "left_forearm", "left_hand", "right_upper_arm",
         "right_forearm", "right_hand", "bag", "head", "hair", "hat"]
P = {name: i for i, name in enumerate(PARTS)}
_HEAD = {"head", "hair", "hat"}
JOINT_PARTS = [_HEAD, _HEAD, _HEAD, _HEAD, _HEAD,
               {"torso", "left_upper_arm"}, {"torso", "right_upper_arm"},
               {"left_upper_arm", "left_forearm"}, {"right_upper_arm", "right_forearm"},
               {"left_forearm", "left_hand"}, {"right_forearm", "right_hand"},
               {"torso", "lower_body", "left_thigh"}, {"torso", "lower_body", "right_thigh"},
               {"left_thigh", "left_shin", "lower_body"}, {"right_thigh", "right_shin", "lower_body"},
               {"left_shin", "left_shoe"}, {"right_shin", "right_shoe"}]


def draw_person(canvas: Image.Image, ident: Identity, joints: np.ndarray, height: float) -> np.ndarray:
    """Paint the identity's parsing classes onto an ``L`` canvas; ``joints`` (17, 2) in canvas pixels.
    Returns the (H, W) uint8 map of which body part (``PARTS``) is on top at each pixel."""
    part_canvas = Image.new("L", canvas.size, 0)
    draws = (ImageDraw.Draw(canvas), ImageDraw.Draw(part_canvas))

    def shape(kind: str, coords, cls: str, part: str, **kw) -> None:
        for d, value in zip(draws, (C[cls], P[part])):
            getattr(d, kind)(coords, fill=value, **kw)

    def px(v: float) -> int:
        return max(1, int(round(v * height)))

    def limb(a, b, cls, part, width):
        shape("line", [tuple(a), tuple(b)], cls, part, width=px(width))
        for p in (a, b):
            r = px(width) / 2
            shape("ellipse", [p[0] - r, p[1] - r, p[0] + r, p[1] + r], cls, part)

    def disc(p, rx, ry0, ry1, cls, part):
        shape("ellipse", [p[0] - rx, p[1] - ry0, p[0] + rx, p[1] + ry1], cls, part)

    head = (joints[3] + joints[4]) / 2
    r = 0.065 * height
    if ident.long_hair:  # hair falls behind the shoulders
        disc(head, 1.2 * r, 1.1 * r, 2.6 * r, "hair", "hair_back")
    for side, (h, kn, an) in (("left", (11, 13, 15)), ("right", (12, 14, 16))):
        thigh = "pants" if ident.lower != "skirt" else f"{side}_leg"
        shin = "pants" if ident.lower == "trousers" else f"{side}_leg"
        limb(joints[kn], joints[an], shin, f"{side}_shin", 0.06)
        limb(joints[h], joints[kn], thigh, f"{side}_thigh", 0.08)
        disc(joints[an] + [0, 0], 0.045 * height, 0.015 * height, 0.03 * height, f"{side}_shoe", f"{side}_shoe")
    hip_l, hip_r, sh_l, sh_r = joints[11], joints[12], joints[5], joints[6]
    if ident.lower == "skirt":
        y0, y1 = hip_l[1] - 0.03 * height, (joints[13][1] + joints[14][1]) / 2
        shape("polygon", [(hip_l[0] + 0.04 * height, y0), (hip_r[0] - 0.04 * height, y0),
                          (min(hip_r[0], joints[14][0]) - 0.07 * height, y1),
                          (max(hip_l[0], joints[13][0]) + 0.07 * height, y1)], "skirt", "lower_body")
    else:
        shape("polygon", [(hip_l[0] + 0.04 * height, hip_l[1] - 0.03 * height),
                          (hip_r[0] - 0.04 * height, hip_r[1] - 0.03 * height),
                          (hip_r[0], hip_r[1] + 0.07 * height), (hip_l[0], hip_l[1] + 0.07 * height)],
              "pants", "lower_body")
    limb((sh_l + sh_r) / 2, head, "face", "neck", 0.05)
    shape("polygon", [(sh_l[0] + 0.02 * height, sh_l[1] - 0.015 * height),
                      (sh_r[0] - 0.02 * height, sh_r[1] - 0.015 * height),
                      (hip_r[0] - 0.025 * height, hip_r[1] + 0.01 * height),
                      (hip_l[0] + 0.025 * height, hip_l[1] + 0.01 * height)], "upper_clothes", "torso")
    for side, (s_, e, w) in (("left", (5, 7, 9)), ("right", (6, 8, 10))):
        limb(joints[s_], joints[e], "upper_clothes", f"{side}_upper_arm", 0.055)
        limb(joints[e], joints[w], "upper_clothes" if ident.long_sleeves else f"{side}_arm", f"{side}_forearm", 0.045)
        disc(joints[w], 0.03 * height, 0.03 * height, 0.03 * height, f"{side}_arm", f"{side}_hand")
    if ident.bag:
        top = joints[12] + [-0.11 * height, -0.05 * height]
        strap = (joints[5] * 2 + joints[6]) / 3  # from beside the shoulder: a thin strap does not hide the joint
        shape("line", [tuple(strap), tuple(top + [0.04 * height, 0])], "bag", "bag", width=px(0.012))
        shape("rectangle", [top[0], top[1], top[0] + 0.08 * height, top[1] + 0.1 * height], "bag", "bag")
    disc(head, r, 1.1 * r, 1.1 * r, "face", "head")
    shape("pieslice", [head[0] - 1.05 * r, head[1] - 1.25 * r, head[0] + 1.05 * r, head[1] + 0.5 * r], "hair", "hair",
          start=180, end=360)
    if ident.hat:
        shape("rectangle", [head[0] - 0.85 * r, head[1] - 1.6 * r, head[0] + 0.85 * r, head[1] - 0.5 * r], "hat", "hat")
        shape("rectangle", [head[0] - 1.3 * r, head[1] - 0.7 * r, head[0] + 1.3 * r, head[1] - 0.45 * r], "hat", "hat")
    return np.asarray(part_canvas)


def visibility(joints: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """(17,) COCO ``v``: 2 where the part on top at the joint's pixel is the joint's own, else 1 (hidden
    behind another part of the body: the other arm, the bag)."""
    h, w = parts.shape
    v = np.ones(len(joints))
    for i, (x, y) in enumerate(joints):
        xi, yi = int(np.floor(x)), int(np.floor(y))
        if 0 <= xi < w and 0 <= yi < h and PARTS[parts[yi, xi]] in JOINT_PARTS[i]:
            v[i] = 2
    return v


def _pattern(colour: tuple, pattern: str, ys: np.ndarray, xs: np.ndarray, period: int) -> np.ndarray:
    base = np.asarray(colour, np.int32)
    dark = base * 3 // 5
    if pattern == "stripes":
        on = (ys // period) % 2 == 0
    elif pattern == "checks":
        on = ((ys // period) + (xs // period)) % 2 == 0
    else:
        on = np.ones(ys.shape, bool)
    return np.where(on[:, None], base, dark).astype(np.uint8)


def paint(rgb: np.ndarray, labels: np.ndarray, ident: Identity, origin: tuple[float, float], height: float) -> None:
    """Colour the pixels of ``labels`` (> 0) with the identity's look; patterns are anchored at ``origin``
    and scale with ``height``, so they move with the person."""
    period = max(2, int(round(0.04 * height)))
    looks = {C["hat"]: (COLOURS[ident.hat_colour], "solid"), C["hair"]: (ident.hair_colour, "solid"),
             C["upper_clothes"]: (COLOURS[ident.upper[0]], ident.upper[1]),
             C["pants"]: (COLOURS[ident.lower_look[0]], ident.lower_look[1]),
             C["skirt"]: (COLOURS[ident.lower_look[0]], ident.lower_look[1]),
             C["bag"]: (COLOURS[ident.bag_colour], "solid"), C["left_shoe"]: ((60, 40, 30), "solid"),
             C["right_shoe"]: ((60, 40, 30), "solid")}
    for cls in np.unique(labels):
        if cls == 0:
            continue
        ys, xs = np.nonzero(labels == cls)
        colour, pattern = looks.get(int(cls), (ident.skin, "solid"))
        rgb[ys, xs] = _pattern(colour, pattern, ys - int(origin[1]), xs - int(origin[0]), period)


def background(camera: int, w: int, h: int, seed: int) -> np.ndarray:
    """A camera's backdrop: its own colour gradient and texture (the same for every view of that camera)."""
    rng = np.random.default_rng([seed, 2, camera])
    top, bottom = rng.integers(60, 200, 3), rng.integers(40, 180, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    img = top * (1 - t) + bottom * t + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class Rendered:
    labels: np.ndarray  # (H, W) uint8 parsing classes of this person alone
    keypoints: np.ndarray  # (17, 3) [x, y, v] pixels
    origin: tuple[float, float]
    height: float


def render(ident: Identity, rng: np.random.Generator, size: tuple[int, int], height: float,
           top_centre: tuple[float, float]) -> Rendered:
    joints = skeleton(ident, rng) * height + np.asarray(top_centre)
    canvas = Image.new("L", size, 0)
    parts = draw_person(canvas, ident, joints, height)
    kps = np.concatenate([joints, visibility(joints, parts)[:, None]], 1)
    return Rendered(np.asarray(canvas), kps, top_centre, height)


def box_of(mask: np.ndarray) -> list[float] | None:
    """[x, y, w, h] of the pixels of ``mask`` (pixel edges), None when empty."""
    ys, xs = np.nonzero(mask)
    if not ys.size:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def person_view(ident: Identity, camera: int, view: int, seed: int, size: int) -> dict:
    """One identity seen by one camera: image, class map, keypoints, box."""
    rng = np.random.default_rng([seed, 3, ident.pid, camera, view])
    w, h = size // 2, size
    for _ in range(20):  # a pose whose drawing stays inside the frame
        height = h * rng.uniform(0.7, 0.9)
        top = (w / 2 + rng.uniform(-0.08, 0.08) * w, rng.uniform(0.03, 0.08) * h)
        r = render(ident, rng, (w, h), height, top)
        ys, xs = np.nonzero(r.labels)
        inside = (r.keypoints[:, 0] >= 0).all() and (r.keypoints[:, 0] < w).all() and (r.keypoints[:, 1] < h).all()
        if inside and xs.min() > 0 and xs.max() < w - 1 and ys.max() < h - 1:
            break
    rgb = background(camera, w, h, seed)
    paint(rgb, r.labels, ident, r.origin, r.height)
    return {"image": rgb, "labels": r.labels, "keypoints": r.keypoints, "box": box_of(r.labels > 0)}


def scene(index: int, people: list[Identity], seed: int, size: int) -> dict:
    """Several identities in one picture, painted far to near, with tiny-crowd ignore regions."""
    rng = np.random.default_rng([seed, 4, index])
    w, h = size * 2, int(size * 1.5)
    camera = int(rng.integers(CAMERAS))
    rgb = background(camera, w, h, seed)
    placed = []
    for ident in people:
        height = h * rng.uniform(0.35, 0.8)
        top = (rng.uniform(0.1, 0.9) * w, rng.uniform(0.02, 1.0) * (h - height * 1.02))
        placed.append((top[1] + height, ident, render(ident, rng, (w, h), height, top)))
    placed.sort(key=lambda p: p[0])  # feet higher in the picture = farther: painted first
    ignore = []
    if rng.random() < 0.5:  # a crowd of tiny people far away: an ignore region
        cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.05, 0.3) * h
        crowd = np.zeros((h, w), bool)
        for j in range(int(rng.integers(3, 6))):
            tiny = make_identity(10_000 + j, seed + index)
            r = render(tiny, rng, (w, h), h * 0.08, (cx + rng.uniform(-0.08, 0.08) * w, cy))
            paint(rgb, r.labels, tiny, r.origin, r.height)
            crowd |= r.labels > 0
        ignore.append(box_of(crowd))
    owner = np.full((h, w), -1, np.int32)
    for i, (_, ident, r) in enumerate(placed):
        paint(rgb, r.labels, ident, r.origin, r.height)
        owner[r.labels > 0] = i
    boxes, visible, heads, pids = [], [], [], []
    head_classes = [C["face"], C["hair"], C["hat"]]
    for i, (_, ident, r) in enumerate(placed):
        full, vis = box_of(r.labels > 0), box_of(owner == i)
        if full is None:
            continue
        if vis is None:  # hidden behind others: nothing to detect, nothing to punish
            ignore.append(full)
            continue
        boxes.append(full)
        visible.append(vis)
        heads.append(box_of(np.isin(r.labels, head_classes) & (r.labels > 0)))
        pids.append(ident.pid)
    return {"image": rgb, "boxes": boxes, "visible": visible, "heads": heads, "ignore": ignore, "pids": pids,
            "camera": camera}


def _write(out: Path, task: dict, splits: dict[str, Iterator[dict]], seed: int, command: str,
           overwrite: bool) -> dict:
    manifest = prepare_output(out, splits, overwrite=overwrite)
    entries = {name: write_split(out, name, samples, max_count=1000) for name, samples in splits.items()}
    return write_manifest(out, manifest, entries, class_names=None, command=command, extra={"human_task": task},
                          source={"format": "synthetic-humans", "seed": seed,
                                  "note": "procedurally drawn people, not a real dataset"})


def generate(out: str | Path, n: int, seed: int = 0, views: int = 3, size: int = 128, command: str = "",
             overwrite: bool = False) -> dict:
    """Write ``n`` identities × ``views`` cameras (and ``ceil(n / 3)`` scenes) as five task shard sets under
    ``out``; returns {task: manifest}. 80% of the identities (and scenes) train, the rest val; ReID: the
    val identities' first view is the query, their other views the gallery, joined by ``n // 10`` (at
    least one) distractors: other people, id 0."""
    if n < 2 or views < 2 or size < 32:
        raise DataError(f"synthetic humans need --n ≥ 2 identities, --views ≥ 2 and --size ≥ 32 (got {n}, {views}, {size})")
    out = Path(out)
    for task in TASKS:  # refuse before drawing anything; --overwrite replaces every split of an older run
        old = read_manifest(out / task) if (out / task).is_dir() else None
        if old is not None or (out / task).is_dir() and any((out / task).glob("*.tar")):
            if not overwrite:
                raise DataError(f"{out / task} already holds shards; pass --overwrite to replace them, or another --out")
            prepare_output(out / task, (old or {}).get("splits", {}), overwrite=True)
            (out / task / "manifest.json").unlink(missing_ok=True)
    idents = [make_identity(pid, seed) for pid in range(1, n + 1)]
    n_train = min(n - 1, max(1, int(round(0.8 * n))))
    split_of = {ident.pid: "train" if i < n_train else "val" for i, ident in enumerate(idents)}
    samples: dict[str, dict[str, list]] = {t: {} for t in TASKS}
    train_index = {ident.pid: i for i, ident in enumerate(idents[:n_train])}
    for ident in idents:
        cams = np.random.default_rng([seed, 5, ident.pid]).choice(CAMERAS, views, replace=views > CAMERAS)
        for v, cam in enumerate(cams):
            view = person_view(ident, int(cam) + 1, v, seed, size)
            key = f"id{ident.pid:05d}_c{int(cam) + 1}_v{v}"
            image = png_entry(view["image"])
            split = split_of[ident.pid]
            samples["pose"].setdefault(split, []).append({
                "__key__": key, "png": image, "json": json_entry({
                    "keypoints": view["keypoints"].round(3).tolist(), "box": view["box"],
                    "crop": [0, 0, size // 2, size], "pid": ident.pid})})
            samples["parsing"].setdefault(split, []).append({"__key__": key, "png": image,
                                                             "seg.png": png_entry(view["labels"])})
            samples["attributes"].setdefault(split, []).append({
                "__key__": key, "png": image, "json": json_entry({"attributes": ident.attributes(), "pid": ident.pid})})
            reid_split = "train" if split == "train" else ("query" if v == 0 else "gallery")
            entry = {"__key__": key, "png": image,
                     "json": json_entry({"pid": ident.pid, "camid": int(cam) + 1, "split": reid_split})}
            if reid_split == "train":
                entry["cls"] = str(train_index[ident.pid]).encode()
            samples["reid"].setdefault(reid_split, []).append(entry)
    for j in range(max(1, n // 10)):  # distractors: people nobody looks for, id 0 in the gallery (Market-1501)
        ident = make_identity(n + 1 + j, seed)
        cam = int(np.random.default_rng([seed, 7, j]).integers(CAMERAS)) + 1
        view = person_view(ident, cam, 0, seed, size)
        samples["reid"]["gallery"].append({
            "__key__": f"distractor{j:05d}_c{cam}", "png": png_entry(view["image"]),
            "json": json_entry({"pid": 0, "camid": cam, "split": "gallery"})})
    rng = np.random.default_rng([seed, 6])
    n_scenes = math.ceil(n / 3)
    for i in range(n_scenes):
        people = [idents[j] for j in rng.choice(n, min(n, int(rng.integers(2, 6))), replace=False)]
        s = scene(i, people, seed, size)
        split = "train" if i < max(1, int(round(0.8 * n_scenes))) else "val"
        samples["detection"].setdefault(split, []).append({
            "__key__": f"scene{i:05d}", "png": png_entry(s["image"]),
            "json": json_entry({k: s[k] for k in ("boxes", "visible", "heads", "ignore", "pids", "camera")})})
    tasks = {"pose": pose_task(COCO_KEYPOINTS, COCO_SKELETON, COCO_SIGMAS),
             "parsing": {"kind": "parsing", "class_names": CLASSES, "ignore_index": 255},
             "attributes": {"kind": "attributes", "attribute_names": ATTRIBUTES},
             "reid": {"kind": "reid", "num_ids": {"train": n_train, "test": n - n_train}, "cameras": CAMERAS},
             "detection": {"kind": "detection", "class_names": ["person"]}}
    return {task: _write(out / task, info, {k: iter(v) for k, v in samples[task].items()}, seed, command, overwrite)
            for task, info in tasks.items()}


__all__ = ["ATTRIBUTES", "CLASSES", "Identity", "background", "generate", "make_identity", "person_view", "scene"]
