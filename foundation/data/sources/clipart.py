"""Clip art and icons: ``SRC/<class>/**/<name>.png`` with transparent backgrounds, flattened on white.

Like ``imagefolder`` (the top-level folder is the class, images may sit in subfolders), but each image is
flattened onto a white background (a transparent pixel's colour is often black: converted to RGB as it
is, the drawing would vanish), shrunk to at most ``MAX_SIDE`` pixels, and re-encoded as PNG; the file
name, whose words describe the picture, becomes the caption (``txt``). Two real sets reachable offline
are built from it:

- ``openclipart``: the Debian package ``openclipart-png`` (/usr/share/openclipart/png, ~8,100 PNGs in 22
  top-level categories). ``unsorted`` and ``special`` are not classes; categories with fewer than 100
  images are left out and larger ones capped at 500 (seeded), leaving 11 classes, ~4,200 images.
- ``oxygen-icons``: the KDE Oxygen icon theme (Debian ``oxygen-icon-theme``), its 32x32 icons by context
  (actions, apps, devices, mimetypes, places, status: contexts with at least 50 icons), ~1,450 icons.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

from PIL import Image

from foundation.data import DataError
from foundation.data.sources.base import BuildOptions, Plan, Skip, run_plan, sanitize_key

MAX_SIDE = 128
SUFFIXES = {".png", ".gif", ".webp"}

OPENCLIPART_DIRS = ("/usr/share/openclipart/png",)
OXYGEN_DIRS = ("/usr/share/icons/oxygen/base/32x32",)


def collect(src: Path, *, exclude: tuple[str, ...] = (), min_per_class: int = 1, max_per_class: int | None = None,
            seed: int = 0, class_names: list[str] | None = None) -> tuple[list[str], list[dict]]:
    """(class names, tasks) of ``SRC/<class>/**/<image>``; small classes dropped, large ones capped (seeded)."""
    if not src.is_dir():
        raise DataError(f"{src}: not a directory; --format clipart wants SRC/<class>/**/<image>.png")
    found = {}
    for d in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in exclude):
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if len(files) >= min_per_class:
            if max_per_class is not None and len(files) > max_per_class:
                files = sorted(random.Random(f"{seed}-{d.name}").sample(files, max_per_class))
            found[d.name] = files
    names = class_names or sorted(found)
    if not names:
        raise DataError(f"{src}: no class folders with at least {min_per_class} images")
    tasks = []
    for label, name in enumerate(names):
        if name not in found:
            raise DataError(f"class {name!r} has no folder with at least {min_per_class} images in {src}")
        for path in found[name]:
            rel = path.relative_to(src).with_suffix("")
            tasks.append({"key": f"{len(tasks):06d}_{sanitize_key(str(rel))}", "path": str(path), "label": label})
    return names, tasks


def caption(path: str) -> str:
    """The words of a file name: ``flying_wasp_gerald_g._02.png`` -> ``flying wasp gerald g``."""
    words = [w for w in re.split(r"[\s_\-.]+", Path(path).stem) if w and not w.isdigit()]
    return " ".join(words) or Path(path).parent.name


def encode(task: dict) -> dict:
    try:
        with Image.open(task["path"]) as img:
            img.load()
            rgba = img.convert("RGBA")
    except Exception as e:  # PIL raises many types for bad files
        raise Skip(f"{task['path']}: unreadable image ({type(e).__name__}: {e})") from None
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    flat.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    flat.save(buf, "PNG")
    return {"png": buf.getvalue(), "txt": caption(task["path"]).encode()}


def plan(src: Path, opts: BuildOptions) -> Plan:
    names, tasks = collect(src, class_names=opts.class_names)
    return Plan({opts.split: tasks}, encode, names, {"format": "clipart", "path": str(src.resolve())})


def _find(src: str | None, dirs: tuple[str, ...], package: str) -> Path:
    for d in ([src] if src else dirs):
        if Path(d).expanduser().is_dir():
            return Path(d).expanduser()
    raise DataError(f"{src or dirs[0]} not found: install the Debian package {package} (apt-get install {package}) "
                    "or give --src DIR")


def _build(out: Path, opts: BuildOptions, src: Path, dataset: str, **select) -> dict:
    names, tasks = collect(src, seed=opts.seed, **select)
    opts.val_fraction = opts.val_fraction or 0.2
    p = Plan({"train": tasks}, encode, names, {"format": "clipart", "dataset": dataset, "path": str(src.resolve()),
                                               **{k: list(v) if isinstance(v, tuple) else v for k, v in select.items()}})
    return run_plan(p, out, opts)


def openclipart(out: Path, opts: BuildOptions, src: str | None = None) -> dict:
    """openclipart-png: 11 categories with >= 100 images (capped at 500 each), 20% of each held out as val."""
    root = _find(src, OPENCLIPART_DIRS, "openclipart-png")
    return _build(out, opts, root, "openclipart", exclude=("unsorted", "special"), min_per_class=100,
                  max_per_class=500)


def oxygen_icons(out: Path, opts: BuildOptions, src: str | None = None) -> dict:
    """Oxygen 32x32 icons by context (>= 50 icons each), 20% of each held out as val."""
    root = _find(src, OXYGEN_DIRS, "oxygen-icon-theme")
    return _build(out, opts, root, "oxygen-icons", min_per_class=50)
