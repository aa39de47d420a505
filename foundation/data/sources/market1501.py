"""Market-1501 folders (also DukeMTMC-reID, same naming) → ReID samples: image + person id + camera id.

SRC holds ``bounding_box_train/`` (→ split ``train``), ``query/`` (→ ``query``) and
``bounding_box_test/`` (→ ``gallery``). A file name starts with the person id and the camera:
``0002_c1s1_000451_03.jpg`` is id 2 seen by camera 1 (sequence 1, frame 451); Duke's
``0001_c2_f0046182.jpg`` likewise. As the protocol says, gallery ids ``0000`` (distractors: kept, they
are negatives for every query) and ``-1`` (junk: kept with id -1, which the evaluation ignores) stay in the
gallery; in the training set and among queries they are not people to learn or search for, so they are
left out and reported. Training samples also get ``cls``: the index of their id among the sorted training
ids. Names that do not follow the pattern are bad input: skipped and reported.
"""

from __future__ import annotations

import re
from pathlib import Path

from foundation.data import DataError
from foundation.data.humans import json_entry
from foundation.data.sources.base import IMAGE_SUFFIXES, BuildOptions, Plan, read_image, sanitize_key

FOLDERS = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}
NAME = re.compile(r"^(-1|\d+)_c(\d+)(?:s(\d+))?_?f?(\d+)?")


def parse_name(name: str) -> tuple[int, int] | None:
    """(person id, camera id) of a Market-1501 / Duke file name, None when it does not follow the pattern."""
    m = NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def plan(src: Path, opts: BuildOptions) -> Plan:
    if not src.is_dir():
        raise DataError(f"{src}: not a directory; --format market1501 wants bounding_box_train/, query/, "
                        "bounding_box_test/")
    present = {folder: split for folder, split in FOLDERS.items() if (src / folder).is_dir()}
    if not present:
        raise DataError(f"{src}: none of {sorted(FOLDERS)} found; --format market1501 wants Market-1501's folders")
    found = {split: sorted(p for p in (src / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
             for folder, split in present.items()}
    train_ids = sorted({ids[0] for p in found.get("train", []) if (ids := parse_name(p.name)) and ids[0] > 0})
    index = {pid: i for i, pid in enumerate(train_ids)}
    splits = {}
    for split, paths in found.items():
        tasks = []
        for p in paths:
            task = {"key": f"{len(tasks):08d}_{sanitize_key(p.stem)}", "path": str(p), "split": split}
            ids = parse_name(p.name)
            if ids is None:
                task["error"] = f"{p}: not a Market-1501 name (<id>_c<camera>...)"
            else:
                task["pid"], task["camid"] = ids
                if split != "gallery" and ids[0] <= 0:
                    task["error"] = f"{p}: id {ids[0]} ({'junk' if ids[0] < 0 else 'distractor'}) only belongs in the gallery"
                elif split == "train":
                    task["label"] = index[ids[0]]
            tasks.append(task)
        splits[split] = tasks
    num_ids = {split: len({t["pid"] for t in tasks if t.get("pid", 0) > 0}) for split, tasks in splits.items()}
    return Plan(splits, encode, None, {"format": "market1501", "path": str(src.resolve())},
                manifest_extra={"human_task": {"kind": "reid", "num_ids": num_ids, "train_ids": train_ids}})


def encode(task: dict) -> dict:
    ext, data = read_image(task)
    return {ext: data, "json": json_entry({"pid": task["pid"], "camid": task["camid"], "split": task["split"],
                                           "source": Path(task["path"]).name})}
