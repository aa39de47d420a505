"""CrowdHuman ``.odgt`` annotations → pedestrian detection samples: full, visible and head boxes, ignore regions.

SRC is an ``.odgt`` file (one JSON object per line: ``ID``, ``gtboxes``; the split ``--split``) or a
folder holding ``annotation_train.odgt`` / ``annotation_val.odgt`` (splits train / val). Images are
``<image root>/<ID>.jpg`` with the image root ``--image-root``, else ``Images/`` next to the file, else the
file's folder. Each ``gtboxes`` entry has ``tag`` (``person``, or ``mask`` for crowds, reflections and
the like), ``fbox`` (full body, amodal), ``vbox`` (visible part), ``hbox`` (head) and ``extra.ignore``:
a person becomes ``boxes`` / ``visible`` / ``heads``; a ``mask`` or an ignored person becomes an
``ignore`` region (its full box). Boxes are [x, y, w, h] in pixels. A line that is not JSON, a box that is
not four numbers or has a negative size, a missing image: the image is skipped and reported.
"""

from __future__ import annotations

import json
from pathlib import Path

from foundation.data import DataError
from foundation.data.humans import json_entry
from foundation.data.sources.base import BuildOptions, Plan, Skip, read_image, sanitize_key


def _split_of(path: Path, default: str) -> str:
    low = path.stem.lower()
    return "train" if "train" in low else "val" if "val" in low else default


def plan(src: Path, opts: BuildOptions) -> Plan:
    files = sorted(src.glob("*.odgt")) if src.is_dir() else [src]
    if not files or files[0].suffix != ".odgt":
        raise DataError(f"{src}: no .odgt annotation file; --format crowdhuman wants annotation_*.odgt")
    splits: dict[str, list] = {}
    for ann in files:
        root = Path(opts.image_root) if opts.image_root else (
            ann.parent / "Images" if (ann.parent / "Images").is_dir() else ann.parent)
        split = _split_of(ann, opts.split) if src.is_dir() else opts.split
        tasks = splits.setdefault(split, [])
        for n, line in enumerate(ann.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{ann}:{n}"
            try:
                record = json.loads(line)
                image_id = str(record["ID"])
                task = {"key": f"{len(tasks):08d}_{sanitize_key(image_id)}", "where": where,
                        "path": str(root / f"{image_id}.jpg"), "id": image_id, "gtboxes": record.get("gtboxes", [])}
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                task = {"key": f"{len(tasks):08d}_line{n}", "error": f"{where}: unreadable record ({e})"}
            tasks.append(task)
    return Plan(splits, encode, None, {"format": "crowdhuman", "path": str(src.resolve())},
                manifest_extra={"human_task": {"kind": "detection", "class_names": ["person"]}})


def _box(value, what: str, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) != 4 or not all(isinstance(v, (int, float)) for v in value):
        raise Skip(f"{where}: {what} {value!r} is not [x, y, w, h]")
    if value[2] < 0 or value[3] < 0:
        raise Skip(f"{where}: {what} {value} has a negative size")
    return [float(v) for v in value]


def labels_of(gtboxes: list, where: str) -> dict:
    """The sample's ``json`` labels from a record's ``gtboxes``; raises ``Skip`` on a bad box."""
    out = {"boxes": [], "visible": [], "heads": [], "ignore": []}
    for i, g in enumerate(gtboxes):
        if not isinstance(g, dict):
            raise Skip(f"{where}: gtboxes[{i}] is not an object")
        at = f"{where}: gtboxes[{i}]"
        full = _box(g.get("fbox"), "fbox", at)
        ignored = (g.get("extra") or {}).get("ignore", 0) == 1
        if g.get("tag") != "person" or ignored:
            out["ignore"].append(full)
            continue
        out["boxes"].append(full)
        out["visible"].append(_box(g.get("vbox", full), "vbox", at))
        out["heads"].append(_box(g.get("hbox", [0, 0, 0, 0]), "hbox", at))
    return out


def encode(task: dict) -> dict:
    ext, data = read_image(task)
    labels = labels_of(task["gtboxes"], f"{task['where']} ({task['id']})")
    return {ext: data, "json": json_entry({**labels, "id": task["id"]})}
