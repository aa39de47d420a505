"""Stratified, seeded training subsets (a fraction of each class, or K shots per class) as split files.

A split file lists the sample keys it keeps, so a run can be reproduced elsewhere and the same subset
shared between methods and people (``foundation adapt --split-file``). Selection is a pure function of
(sorted keys of each class, seed): the reader's order, workers and machine do not matter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from foundation.data import DataError

SPLIT_FORMAT = "foundation-split/1"


def _class_name(names: list[str] | None, c: int) -> str:
    return f"{names[c]!r} (class {c})" if names and c < len(names) else f"class {c}"


def split_name(fraction: float | None, shots: int | None, seed: int) -> str:
    """``fraction0.1-seed0`` / ``shots5-seed0`` / ``full``: the file stem and the results' label."""
    if shots is not None:
        return f"shots{shots}-seed{seed}"
    if fraction is None or fraction >= 1.0:
        return "full"
    return f"fraction{fraction:g}-seed{seed}"


def make_split(keys: np.ndarray, labels: np.ndarray, *, fraction: float | None = None, shots: int | None = None,
               seed: int = 0, class_names: list[str] | None = None) -> dict:
    """Choose the keys of a stratified subset: ``round(fraction * n_c)`` (half up) or exactly ``shots`` of each class c.

    Raises ``DataError`` naming the class when the subset would leave a class empty (or with fewer than
    ``shots`` samples). ``fraction`` 1 (or neither argument) keeps everything.
    """
    if fraction is not None and shots is not None:
        raise DataError("give --fraction or --shots, not both")
    if fraction is not None and not 0 < fraction <= 1:
        raise DataError(f"--fraction must be in (0, 1], got {fraction}")
    if shots is not None and shots < 1:
        raise DataError(f"--shots must be at least 1, got {shots}")
    keys, labels = np.asarray(keys), np.asarray(labels)
    num_classes = len(class_names) if class_names else int(labels.max()) + 1
    members = [np.sort(keys[labels == c]) for c in range(num_classes)]
    sizes = [len(m) for m in members]
    if shots is not None:
        short = [c for c in range(num_classes) if sizes[c] < shots]
        if short:
            c = min(short, key=lambda c: sizes[c])
            raise DataError(f"--shots {shots}: {_class_name(class_names, c)} has only {sizes[c]} training samples"
                            + (f" ({len(short)} classes have fewer than {shots})" if len(short) > 1 else ""))
        takes = [shots] * num_classes
    elif fraction is None or fraction >= 1:
        takes = sizes
    else:
        takes = [int(np.floor(fraction * n + 0.5)) for n in sizes]  # round half up
        empty = sorted((c for c in range(num_classes) if takes[c] == 0), key=lambda c: sizes[c])
        if empty:
            named = ", ".join(f"{_class_name(class_names, c)[:-1]}, {sizes[c]} training samples)" if class_names
                              else f"class {c} ({sizes[c]} training samples)" for c in empty[:5])
            more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
            smallest = 0.5 / max(1, min(sizes))
            raise DataError(f"--fraction {fraction:g} leaves {len(empty)} class(es) empty: {named}{more}; "
                            f"use --fraction {smallest:.3g} or more, or --shots")
    chosen: list[np.ndarray] = []
    counts: dict[str, int] = {}
    for c in range(num_classes):
        rng = np.random.default_rng([seed, c])
        take = takes[c]
        chosen.append(members[c] if take == sizes[c] else np.sort(rng.choice(members[c], size=take, replace=False)))
        counts[str(c)] = take
    kept = np.sort(np.concatenate(chosen)) if chosen else np.asarray([], dtype=keys.dtype)
    return {"format": SPLIT_FORMAT, "name": split_name(fraction, shots, seed), "fraction": fraction, "shots": shots,
            "seed": seed, "samples": int(len(kept)), "of": int(len(keys)), "class_names": class_names,
            "class_counts": counts, "keys": [str(k) for k in kept]}


def write_split(split: dict, path: str | Path, **about) -> Path:
    """Write a split file (JSON: the subset's definition, what it was drawn from, and its keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in split.items() if k != "keys"} | about | {"keys": split["keys"]}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several ranks (torchrun) may write the same file
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_split(path: str | Path) -> dict:
    """A split file written by ``write_split``; ``DataError`` when it is not one."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"--split-file {path}: unreadable ({e})") from None
    if not isinstance(split, dict) or split.get("format") != SPLIT_FORMAT or not isinstance(split.get("keys"), list):
        raise DataError(f"--split-file {path}: not a {SPLIT_FORMAT} file")
    return split


__all__ = ["SPLIT_FORMAT", "make_split", "read_split", "split_name", "write_split"]
