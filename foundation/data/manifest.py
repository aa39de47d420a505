"""A built dataset on disk: where its shards are (``resolve_shards``), what its manifest says, and writing
both (``write_split`` / ``write_manifest``).

Layout of a built dataset directory::

    DIR/train-000000.tar  DIR/train-000001.tar ...  DIR/val-000000.tar ...  DIR/manifest.json

A sample is the group of tar members sharing a key: ``<key>.png`` (or jpg/webp), ``<key>.cls`` (the class
index as text), ``<key>.txt`` (captions, one per line), optionally ``<key>.json``.

A shard spec (``DataConfig.train`` / ``DataConfig.val``) is a brace pattern, a directory, a ``manifest.json``,
or several of these joined with ``::`` (one source each, mixed by ``DataConfig.weights``).
"""

from __future__ import annotations

import json
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import webdataset as wds
from braceexpand import braceexpand

from foundation.data import DataError
from foundation.trust import sha256_of

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "foundation-shards/1"
OUR_SHARD = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")  # the names write_split gives


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def read_manifest(path_or_dir: str | Path) -> dict | None:
    """The manifest of a dataset: a ``manifest.json`` path, a dataset directory, or a shard path or
    pattern whose directory holds one. None when there is none."""
    p = Path(path_or_dir).expanduser()
    if p.is_dir():
        p = p / MANIFEST
    elif p.name != MANIFEST:
        p = p.parent / MANIFEST
    if not p.is_file():
        return None
    try:
        manifest = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: unreadable manifest ({e}); rebuild with `foundation data build --overwrite`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{p}: not a foundation manifest (no 'splits'); rebuild it with `foundation data build`")
    return manifest


def class_names(spec: str) -> list[str] | None:
    """Class names from the manifest of the first source of ``spec`` that has them."""
    for part in spec.split("::"):
        part = part.strip()
        if part and not is_remote(part):
            manifest = read_manifest(part.split("{")[0] if "{" in part else part)
            if manifest and manifest.get("class_names"):
                return list(manifest["class_names"])
    return None


def resolve_shards(spec: str, split: str = "train") -> list[list[str]]:
    """Shard URLs of each ``::``-separated source of ``spec``.

    A source is a brace pattern (``d/train-{000000..000009}.tar``), a directory (its ``{split}-*.tar``, or
    all its ``*.tar`` when it holds no shards named after splits), a ``manifest.json`` (its split's
    shards), or a remote URL (``https://``, ``s3://``, ``pipe:``; not checked). A local path that does
    not exist raises ``DataError`` naming it.
    """
    if not spec or not spec.strip():
        raise DataError("empty shard spec; give a directory, a manifest.json or a brace pattern of .tar files")
    return [_resolve_source(part.strip(), split) for part in spec.split("::")]


def _resolve_source(part: str, split: str) -> list[str]:
    if not part:
        raise DataError("empty source between '::' separators in the shard spec")
    if is_remote(part):
        return list(braceexpand(part))
    p = Path(part).expanduser()
    if p.is_dir():
        return _directory_shards(p, split)
    if p.name == MANIFEST or p.suffix == ".json":
        manifest = read_manifest(p) if p.is_file() else None
        if manifest is None:
            raise DataError(f"manifest not found: {p}; build it with `foundation data build ... --out {p.parent}`")
        info = manifest["splits"].get(split)
        if not info or not info.get("shards"):
            raise DataError(
                f"{p} has no {split!r} split (it has {sorted(manifest['splits'])}); build it with --split {split}"
            )
        urls = [str(p.parent / s["name"]) for s in info["shards"]]
    else:
        urls = list(braceexpand(str(p)))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
        raise DataError(f"shard not found: {missing[0]}{more}; check the path or build with `foundation data build`")
    return urls


def _directory_shards(d: Path, split: str) -> list[str]:
    shards = sorted(d.glob(f"{split}-*.tar"))
    if not shards:
        every = sorted(d.glob("*.tar"))
        if any(OUR_SHARD.match(s.name) for s in every) or (d / MANIFEST).is_file():
            raise DataError(f"{d} has no {split!r} shards ({split}-*.tar); build that split with --split {split}")
        shards = every
    if not shards:
        raise DataError(f"{d}: no .tar shards in this directory; build them with `foundation data build ... --out {d}`")
    return [str(s) for s in shards]


