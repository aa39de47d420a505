"""Shards that already exist: webdataset or img2dataset output (jpg/png/webp with txt/json/cls).

The reader takes such shards as they are (give their directory or brace pattern as ``data.train``).
``--format shards`` re-shards them into ``{split}-%06d.tar`` with a manifest (counts, keys, checksums):
images are checked by decoding, unreadable ones, unreadable JSON and non-integer labels are skipped and
reported; all other entries are kept unchanged. Splits come from the source's manifest or
``{split}-*.tar`` names, else the whole source is the split ``--split``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from foundation.data import DataError
from foundation.data.shards import _OUR_SHARD, iter_raw_samples, read_manifest, resolve_shards, shard_members
from foundation.data.sources.base import BuildOptions, Plan, Skip, image_entry, sanitize_key

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def plan(src: Path, opts: BuildOptions) -> Plan:
    spec = str(src)
    manifest = read_manifest(src) if src.is_dir() or src.name == "manifest.json" else None
    if manifest is not None:
        names = sorted(manifest["splits"])
    elif src.is_dir():
        ours = {p.name.rsplit("-", 1)[0] for p in src.glob("*.tar") if _OUR_SHARD.match(p.name)}
        names = sorted(ours) or [opts.split]
    else:
        names = [opts.split]
    splits, totals = {}, {}
    for name in names:
        urls = resolve_shards(spec, name)[0] if manifest or src.is_dir() else resolve_shards(spec)[0]
        if any("://" in u or u.startswith("pipe:") for u in urls):
            raise DataError("--format shards converts local shards; read remote ones directly as data.train")
        splits[name] = urls
        totals[name] = _count(urls)
    class_names = opts.class_names or (manifest or {}).get("class_names")
    return Plan(splits, encode, class_names, {"format": "shards", "path": str(src.resolve())}, expand=tasks,
                totals=totals)


def _count(urls: list[str]) -> int | None:
    try:
        return sum(shard_members(u)[0] for u in urls)
    except Exception:  # an unreadable shard: the progress bar goes without a total
        return None


def tasks(url: str) -> Iterator[dict]:
    """The samples of one source shard as tasks (runs in the pool worker)."""
    for sample in iter_raw_samples(url, "train"):
        entries = {k: v for k, v in sample.items() if not k.startswith("__")}
        task = {"key": sanitize_key(sample["__key__"]), "entries": entries}
        if "cls" in sample:
            try:
                task["label"] = int(sample["cls"].decode().strip())
            except (ValueError, UnicodeDecodeError):
                task["error"] = f"{url}, {sample['__key__']}: label is not an integer"
        yield task


def encode(task: dict) -> dict:
    if "error" in task:
        raise Skip(task["error"])
    entries = dict(task["entries"])
    key = next((k for k in IMAGE_KEYS if k in entries), None)
    if key is None:
        raise Skip(f"{task['key']}: no image entry (jpg/jpeg/png/webp)")
    ext, data = image_entry(entries.pop(key), task["key"])
    if "json" in entries:
        try:
            json.loads(entries["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise Skip(f"{task['key']}: unreadable JSON ({e})") from None
    entries.pop("cls", None)  # written back from task["label"]
    return {ext: data, **entries}
