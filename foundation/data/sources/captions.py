"""Images with sidecar caption files: ``x.jpg`` + ``x.txt`` anywhere under ``SRC`` (several lines =
several captions). Images without a caption file (or with an empty one) are skipped and reported.
``SRC/train`` and ``SRC/val`` folders become those splits; otherwise ``SRC`` is the split ``--split``.
"""

from __future__ import annotations

from pathlib import Path

from foundation.data import DataError
from foundation.data.sources.base import IMAGE_SUFFIXES, BuildOptions, Plan, image_entry, read_captions, sanitize_key
from foundation.data.sources.imagefolder import SPLIT_FOLDERS


def plan(src: Path, opts: BuildOptions) -> Plan:
    if not src.is_dir():
        raise DataError(f"{src}: not a directory; --format captions wants a folder of x.jpg + x.txt pairs")
    split_dirs = {SPLIT_FOLDERS[d.name]: d for d in sorted(src.iterdir()) if d.is_dir() and d.name in SPLIT_FOLDERS}
    roots = split_dirs or {opts.split: src}
    splits = {}
    for name, root in roots.items():
        tasks = []
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            rel = path.relative_to(root).with_suffix("")
            tasks.append({"key": f"{len(tasks):08d}_{sanitize_key(str(rel))}", "path": str(path)})
        splits[name] = tasks
    return Plan(splits, encode, opts.class_names, {"format": "captions", "path": str(src.resolve())})


def encode(task: dict) -> dict:
    path = Path(task["path"])
    txt = read_captions(path.with_suffix(".txt"))
    ext, data = image_entry(path.read_bytes(), task["path"])
    return {ext: data, "txt": txt}