def prepare_output(out_dir: str | Path, splits: Iterable[str], overwrite: bool) -> dict | None:
    """Check that ``splits`` can be written into ``out_dir``; with ``overwrite`` remove their old shards.

    Returns the existing manifest (other splits are kept) or None. Raises ``DataError`` when a split
    already exists and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    for split in splits:
        old = sorted(out.glob(f"{split}-*.tar"))
        listed = manifest is not None and split in manifest["splits"]
        if (old or listed) and not overwrite:
            raise DataError(f"{out} already has a {split!r} split; pass --overwrite to replace it, or another --out")
        for f in old + sorted(out.glob(f".{split}-*.tar.tmp")):
            f.unlink()
        if listed:
            del manifest["splits"][split]
    if manifest is None and any(out.glob("*.tar")) and not overwrite:
        raise DataError(f"{out} holds .tar files without a manifest; pass --overwrite or choose another --out")
    return manifest


def write_parts(samples: Iterable[dict], path_for: Callable[[int], Path], *, max_count: int = 10_000,
                max_bytes: int = 10**9) -> list[dict]:
    """Write ``samples`` (``{"__key__": str, ext: bytes}``) into tar files ``path_for(0)``, ``path_for(1)``, ...

    A file is closed after ``max_count`` samples or once it holds ``max_bytes``. Tar member times are 0,
    so the same samples give byte-identical files. Returns per file: path, samples, bytes, sha256, key
    counts and label (``cls``) counts.
    """
    parts: list[dict] = []
    writer = None
    count = size = 0

    def close() -> None:
        writer.close()
        part = parts[-1]
        part.update(samples=count, bytes=part["path"].stat().st_size, sha256=sha256_of([part["path"]]))

    for sample in samples:
        if writer is None or count >= max_count or size >= max_bytes:
            if writer is not None:
                close()
            parts.append({"path": path_for(len(parts)), "keys": Counter(), "labels": Counter()})
            writer = wds.TarWriter(str(parts[-1]["path"]), encoder=False, mtime=0)
            count = size = 0
        size += writer.write(sample)
        count += 1
        parts[-1]["keys"].update(k for k in sample if not k.startswith("_"))
        if "cls" in sample:
            parts[-1]["labels"][int(sample["cls"])] += 1
    if writer is not None:
        close()
    return parts


def split_entry(parts: list[dict]) -> dict:
    """The manifest entry of a split written as ``parts`` (from ``write_parts``), in order."""
    keys: Counter = Counter()
    labels: Counter = Counter()
    for p in parts:
        keys.update(p["keys"])
        labels.update(p["labels"])
    shards = [{"name": Path(p["path"]).name, "samples": p["samples"], "bytes": p["bytes"], "sha256": p["sha256"]}
              for p in parts]
    entry = {"samples": sum(s["samples"] for s in shards), "shards": shards, "keys": dict(sorted(keys.items()))}
    if labels:
        entry["class_counts"] = {str(k): v for k, v in sorted(labels.items())}
    return entry


def write_split(out_dir: str | Path, split: str, samples: Iterable[dict], *, max_count: int = 10_000,
                max_bytes: int = 10**9) -> dict:
    """Write ``samples`` to ``{split}-%06d.tar`` shards in ``out_dir``; returns the split's manifest entry."""
    out = Path(out_dir)
    parts = write_parts(samples, lambda i: out / f"{split}-{i:06d}.tar", max_count=max_count, max_bytes=max_bytes)
    return split_entry(parts)


def write_manifest(out_dir: str | Path, manifest: dict | None, splits: dict[str, dict], *,
                   class_names: list[str] | None, source: dict, command: str, extra: dict | None = None) -> dict:
    """Merge the new ``splits`` entries into ``manifest`` (or a new one) and write ``manifest.json``.

    ``extra``: further top-level fields (e.g. ``human_task`` with keypoint or attribute names)."""
    if manifest and manifest.get("splits") and manifest.get("class_names") != class_names:
        kept = sorted(manifest["splits"])
        raise DataError(
            f"{out_dir}: class names differ from those of the split(s) {kept} already there; "
            "rebuild all splits together with --overwrite, or choose another --out"
        )
    manifest = manifest or {"splits": {}}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, entry in splits.items():
        manifest["splits"][name] = {**entry, "source": source, "command": command, "created": now}
    manifest.update(extra or {})
    manifest.update(format=MANIFEST_FORMAT, class_names=class_names, source=source, command=command, created=now)
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)
    return manifest


def shard_members(url: str) -> tuple[int, Counter]:
    """(samples, key counts) of one local shard, reading tar headers only."""
    keys: Counter = Counter()
    samples = set()
    with tarfile.open(url, "r:") as tar:
        for member in tar:
            if member.isreg() and "." in Path(member.name).name:
                key, _, ext = member.name.partition(".")
                samples.add(key)
                keys[ext.lower()] += 1
    return len(samples), keys


__all__ = ["MANIFEST", "MANIFEST_FORMAT", "OUR_SHARD", "class_names", "is_remote", "prepare_output", "read_manifest", "resolve_shards", "shard_members", "split_entry", "write_manifest", "write_parts", "write_split"]
