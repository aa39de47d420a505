"""Image folder with one subfolder per class (ImageNet layout): ``SRC/<class>/<image>``.

When ``SRC`` holds ``train/`` and ``val/`` (or ``validation/``) folders of class folders, each becomes that
split; otherwise ``SRC`` is the one split ``--split``. Class indices follow the sorted class folder names
(or ``--class-names``, or those of the existing output's manifest, so a val split can be added later).
"""

from __future__ import annotations

from pathlib import Path

from foundation.data import DataError
from foundation.data.sources.base import IMAGE_SUFFIXES, BuildOptions, Plan, image_entry, sanitize_key

SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val"}


def plan(src: Path, opts: BuildOptions) -> Plan:
    if not src.is_dir():
        raise DataError(f"{src}: not a directory; --format imagefolder wants SRC/<class>/<image>")
    split_dirs = {SPLIT_FOLDERS[d.name]: d for d in sorted(src.iterdir()) if d.is_dir() and d.name in SPLIT_FOLDERS}
    roots = split_dirs if "train" in split_dirs or "val" in split_dirs else {opts.split: src}
    folders = {name: sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
               for name, root in roots.items()}
    names = opts.class_names or sorted({d.name for dirs in folders.values() for d in dirs})
    if not names:
        raise DataError(f"{src}: no class folders found; --format imagefolder wants SRC/<class>/<image>")
    index = {n: i for i, n in enumerate(names)}
    splits = {}
    for name, dirs in folders.items():
        tasks = []
        for d in dirs:
            if d.name not in index:
                raise DataError(f"class folder {d} is not among the class names {names[:10]}...; "
                                "give --class-names, or rebuild all splits with --overwrite")
            for path in sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
                rel = path.relative_to(roots[name]).with_suffix("")
                key = f"{len(tasks):08d}_{sanitize_key(str(rel))}"
                tasks.append({"key": key, "path": str(path), "label": index[d.name]})
        splits[name] = tasks
    return Plan(splits, encode, names, {"format": "imagefolder", "path": str(src.resolve())})


def encode(task: dict) -> dict:
    ext, data = image_entry(Path(task["path"]).read_bytes(), task["path"])
    return {ext: data}
