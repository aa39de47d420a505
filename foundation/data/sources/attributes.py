"""Pedestrian attributes: PA-100K's ``annotation.mat`` (``--format pa100k``) and a generic CSV
(``--format attribute_table``) → image + attribute vector (1 present, 0 absent, -1 unknown).

**PA-100K.** SRC is ``annotation.mat`` or its folder; the file (read with ``scipy.io.loadmat``) holds
``attributes`` (26 names), ``{train,val,test}_images_name`` and ``{train,val,test}_label``. Images are
under ``--image-root``, else ``data/`` or ``release_data/release_data/`` next to the file.

**CSV.** One row per image, an image column (``image``, ``path``, ... or ``--image-column``) and either
one column per attribute (values 1 / 0 / -1, empty = unknown; the attribute names are the columns) or
an ``attributes`` column listing the present attributes separated by ``;`` or ``|`` (all others absent;
the vocabulary comes from ``--class-names``). An optional ``split`` column sends rows to splits. A name
not in the vocabulary, a value that is not 1/0/-1, a missing image: the row is skipped and reported.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from foundation.data import DataError
from foundation.data.humans import json_entry
from foundation.data.sources.base import BuildOptions, Plan, read_image, sanitize_key
from foundation.data.sources.table import IMAGE_COLUMNS

PA100K_SPLITS = ("train", "val", "test")
LIST_COLUMN = "attributes"
VALUES = {"1": 1, "0": 0, "-1": -1, "": -1, "true": 1, "false": 0, "yes": 1, "no": 0}


def _strings(cell) -> list[str]:
    """Names out of a MATLAB cell array as loadmat returns it (nested object arrays of str)."""
    out = []
    for item in np.asarray(cell, dtype=object).ravel():
        while isinstance(item, np.ndarray):
            item = item.ravel()[0] if item.size else ""
        out.append(str(item))
    return out


def _task_info(names: list[str]) -> dict:
    return {"human_task": {"kind": "attributes", "attribute_names": list(names)}}


def pa100k(src: Path, opts: BuildOptions) -> Plan:
    from scipy.io import loadmat

    mat = src if src.is_file() else src / "annotation.mat"
    if not mat.is_file():
        raise DataError(f"{src}: no annotation.mat; --format pa100k wants PA-100K's annotation.mat or its folder")
    try:
        ann = loadmat(str(mat))
    except Exception as e:  # scipy raises several types for a bad file
        raise DataError(f"{mat}: unreadable .mat file ({type(e).__name__}: {e})") from None
    if "attributes" not in ann:
        raise DataError(f"{mat}: no 'attributes' in the file; keys: {sorted(k for k in ann if not k.startswith('__'))}")
    names = _strings(ann["attributes"])
    root = Path(opts.image_root) if opts.image_root else next(
        (p for p in (mat.parent / "data", mat.parent / "release_data" / "release_data") if p.is_dir()), mat.parent)
    splits = {}
    for split in PA100K_SPLITS:
        if f"{split}_images_name" not in ann:
            continue
        files = _strings(ann[f"{split}_images_name"])
        labels = np.asarray(ann[f"{split}_label"])
        if labels.shape != (len(files), len(names)):
            raise DataError(f"{mat}: {split}_label is {labels.shape}, want ({len(files)}, {len(names)})")
        splits[split] = [{"key": f"{i:08d}_{sanitize_key(Path(f).stem)}", "path": str(root / f),
                          "attributes": labels[i].astype(int).tolist(), "where": f"{mat}: {split} row {i + 1}"}
                         for i, f in enumerate(files)]
    if not splits:
        raise DataError(f"{mat}: none of {[s + '_images_name' for s in PA100K_SPLITS]} in the file")
    return Plan(splits, encode, None, {"format": "pa100k", "path": str(mat.resolve())}, manifest_extra=_task_info(names))


def table(src: Path, opts: BuildOptions) -> Plan:
    if not src.is_file() or src.suffix.lower() not in (".csv", ".tsv"):
        raise DataError(f"{src}: --format attribute_table wants a .csv or .tsv file")
    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if src.suffix.lower() == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    image_col = opts.image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_col not in columns:
        raise DataError(f"{src}: no image column among {columns}; name it with --image-column")
    listed = LIST_COLUMN in columns
    if listed:
        if not opts.class_names:
            raise DataError(f"{src}: an '{LIST_COLUMN}' column lists names; give the vocabulary with --class-names")
        names = list(opts.class_names)
    else:
        names = [c for c in columns if c not in (image_col, "split")]
        if opts.class_names:
            unknown = [c for c in names if c not in opts.class_names]
            if unknown:
                raise DataError(f"{src}: columns {unknown} are not among --class-names")
            names = [n for n in opts.class_names if n in names]
        if not names:
            raise DataError(f"{src}: no attribute columns besides {image_col!r}")
    index = {n: i for i, n in enumerate(names)}
    root = Path(opts.image_root) if opts.image_root else src.parent
    splits: dict[str, list] = {}
    for n, row in enumerate(rows, 2):  # line numbers: the header is line 1
        split = (row.get("split") or opts.split).strip()
        tasks = splits.setdefault(split, [])
        image = (row.get(image_col) or "").strip()
        task = {"key": f"{len(tasks):08d}_{sanitize_key(str(Path(image).with_suffix('')))}", "path": str(root / image),
                "where": f"{src}:{n}"}
        if not image:
            task["error"] = f"{src}:{n}: no {image_col}"
        elif listed:
            given = [t.strip() for t in re.split(r"[;|]", row.get(LIST_COLUMN) or "") if t.strip()]
            unknown = [t for t in given if t not in index]
            vec = [0] * len(names)
            for t in given:
                if t in index:
                    vec[index[t]] = 1
            task["attributes"] = vec
            if unknown:
                task["error"] = f"{src}:{n}: unknown attribute name(s) {unknown}"
        else:
            raw = {c: (row.get(c) or "").strip().lower() for c in names}
            odd = {c: v for c, v in raw.items() if v not in VALUES}
            task["attributes"] = [VALUES.get(raw[c], -1) for c in names]
            if odd:
                task["error"] = f"{src}:{n}: values {odd} are not 1 / 0 / -1 / empty"
        tasks.append(task)
    return Plan(splits, encode, None, {"format": "attribute_table", "path": str(src.resolve())},
                manifest_extra=_task_info(names))


def encode(task: dict) -> dict:
    ext, data = read_image(task)
    return {ext: data, "json": json_entry({"attributes": task["attributes"]})}
