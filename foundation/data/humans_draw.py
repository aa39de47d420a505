"""Draw the labels of human-centric samples onto their images, to check a converter by eye.

``draw_sample(sample, task)`` returns a PIL image: pose → skeleton and keypoints (visible filled, occluded
hollow) and the box; parsing → the image next to the label map overlaid in a fixed palette, with the
classes present; attributes → the image with the present (and unknown) attributes listed; ReID → the
image with its id, camera and split; detection → full boxes (green), visible boxes (blue), heads
(yellow) and ignore regions (red). Small images are enlarged (nearest neighbour) so labels stay legible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from foundation.data.humans import DECODERS, IGNORE_LABEL

MIN_SIDE = 256
LIMB_COLOURS = [(255, 80, 80), (80, 255, 80), (80, 160, 255), (255, 220, 60), (255, 80, 255), (60, 255, 255)]


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 distinct class colours (the PASCAL VOC bit-interleaving palette); 255 = white."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal[IGNORE_LABEL % n] = (255, 255, 255)
    return pal


def _enlarge(img: Image.Image) -> tuple[Image.Image, float]:
    s = max(1.0, MIN_SIDE / min(img.size))
    if s > 1:
        img = img.resize((round(img.width * s), round(img.height * s)), Image.NEAREST)
    return img, s


def _text_panel(img: Image.Image, lines: list[str]) -> Image.Image:
    width = max([img.width] + [8 + 6 * len(t) for t in lines])
    out = Image.new("RGB", (width, img.height + 12 * len(lines) + 6), (255, 255, 255))
    out.paste(img, (0, 0))
    d = ImageDraw.Draw(out)
    for i, t in enumerate(lines):
        d.text((4, img.height + 3 + 12 * i), t, fill=(0, 0, 0))
    return out


def _rect(d: ImageDraw.ImageDraw, box, s: float, colour, width: int = 2) -> None:
    x, y, w, h = (float(v) * s for v in box)
    d.rectangle([x, y, x + w, y + h], outline=colour, width=width)


def draw_sample(sample: dict, task: dict) -> Image.Image:
    kind = task["kind"]
    t = DECODERS[kind](sample)
    img, s = _enlarge(Image.fromarray(t["image"]))
    d = ImageDraw.Draw(img)
    key = sample.get("__key__", "")
    if kind == "pose":
        kps = t["keypoints"]
        for i, (a, b) in enumerate(task.get("skeleton") or []):
            if kps[a, 2] > 0 and kps[b, 2] > 0:
                d.line([tuple(kps[a, :2] * s), tuple(kps[b, :2] * s)], fill=LIMB_COLOURS[i % len(LIMB_COLOURS)], width=2)
        for x, y, v in kps:
            if v > 0:
                r = 3
                d.ellipse([x * s - r, y * s - r, x * s + r, y * s + r], outline=(255, 255, 255),
                          fill=(255, 0, 0) if v >= 2 else None)
        _rect(d, t["box"], s, (0, 255, 0))
        labelled, visible = int((kps[:, 2] > 0).sum()), int((kps[:, 2] >= 2).sum())
        return _text_panel(img, [key, f"{labelled}/{len(kps)} keypoints labelled, {visible} visible"])
    if kind == "parsing":
        labels = t["label_map"]
        pal = palette()
        colour = Image.fromarray(pal[labels])
        overlay = Image.blend(Image.fromarray(t["image"]), colour, 0.6)
        overlay, _ = _enlarge(overlay)
        both = Image.new("RGB", (img.width * 2, img.height))
        both.paste(img, (0, 0))
        both.paste(overlay, (img.width, 0))
        names = task.get("class_names") or []
        present = [f"{int(c)}:{names[c] if c < len(names) else '?'}" for c in np.unique(labels) if c != IGNORE_LABEL]
        return _text_panel(both, [key, "classes " + " ".join(present[:8])] +
                           ([" ".join(present[8:16])] if len(present) > 8 else []))
    if kind == "attributes":
        names = task.get("attribute_names") or []
        vec = t["attributes"]
        on = [names[i] if i < len(names) else str(i) for i in np.flatnonzero(vec == 1)]
        unknown = [names[i] if i < len(names) else str(i) for i in np.flatnonzero(vec < 0)]
        lines = [key] + [", ".join(on[i:i + 3]) for i in range(0, len(on), 3)]
        return _text_panel(img, lines + ([f"unknown: {', '.join(unknown)}"] if unknown else []))
    if kind == "reid":
        return _text_panel(img, [key, f"id {t['pid']}  camera {t['camid']}  {t['split']}"])
    for box in t["ignore"]:
        _rect(d, box, s, (255, 0, 0))
    for box in t["boxes"]:
        _rect(d, box, s, (0, 255, 0))
    for box in t["visible"]:
        _rect(d, box, s, (0, 128, 255), 1)
    for box in t["heads"]:
        _rect(d, box, s, (255, 255, 0), 1)
    return _text_panel(img, [key, f"{len(t['boxes'])} people, {len(t['ignore'])} ignore regions",
                             "green full, blue visible, yellow head, red ignore"])


def draw_samples(samples, task: dict, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Draw each raw sample into ``out_dir/<prefix><key>.png``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in samples:
        path = out / f"{prefix}{sample['__key__']}.png"
        draw_sample(sample, task).save(path)
        paths.append(path)
    return paths


__all__ = ["draw_sample", "draw_samples", "palette"]
