"""Human parsing folders (LIP, CIHP, or a plain images/ + labels/ pair) → image + single-channel label map.

Layouts found under SRC, per split (train / val / test):

* LIP: ``**/{split}_images/``, ``**/{split}_segmentations/``, id list ``**/{split}_id.txt``;
* CIHP: ``{Training,Validation,Testing}/Images/``, ``.../Category_ids/``, id list ``.../{split}_id.txt``;
* plain: ``images/`` and ``labels/`` (or ``segmentations/``, ``annotations/``), id list ``{split}_id.txt``
  if present, as the split ``--split``.

An id list names the samples (file stems); without one every image is a sample. Label maps are PNGs of
class indices (mode L or P; 255 = ignore), written into the shard as ``<key>.seg.png`` (mode L). Class
names: ``--class-names`` or LIP's 20 (CIHP uses the same). A missing label map, one whose size differs
from its image, or values beyond the class names are bad input: skipped and reported.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from foundation.data import DataError
from foundation.data.humans import IGNORE_LABEL, LIP_CLASSES, SEG_KEY, png_entry
from foundation.data.sources.base import IMAGE_SUFFIXES, BuildOptions, Plan, Skip, read_image, sanitize_key

CIHP_SPLITS = {"train": "Training", "val": "Validation", "test": "Testing"}
PLAIN_LABELS = ("labels", "segmentations", "annotations", "Category_ids")


def _first(paths) -> Path | None:
    return next(iter(sorted(paths)), None)


def _layouts(src: Path, opts: BuildOptions) -> dict[str, tuple[Path, Path, Path | None]]:
    """split → (image folder, label folder, id list or None)."""
    found = {}
    for split in CIHP_SPLITS:
        images = _first(p for p in src.rglob(f"{split}_images") if p.is_dir())
        labels = _first(p for p in src.rglob(f"{split}_segmentations") if p.is_dir())
        if images and labels:  # LIP
            found[split] = (images, labels, _first(src.rglob(f"{split}_id.txt")))
            continue
        cihp = src / CIHP_SPLITS[split]
        if (cihp / "Images").is_dir() and (cihp / "Category_ids").is_dir():
            found[split] = (cihp / "Images", cihp / "Category_ids", _first(cihp.glob(f"{split}_id.txt")))
    if found:
        return found
    labels = next((src / n for n in PLAIN_LABELS if (src / n).is_dir()), None)
    if (src / "images").is_dir() and labels is not None:
        ids = src / f"{opts.split}_id.txt"
        return {opts.split: (src / "images", labels, ids if ids.is_file() else None)}
    raise DataError(f"{src}: no parsing layout found: want LIP ({{split}}_images/ + {{split}}_segmentations/), "
                    "CIHP (Training/Images/ + Training/Category_ids/) or images/ + labels/")


def plan(src: Path, opts: BuildOptions) -> Plan:
    if not src.is_dir():
        raise DataError(f"{src}: not a directory; --format human_parsing wants a LIP / CIHP folder")
    names = opts.class_names or LIP_CLASSES
    if len(names) > IGNORE_LABEL:
        raise DataError(f"{len(names)} parsing classes: at most {IGNORE_LABEL} (255 is the ignore label)")
    splits = {}
    for split, (images, labels, ids) in _layouts(src, opts).items():
        by_stem = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        stems = ([s.strip() for s in ids.read_text().split() if s.strip()] if ids else sorted(by_stem))
        tasks = []
        for stem in stems:
            image = by_stem.get(stem)
            task = {"key": f"{len(tasks):08d}_{sanitize_key(stem)}", "label_map": str(labels / f"{stem}.png"),
                    "num_classes": len(names)}
            if image is None:
                task["error"] = f"{ids or images}: {stem}: no image in {images}"
            else:
                task["image"] = str(image)
            tasks.append(task)
        splits[split] = tasks
    return Plan(splits, encode, None, {"format": "human_parsing", "path": str(src.resolve())},
                manifest_extra={"human_task": {"kind": "parsing", "class_names": list(names),
                                               "ignore_index": IGNORE_LABEL}})


def encode(task: dict) -> dict:
    ext, data = read_image(task, "image")
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
    path = task["label_map"]
    try:
        with Image.open(path) as seg:
            seg.load()
            if seg.mode not in ("L", "P"):
                raise Skip(f"{path}: label map of mode {seg.mode}; want one channel of class indices (L or P)")
            labels = np.asarray(seg)
    except FileNotFoundError:
        raise Skip(f"{path}: missing label map for {task['image']}") from None
    except Skip:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise Skip(f"{path}: unreadable label map ({type(e).__name__}: {e})") from None
    if labels.shape != (size[1], size[0]):
        raise Skip(f"{path}: label map is {labels.shape[1]}x{labels.shape[0]}, its image {size[0]}x{size[1]}")
    bad = (labels >= task["num_classes"]) & (labels != IGNORE_LABEL)
    if bad.any():
        raise Skip(f"{path}: label values {sorted(set(labels[bad].tolist()))[:5]} beyond the "
                   f"{task['num_classes']} class names")
    return {ext: data, SEG_KEY: png_entry(labels.astype(np.uint8))}
