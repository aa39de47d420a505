"""A CSV, TSV or JSONL table with an image-path column and caption and/or label columns.

Column names are configurable (``--image-column``, ``--caption-column``, ``--label-column``); unset, the
first present of the usual names is used. Image paths are relative to ``--image-root`` (default: the
table's folder). Rows naming the same image are merged: their captions become the lines of one ``txt``.
A JSONL caption may be a list of captions. Labels are integers, or class names (indexed in sorted order,
or by ``--class-names``). Unreadable rows, missing images and empty captions are skipped and reported.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from foundation.data import DataError
from foundation.data.sources.base import BuildOptions, Plan, Skip, read_image, sanitize_key

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path", "filename", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "title")
LABEL_COLUMNS = ("label", "class", "cls", "category")


def _rows(src: Path) -> list[dict | str]:
    """Rows as dicts; a row that cannot be parsed is an error string."""
    suffix = src.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows: list[dict | str] = []
        for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(row if isinstance(row, dict) else f"{src}:{n}: not a JSON object")
            except json.JSONDecodeError as e:
                rows.append(f"{src}:{n}: unreadable JSON ({e})")
        return rows
    if suffix not in (".csv", ".tsv"):
        raise DataError(f"{src}: --format table reads .csv, .tsv or .jsonl files")
    with open(src, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))


def _column(given: str | None, usual: tuple[str, ...], columns: set[str], what: str, src: Path) -> str | None:
    if given:
        if given not in columns:
            raise DataError(f"{src}: no {what} column {given!r}; the columns are {sorted(columns)}")
        return given
    return next((c for c in usual if c in columns), None)


def _captions(value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [line.strip() for v in values if v is not None for line in str(v).splitlines() if line.strip()]


def plan(src: Path, opts: BuildOptions) -> Plan:
    if not src.is_file():
        raise DataError(f"{src}: not a file; --format table wants a .csv, .tsv or .jsonl file")
    rows = _rows(src)
    columns = {k for r in rows if isinstance(r, dict) for k in r}
    image_col = _column(opts.image_column, IMAGE_COLUMNS, columns, "image", src)
    if image_col is None:
        raise DataError(f"{src}: no image column among {sorted(columns)}; name it with --image-column")
    caption_col = _column(opts.caption_column, CAPTION_COLUMNS, columns, "caption", src)
    label_col = _column(opts.label_column, LABEL_COLUMNS, columns, "label", src)
    if caption_col is None and label_col is None:
        raise DataError(f"{src}: no caption or label column among {sorted(columns)}; name one with "
                        "--caption-column or --label-column")
    root = Path(opts.image_root) if opts.image_root else src.parent

    raw_labels = [r.get(label_col) for r in rows if isinstance(r, dict)] if label_col else []
    names = opts.class_names
    if label_col and names is None and not all(_is_int(v) for v in raw_labels if v not in (None, "")):
        names = sorted({str(v) for v in raw_labels if v not in (None, "")})
    index = {n: i for i, n in enumerate(names or [])}

    tasks: list[dict] = []
    by_image: dict[str, dict] = {}
    for n, row in enumerate(rows):
        if isinstance(row, str):
            tasks.append({"key": f"{len(tasks):08d}_row{n}", "error": row})
            continue
        image = row.get(image_col)
        if not image:
            tasks.append({"key": f"{len(tasks):08d}_row{n}", "error": f"{src}: row {n + 1} has no {image_col}"})
            continue
        task = by_image.get(str(image))
        if task is None:
            key = f"{len(tasks):08d}_{sanitize_key(str(Path(str(image)).with_suffix('')))}"
            task = by_image[str(image)] = {"key": key, "path": str(root / str(image))}
            tasks.append(task)
        if caption_col:
            task.setdefault("captions", []).extend(_captions(row.get(caption_col)))
        if label_col:
            label = _label(row.get(label_col), index)
            if label is None or task.get("label", label) != label:
                task["error"] = f"{src}: row {n + 1}: label {row.get(label_col)!r} is missing, unknown or conflicting"
            task["label"] = label
    return Plan({opts.split: tasks}, encode, names, {"format": "table", "path": str(src.resolve()),
                                                     "columns": [image_col, caption_col, label_col]})


def _is_int(v) -> bool:
    try:
        return int(str(v)) == float(str(v))
    except ValueError:
        return False


def _label(value, index: dict[str, int]) -> int | None:
    if value in (None, ""):
        return None
    if index:
        return index.get(str(value))
    return int(str(value)) if _is_int(value) else None


def encode(task: dict) -> dict:
    if "captions" in task and not task["captions"] and "error" not in task:
        raise Skip(f"{task['path']}: empty caption")
    ext, data = read_image(task)
    entries = {ext: data}
    if "captions" in task:
        entries["txt"] = "\n".join(task["captions"]).encode()
    return entries
