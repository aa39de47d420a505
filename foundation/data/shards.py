"""Webdataset shards: writing them with a manifest, and reading them for training and evaluation.

Layout of a built dataset directory::

    DIR/train-000000.tar  DIR/train-000001.tar ...  DIR/val-000000.tar ...  DIR/manifest.json

A sample is the group of tar members sharing a key: ``<key>.png`` (or jpg/webp), ``<key>.cls`` (the class
index as text), ``<key>.txt`` (captions, one per line), optionally ``<key>.json``.

Reading (``DataConfig.train`` / ``DataConfig.val``): a brace pattern, a directory, a ``manifest.json``,
or several of these joined with ``::`` (one source each, mixed by ``DataConfig.weights``).

Training stream, per (rank, worker): for each source, shards drawn with replacement (draw ``d`` is
shard ``h(seed, d) mod n``) → tar samples → a shuffle buffer whose ``p``-th pick takes slot
``h(seed, p) mod size``; sources mixed by weight, raw sample ``i`` from source ``h(seed, i)``. Raw
(undecoded) samples are numbered; sample ``i`` is decoded and augmented with random generators reseeded
from ``(seed, rank, worker, i)``, so a batch is a pure function of the stream position.

That position is small and explicit: per worker the raw count, and per source the shard draw, the
sample offset inside that shard, the pick count and the buffer's contents as references (draw, offset).
Each batch carries its worker's position, which the main process records: ``position()`` is exact,
and a loader given it reopens the current shard at its offset (passing earlier members by their tar
headers) and re-reads the buffered samples from the few shards they came from: resuming costs the
same at step 100 and at step 100,000, and continues bitwise identically. Bad samples are skipped,
counted and reported, never fatal.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import itertools
import json
import logging
import random
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from foundation.config import DataConfig
from foundation.data import DataError
from foundation.data.transforms import build_eval_transform, build_train_transform, decode_image

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "foundation-shards/1"
POSITION_VERSION = 2
MAX_BAD_RUN = 1000  # this many unusable samples in a row means a wrong setting, not bad input: stop
_OUR_SHARD = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split of a member name into key and extension
_META_MEMBER = re.compile(r"__[^/]*__($|/)")

Tokenizer = Callable[[list[str]], Tensor]


# --------------------------------------------------------------------------------------------------
# locating shards and manifests


def _is_remote(url: str) -> bool:
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
        if part and not _is_remote(part):
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
    if _is_remote(part):
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
        if any(_OUR_SHARD.match(s.name) for s in every) or (d / MANIFEST).is_file():
            raise DataError(f"{d} has no {split!r} shards ({split}-*.tar); build that split with --split {split}")
        shards = every
    if not shards:
        raise DataError(f"{d}: no .tar shards in this directory; build them with `foundation data build ... --out {d}`")
    return [str(s) for s in shards]


# --------------------------------------------------------------------------------------------------
# writing


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
        part.update(samples=count, bytes=part["path"].stat().st_size, sha256=_sha256(part["path"]))

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# raw samples


def iter_raw_samples(spec: str, split: str = "val") -> Iterator[dict]:
    """Every sample of every source of ``spec`` once, in shard order, undecoded:
    ``{"__key__", "__url__", ext: bytes, ...}``. Unreadable shards are logged and skipped."""
    for urls in resolve_shards(spec, split):
        for url in urls:
            yield from wds.tarfile_to_samples(handler=_log_and_continue)(iter([{"url": url}]))


def _log_and_continue(exn: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s", exn)
    return True


def _zero() -> int:
    return 0


class _Reporter:
    """Collects "shard url, key, reason" lines in one worker; also the webdataset error handler."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.report_shards = True
        self.url = ""
        self._bad_urls: set[str] = set()

    def sample(self, sample: dict, reason: str) -> None:
        self.lines.append(f"{sample.get('__url__', self.url)}, {sample.get('__key__', '-')}, {reason}")

    def shard(self, url: str, reason: str) -> None:
        if url not in self._bad_urls:  # once per shard: resampling revisits it
            self._bad_urls.add(url)
            if self.report_shards:
                self.lines.append(f"{url}, -, {reason}")

    def handler(self, exn: Exception) -> bool:
        self.shard(self.url, f"unreadable shard: {type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def pop(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def _shard_samples(urls: Iterable[str], reporter: _Reporter) -> Iterator[dict]:
    """Samples of the shards ``urls``: unreadable and empty shards are reported and passed over."""
    state = {"url_samples": 0, "url": None}

    def check_empty() -> None:
        if state["url"] is not None and state["url_samples"] == 0 and state["url"] not in reporter._bad_urls:
            reporter.shard(state["url"], "empty shard")

    def opened() -> Iterator[dict]:
        for url in urls:
            check_empty()
            state.update(url_samples=0, url=url)
            reporter.url = url
            yield {"url": url}

    for sample in wds.tarfile_to_samples(handler=reporter.handler)(opened()):
        state["url_samples"] += 1
        yield sample
    check_empty()


class _TarMembers:
    """The regular members of a tar stream, read sequentially: ustar, GNU long names and pax paths.

    ``tarfile`` parses every header into a ``TarInfo`` (~25 us a member), more than decoding a small
    image costs; this reads the three fields the reader needs. Iterating gives ``(name, size)``; call
    ``read()`` for the member's bytes, otherwise they are passed over (a seek when the file allows it).
    Damaged archives raise ``tarfile.ReadError``. ``start``: the byte offset the file is at (a header);
    ``start_of_member`` is where the headers of the member last yielded begin.
    """

    def __init__(self, f, seekable: bool, start: int = 0):
        self.f, self.seekable = f, seekable
        self._pending = 0  # bytes of the current member (and its padding) not consumed yet
        self._size = 0
        self.pos = self.start_of_member = start

    def read(self) -> bytes:
        data = self._exact(self._size)
        self._pending -= self._size
        self._size = 0
        return data

    def __iter__(self) -> Iterator[tuple[str, int]]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        chain = self.pos
        while True:
            self._skip(self._pending)
            self._pending = self._size = 0
            if long_name is None and not pax:
                chain = self.pos
            hdr = self.f.read(512)
            if len(hdr) < 512 or not hdr.strip(b"\0"):
                if hdr.strip(b"\0"):
                    raise tarfile.ReadError("unexpected end of data in a tar header")
                return
            self.pos += 512
            try:
                checksum = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                checksum = -1
            if checksum != sum(hdr) - sum(hdr[148:156]) + 256:
                raise tarfile.ReadError("invalid tar header (bad checksum): not a tar file, or damaged")
            size, kind = _tar_number(hdr[124:136]), hdr[156:157]
            if "size" in pax:
                size = int(pax["size"])
            padded = (size + 511) & ~511
            if kind in (b"x", b"L", b"g", b"K"):  # pax / GNU headers describing the next member
                data = self._exact(size)
                self._skip(padded - size)
                if kind == b"x":
                    pax = _pax_records(data)
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = pax.get("path") or long_name or _ustar_name(hdr)
            long_name, pax = None, {}
            self._pending = padded
            if kind in (b"0", b"\0", b"7"):
                self._size = size
                self.start_of_member = chain
                yield name, size

    def _exact(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) < n:
            raise tarfile.ReadError("unexpected end of data")
        self.pos += n
        return data

    def _skip(self, n: int) -> None:
        self.pos += n
        if n and self.seekable:
            self.f.seek(n, 1)
        while n > 0 and not self.seekable:
            chunk = self.f.read(min(n, 1 << 20))
            if not chunk:
                raise tarfile.ReadError("unexpected end of data")
            n -= len(chunk)


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256 (GNU, for sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _ustar_name(hdr: bytes) -> str:
    name = hdr[:100].split(b"\0", 1)[0]
    if hdr[257:263] == b"ustar\0":  # POSIX ustar: a prefix field may hold the leading directories
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        length_end = data.index(b" ", pos)
        length = int(data[pos:length_end])
        key, _, value = data[length_end + 1: pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _open_shard(url: str):
    """(file, seekable) of a local or remote shard; gzip-compressed local shards are detected by their
    first bytes, remote ones by a ``.gz`` / ``.tgz`` name."""
    if _is_remote(url):
        f = wds.gopen(url)
        return (gzip.GzipFile(fileobj=f), False) if url.endswith((".gz", ".tgz")) else (f, False)
    f = open(url, "rb")
    if f.read(2) == b"\x1f\x8b":
        f.seek(0)
        return gzip.GzipFile(fileobj=f), False
    f.seek(0)
    return f, True


def _tar_samples(url: str, start: int = 0, wanted: set[int] | None = None, at: int = 0,
                 at_ordinal: int = 0) -> Iterator[tuple[int, int, dict]]:
    """``(ordinal, byte offset, sample)`` for the samples of one shard from ordinal ``start`` on (or only
    those in ``wanted``), grouped by key as webdataset groups them. ``at``: the byte offset where sample
    ``at_ordinal`` begins (from an earlier read of a local, uncompressed shard: a seek goes there). Members
    of other earlier samples are passed over by their headers: a seek in a local file, a read without
    decoding in a stream. The byte offset is -1 where it cannot be sought to. Unreadable data raises;
    the sample it interrupted is dropped."""
    last = max(wanted) if wanted else None
    f, seekable = _open_shard(url)
    with f:
        if not seekable or at <= 0:
            at, at_ordinal = 0, 0
        if at:
            f.seek(at)
        members = _TarMembers(f, seekable, at)
        ordinal, key, sample, sample_at = at_ordinal - 1, None, None, -1
        for name, _ in members:
            match = _MEMBER.match(name)
            if match is None or _META_MEMBER.match(name):
                continue
            prefix, ext = match.groups()
            if prefix != key:
                if sample is not None:
                    yield ordinal, sample_at, sample
                key, ordinal = prefix, ordinal + 1
                if last is not None and ordinal > last:
                    return
                keep = ordinal >= start if wanted is None else ordinal in wanted
                sample = {"__key__": prefix, "__url__": url} if keep else None
                sample_at = members.start_of_member if seekable else -1
            if sample is not None:
                sample[ext.lower()] = members.read()
        if sample is not None:
            yield ordinal, sample_at, sample


def _fresh_source_state() -> dict:
    return {"draw": 0, "offset": 0, "at": -1, "picks": 0, "buffer": [], "buffer_offsets": [], "buffer_at": []}


class _Source:
    """One source's raw samples in one (rank, worker): shards drawn with replacement, a shuffle buffer.

    The state is ``draw`` (how many shards were drawn before the current one), ``offset`` (samples of it
    read), ``at`` (the byte offset of the last of them, -1 when unknown), ``picks`` (samples taken from the
    buffer) and the buffer as (draw, offset, byte offset) references: shard draw ``d`` is
    ``urls[h(seed, d) mod n]`` and pick ``p`` takes slot ``h(seed, p) mod len(buffer)``, so a saved state
    reopens without reading anything that came before it; in local shards a seek finds each sample.
    """

    def __init__(self, urls: list[str], seed: int, bufsize: int, reporter: _Reporter, state: dict | None = None):
        self.urls, self.seed, self.bufsize, self.reporter = urls, seed, max(1, bufsize), reporter
        self.limit = 100 + 10 * len(urls)  # this many shards in a row without a sample: every shard is bad
        state = state or _fresh_source_state()
        self.draw, self.offset, self.picks = int(state["draw"]), int(state["offset"]), int(state["picks"])
        self.at = int(state.get("at", -1))
        self.buffer: list[tuple[int, int, int, dict]] = []
        self._open: Iterator[tuple[int, dict]] | None = None
        self._url = ""
        self._read_here = 0
        self._since = 0
        if state["buffer"]:
            self._refill(list(state["buffer"]), list(state["buffer_offsets"]),
                         list(state.get("buffer_at") or [-1] * len(state["buffer"])))

    def shard_url(self, draw: int) -> str:
        return self.urls[_seed(self.seed, 0, draw) % len(self.urls)]

    def state(self) -> dict:
        return {"draw": self.draw, "offset": self.offset, "at": self.at, "picks": self.picks,
                "buffer": [b[0] for b in self.buffer], "buffer_offsets": [b[1] for b in self.buffer],
                "buffer_at": [b[2] for b in self.buffer]}

    def next(self) -> dict:
        if self.bufsize == 1:
            return self._read()[3]
        while len(self.buffer) < self.bufsize:
            self.buffer.append(self._read())
        k = _seed(self.seed, 1, self.picks) % len(self.buffer)
        self.picks += 1
        item = self.buffer[k]
        self.buffer[k] = self.buffer[-1]
        self.buffer.pop()
        return item[3]

    def _read(self) -> tuple[int, int, int, dict]:
        while True:
            if self._open is None:
                if self._since >= self.limit:
                    raise DataError(f"no sample could be read from {self._since} shards in a row (last: {self._url}); "
                                    "check the shards with `foundation data inspect`")
                self._url = self.reporter.url = self.shard_url(self.draw)
                at = self.at if self.offset > 0 else -1  # seek to the last sample read, pass over it
                self._open = _tar_samples(self._url, self.offset, at=at, at_ordinal=self.offset - 1)
                self._read_here = 0
            failed = False
            try:
                item = next(self._open, None)
            except Exception as e:  # tarfile, gzip and transport errors have many types
                failed, item = True, None
                self.reporter.shard(self._url, f"unreadable shard: {type(e).__name__}: {e.args[0] if e.args else e}")
            if item is None:
                if self._read_here == 0:
                    self._since += 1
                    if not failed and self.offset == 0:
                        self.reporter.shard(self._url, "empty shard")
                self.draw, self.offset, self.at, self._open = self.draw + 1, 0, -1, None
                continue
            self._since = 0
            self._read_here += 1
            ordinal, self.at, sample = item
            self.offset = ordinal + 1
            return self.draw, ordinal, self.at, sample

    def _refill(self, draws: list[int], offsets: list[int], ats: list[int]) -> None:
        """Read the buffered samples of a saved state again, from the shards they came from: by a seek
        where the byte offset is known, else by passing over the shard's headers up to them."""
        wanted: dict[str, set[int]] = {}
        found: dict[tuple[str, int], dict] = {}
        for d, o, at in zip(draws, offsets, ats, strict=True):
            url = self.shard_url(d)
            if at >= 0 and (url, o) not in found:
                try:
                    got = next(_tar_samples(url, o, at=at, at_ordinal=o), None)
                except Exception:
                    got = None
                if got is not None and got[0] == o:
                    found[(url, o)] = got[2]
                    continue
            wanted.setdefault(url, set()).add(o)
        for url, ordinals in wanted.items():
            try:
                found.update(((url, o), s) for o, _, s in _tar_samples(url, wanted=ordinals))
            except Exception as e:
                raise DataError(f"{url}: cannot re-read the samples of the saved data position ({type(e).__name__}: "
                                f"{e}); restore the shards, or start the data stream afresh") from None
            if any((url, o) not in found for o in ordinals):
                raise DataError(f"{url} has fewer samples than when the data position was saved; the shards changed: "
                                "restore them, or start the data stream afresh")
        self.buffer = [(d, o, at, found[(self.shard_url(d), o)]) for d, o, at in zip(draws, offsets, ats, strict=True)]


# --------------------------------------------------------------------------------------------------
# decoding one sample


class BadSample(Exception):
    """A sample that cannot be used; the message is the reason reported."""


def _keys(spec: str) -> list[str]:
    return [k.strip().lower() for k in spec.split(";") if k.strip()]


class _Decoder:
    """Raw sample → {"image", "image2"?, "label"?, "text"?, "texts"?, "key"}; raises BadSample."""

    def __init__(self, cfg: DataConfig, targets: frozenset[str], train: bool):
        self.cfg = cfg
        self.targets = targets
        self.train = train
        self.image_keys = _keys(cfg.image_key)
        self.label_keys = _keys(cfg.label_key)
        self.text_keys = _keys(cfg.text_key)
        self.transform = build_train_transform(cfg) if train else build_eval_transform(cfg)

    def __call__(self, sample: dict) -> dict:
        if self.cfg.human:  # human-centric targets, augmented with the image (UniHCP)
            from foundation.data.human_transforms import HumanDecodeError, decode_human_sample

            try:
                return decode_human_sample(sample, self.cfg, self.train)
            except HumanDecodeError as e:
                raise BadSample(str(e)) from None
        data = _first(sample, self.image_keys)
        if data is None:
            raise BadSample(f"no image (looked for {self.cfg.image_key})")
        out: dict = {"key": sample.get("__key__", "")}
        if "json" in sample:
            try:
                json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError) as e:
                raise BadSample(f"unreadable JSON: {e}") from None
        if "label" in self.targets:
            raw = _first(sample, self.label_keys)
            if raw is None:
                raise BadSample(f"missing label ({self.cfg.label_key})")
            try:
                out["label"] = int(raw.decode().strip())
            except (ValueError, UnicodeDecodeError):
                raise BadSample(f"label is not an integer: {raw[:20]!r}") from None
        if "text" in self.targets:
            raw = _first(sample, self.text_keys)
            try:
                lines = [s.strip() for s in raw.decode("utf-8").splitlines() if s.strip()] if raw is not None else []
            except UnicodeDecodeError:
                raise BadSample("caption is not UTF-8") from None
            if not lines:
                raise BadSample(f"missing caption ({self.cfg.text_key})")
            out["texts"] = lines
            out["text"] = random.choice(lines) if self.train else lines[0]
        try:
            img = decode_image(data, self.cfg.in_chans)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
            raise BadSample(f"corrupt image: {type(e).__name__}: {e}") from None
        out["image"] = self.transform(img)
        if self.train and self.cfg.two_view:
            out["image2"] = self.transform(img)
        return out


def _first(sample: dict, keys: list[str]) -> bytes | None:
    for k in keys:
        if k in sample:
            return sample[k]
    return None


def _collate(items: list[dict], tokenizer: Tokenizer | None, eval_fields: bool) -> dict:
    # default_collate stacks straight into shared memory inside a worker: one copy less per batch
    batch: dict = {"image": default_collate([it["image"] for it in items])}
    if "image2" in items[0]:
        batch["image2"] = default_collate([it["image2"] for it in items])
    if "targets" in items[0]:  # data.human
        from foundation.data.human_transforms import collate_targets

        batch["targets"] = collate_targets([it["targets"] for it in items])
    if "label" in items[0]:
        batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    if "text" in items[0]:
        batch["text"] = [it["text"] for it in items]
        if tokenizer is not None:
            batch["tokens"] = tokenizer(batch["text"])
        if eval_fields:
            batch["texts"] = [it["texts"] for it in items]
    if eval_fields:
        batch["key"] = [it["key"] for it in items]
    return batch


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python runs."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") >> 1


def _reseed(seed: int) -> None:
    """Seed the generators timm/torchvision transforms draw from (random, numpy, torch CPU)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    torch.default_generator.manual_seed(seed)


class _SavedRNG:
    """Keeps the main process's random state intact around decoding when there are no workers."""

    def __enter__(self) -> None:
        self.state = random.getstate(), np.random.get_state(), torch.get_rng_state()

    def __exit__(self, *exc) -> None:
        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        torch.set_rng_state(self.state[2])


# --------------------------------------------------------------------------------------------------
# which targets the shards carry


def _targets(cfg: DataConfig, sources: list[list[str]], split: str) -> frozenset[str]:
    """cfg.targets, else the targets every source has (manifest key counts, else its first samples)."""
    if cfg.targets is not None:
        return frozenset(cfg.targets)
    found = None
    for urls in sources:
        have = _source_targets(cfg, urls, split)
        found = have if found is None else found & have
    return frozenset(found or ())


def _source_targets(cfg: DataConfig, urls: list[str], split: str) -> set[str]:
    counts: Counter = Counter()
    total = 0
    manifest = None if _is_remote(urls[0]) else read_manifest(urls[0])
    names = {Path(u).name for u in urls}
    for entry in (manifest or {}).get("splits", {}).values():
        if names & {s["name"] for s in entry.get("shards", [])}:
            counts.update(entry.get("keys", {}))
            total += entry.get("samples", 0)
    if not total:
        reporter = _Reporter()
        for sample in _first_samples(urls[:4], reporter, 32):
            counts.update(k for k in sample if not k.startswith("__"))
            total += 1
    have = set()
    for target, spec in (("label", cfg.label_key), ("text", cfg.text_key)):
        if total and sum(counts.get(k, 0) for k in _keys(spec)) * 2 >= total:
            have.add(target)
    return have


def _first_samples(urls: list[str], reporter: _Reporter, n: int) -> Iterator[dict]:
    for i, sample in enumerate(_shard_samples(urls, reporter)):
        if i >= n:
            return
        yield sample


def _dataset_size(sources: list[list[str]]) -> int | None:
    total = 0
    for urls in sources:
        manifest = None if _is_remote(urls[0]) else read_manifest(urls[0])
        by_name = {s["name"]: s["samples"] for e in (manifest or {}).get("splits", {}).values() for s in e["shards"]}
        if not all(Path(u).name in by_name for u in urls):
            return None
        total += sum(by_name[Path(u).name] for u in urls)
    return total


# --------------------------------------------------------------------------------------------------
# training stream


class _TrainStream(IterableDataset):
    """Infinite batches of one rank; each DataLoader worker runs one logical worker's stream."""

    def __init__(self, sources: list[list[str]], weights: list[float], cfg: DataConfig, targets: frozenset[str], *,
                 batch_size: int, seed: int, rank: int, workers: int, start: list[int], skipped: list[int],
                 states: list[list[dict]], offset: int, tokenizer: Tokenizer | None):
        super().__init__()
        self.sources, self.weights, self.cfg, self.targets = sources, weights, cfg, targets
        self.batch_size, self.seed, self.rank, self.workers = batch_size, seed, rank, workers
        self.start, self.skipped, self.offset, self.tokenizer = start, skipped, offset, tokenizer
        self.states = states
        self._cumulative = list(itertools.accumulate(weights))

    def _pick(self, worker: int, index: int) -> int:
        """The source of raw sample ``index``: drawn by weight from ``h(seed, rank, worker, index)``."""
        x = _seed(self.seed, self.rank, worker, 3, index) / 2.0**63 * self._cumulative[-1]
        return min(bisect.bisect_right(self._cumulative, x), len(self._cumulative) - 1)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.offset) % self.workers
        decoder = _Decoder(self.cfg, self.targets, train=True)
        reporter = _Reporter()
        states = self.states[worker]
        sources = [_Source(urls, _seed(self.seed, self.rank, worker, i, 1), self.cfg.shuffle_buffer, reporter, state)
                   for i, (urls, state) in enumerate(zip(self.sources, states, strict=True))]
        index, skipped = self.start[worker], self.skipped[worker]
        items: list[dict] = []
        bad_run = 0
        while True:
            with _SavedRNG() if info is None else nullcontext():
                while len(items) < self.batch_size:
                    sample = sources[self._pick(worker, index) if len(sources) > 1 else 0].next()
                    _reseed(_seed(self.seed, self.rank, worker, index))
                    index += 1
                    try:
                        items.append(decoder(sample))
                        bad_run = 0
                    except BadSample as e:
                        skipped += 1
                        bad_run += 1
                        reporter.sample(sample, str(e))
                        if bad_run >= MAX_BAD_RUN:
                            raise DataError(
                                f"the last {bad_run} samples were all unusable (last: {reporter.lines[-1]}); check "
                                "data.targets and data.*_key against `foundation data inspect`"
                            ) from None
                batch = _collate(items, self.tokenizer, eval_fields=False)
                if "label" in batch and info is not None:
                    # every tensor a worker sends costs a file-descriptor hand-over; 64 ints travel cheaper as a list
                    batch["label"] = batch["label"].tolist()
            batch["_meta"] = [worker, index, skipped, reporter.pop(), [src.state() for src in sources]]
            items = []
            yield batch


def _as_is(batch: dict) -> dict:
    return batch


class TrainLoader:
    """Infinite iterator of training batches of one rank, with an exact, resumable position.

    A batch: ``image`` (B, C, H, W) float, ``image2`` with ``two_view``, ``label`` (B,) long when the
    shards carry labels, ``text`` (one caption per sample, a random line of its ``txt``) and ``tokens``
    when a tokenizer is given.
    """

    def __init__(self, stream: _TrainStream, *, workers: int, seed: int, position: dict, epoch_samples: int | None):
        self._stream = stream
        self._workers = workers
        self._logical = stream.workers
        self._raw = list(stream.start)
        self._skipped = list(stream.skipped)
        self._states = [list(s) for s in stream.states]
        self._next = position["next_worker"]
        self._batches = position["batches"]
        self._samples = position["samples"]
        self._fixed = {k: position[k] for k in ("seed", "rank", "world_size", "workers", "batch_size")}
        self._epoch_samples = epoch_samples
        self._reports: list[str] = []
        self._loader = DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None, generator=torch.Generator().manual_seed(seed),
            collate_fn=_as_is,  # batches are made in the stream; default_convert would walk every int of _meta
        )
        self._it: Iterator | None = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self._loader)
        batch = next(self._it)
        worker, raw, skipped, reports, states = batch.pop("_meta")
        if isinstance(batch.get("label"), list):
            batch["label"] = torch.tensor(batch["label"], dtype=torch.long)
        self._raw[worker], self._skipped[worker], self._states[worker] = raw, skipped, states
        self._next = (worker + 1) % self._logical
        self._batches += 1
        self._samples += batch["image"].shape[0]
        self._reports.extend(reports)
        return batch

    def position(self) -> dict:
        """How far batches were consumed (ints, lists and strings only: safe for ``weights_only`` loads)."""
        return {"version": POSITION_VERSION, **self._fixed, "raw": list(self._raw), "skipped": list(self._skipped),
                "streams": [[dict(src) for src in w] for w in self._states], "next_worker": self._next,
                "batches": self._batches, "samples": self._samples}

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far on this rank, including those counted before a resume."""
        return sum(self._skipped)

    def pop_skip_reports(self) -> list[str]:
        """``"shard url, key, reason"`` for each bad sample or shard since the last call."""
        reports, self._reports = self._reports, []
        return reports

    @property
    def samples_seen(self) -> int:
        return self._samples

    def epoch(self) -> float | None:
        """Samples seen by all ranks / epoch length (``data.epoch_samples`` or the manifest count)."""
        if not self._epoch_samples:
            return None
        return self._samples * self._fixed["world_size"] / self._epoch_samples

    def close(self) -> None:
        """Stop the worker processes."""
        self._it = None


def build_train_loader(cfg: DataConfig, *, batch_size: int, seed: int, rank: int, world_size: int,
                       position: dict | None = None, tokenizer: Tokenizer | None = None) -> TrainLoader:
    """The infinite, resumable training stream of ``cfg.train`` for one rank (see the module docstring).

    ``position`` is ``loader.position()`` of an earlier loader with the same seed, rank, world size,
    workers and batch size: the new loader yields exactly the batches the old one would have yielded next.
    """
    if not cfg.train:
        raise DataError("data.train is not set; point it at a directory, manifest.json or brace pattern of shards")
    sources = resolve_shards(cfg.train, "train")
    weights = list(cfg.weights) if cfg.weights else [1.0] * len(sources)
    if len(weights) != len(sources) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"data.weights {weights}: give one weight >= 0 per source ({len(sources)}), not all 0")
    logical = max(1, cfg.workers)
    fixed = {"seed": seed, "rank": rank, "world_size": world_size, "workers": cfg.workers, "batch_size": batch_size}
    if position is None:
        position = {**fixed, "raw": [0] * logical, "skipped": [0] * logical, "next_worker": 0, "batches": 0,
                    "samples": 0, "streams": [[_fresh_source_state() for _ in sources] for _ in range(logical)]}
    else:
        _check_position(position, fixed, logical, len(sources))
    stream = _TrainStream(
        sources, weights, cfg, _targets(cfg, sources, "train"), batch_size=batch_size, seed=seed, rank=rank,
        workers=logical, start=list(position["raw"]), skipped=list(position["skipped"]),
        states=[list(w) for w in position["streams"]], offset=position["next_worker"], tokenizer=tokenizer,
    )
    return TrainLoader(stream, workers=cfg.workers, seed=seed, position=position,
                       epoch_samples=cfg.epoch_samples or _dataset_size(sources))


def _check_position(position: dict, fixed: dict, logical: int, n_sources: int) -> None:
    version = position.get("version") if isinstance(position, dict) else None
    if version == 1:
        raise DataError(
            "the data position was saved by an older reader (position version 1, which resumed by replaying every "
            "sample) whose stream this reader cannot continue exactly; resume with train.resume_data=restart to "
            "start the data stream afresh (weights, optimizer and step still resume)"
        )
    if version != POSITION_VERSION:
        raise DataError(f"data position {position!r} is not one written by this version of TrainLoader.position()")
    changed = [f"{k}={position.get(k)!r} then, {v!r} now" for k, v in fixed.items() if position.get(k) != v]
    if changed:
        raise DataError(
            "the data position was saved with different settings (" + "; ".join(changed) + "); the stream can only "
            "continue exactly with the same ones: restore them, or start the data stream afresh"
        )
    if len(position.get("raw", [])) != logical or len(position.get("skipped", [])) != logical:
        raise DataError(f"data position has {len(position.get('raw', []))} worker counts, expected {logical}")
    streams = position.get("streams", [])
    if len(streams) != logical or any(len(w) != n_sources for w in streams):
        raise DataError(f"data position has {[len(w) for w in streams]} source states per worker; this data.train has "
                        f"{n_sources} source(s) and data.workers gives {logical} workers: the shard spec changed")


# --------------------------------------------------------------------------------------------------
# evaluation stream


class _EvalStream(IterableDataset):
    """Finite batches: each (rank, worker) slot reads its share, every sample once across all slots."""

    def __init__(self, urls: list[str], cfg: DataConfig, targets: frozenset[str], *, batch_size: int, rank: int,
                 world_size: int, workers: int, tokenizer: Tokenizer | None):
        super().__init__()
        self.urls, self.cfg, self.targets, self.batch_size = urls, cfg, targets, batch_size
        self.rank, self.world_size, self.workers, self.tokenizer = rank, world_size, workers, tokenizer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slots = self.world_size * self.workers
        slot = self.rank * self.workers + (info.id if info else 0)
        by_shard = len(self.urls) >= slots  # whole shards per slot; else every slot reads all, keeps i % slots
        urls = self.urls[slot::slots] if by_shard else self.urls
        decoder = _Decoder(self.cfg, self.targets, train=False)
        reporter = _Reporter()
        reporter.report_shards = by_shard or slot == 0  # when all slots read every shard, one reports them
        skipped = 0
        items: list[dict] = []
        for i, sample in enumerate(_shard_samples(urls, reporter)):
            if not by_shard and i % slots != slot:
                continue
            try:
                items.append(decoder(sample))
            except BadSample as e:
                skipped += 1
                reporter.sample(sample, str(e))
            if len(items) == self.batch_size:
                yield {**_collate(items, self.tokenizer, eval_fields=True), "_meta": [skipped, reporter.pop()]}
                items, skipped = [], 0
        tail = _collate(items, self.tokenizer, eval_fields=True) if items else {}
        if items or skipped or reporter.lines:
            yield {**tail, "_meta": [skipped, reporter.pop()]}


class EvalLoader:
    """Finite, re-iterable evaluation batches (the training batch dict plus ``key`` and all ``texts``).

    ``skipped`` and ``pop_skip_reports()`` cover the current (or last) pass; ``class_names`` come from
    the shards' manifest (None without one).
    """

    def __init__(self, stream: _EvalStream, workers: int, class_names: list[str] | None = None):
        self.class_names = class_names
        self._stream = stream
        self._workers = workers
        self.skipped = 0
        self._reports: list[str] = []

    def __iter__(self) -> Iterator[dict]:
        self.skipped = 0
        loader = DataLoader(self._stream, batch_size=None, num_workers=self._workers,
                            prefetch_factor=2 if self._workers > 0 else None, generator=torch.Generator())
        for batch in loader:
            skipped, reports = batch.pop("_meta")
            self.skipped += skipped
            self._reports.extend(reports)
            if batch:
                yield batch

    def pop_skip_reports(self) -> list[str]:
        reports, self._reports = self._reports, []
        return reports


def build_eval_loader(spec: str, cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1,
                      split: str = "val", tokenizer: Tokenizer | None = None) -> EvalLoader:
    """Every sample of ``spec``'s ``split`` exactly once across all ranks and workers, eval transform."""
    sources = resolve_shards(spec, split)
    urls = [u for source in sources for u in source]
    stream = _EvalStream(urls, cfg, _targets(cfg, sources, split), batch_size=batch_size, rank=rank,
                         world_size=world_size, workers=max(1, cfg.workers), tokenizer=tokenizer)
    return EvalLoader(stream, cfg.workers, class_names(spec))


# --------------------------------------------------------------------------------------------------
# inspection


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


__all__ = [
    "BadSample", "EvalLoader", "MANIFEST", "TrainLoader", "build_eval_loader", "build_train_loader", "class_names",
    "iter_raw_samples", "prepare_output", "read_manifest", "resolve_shards", "shard_members",
    "split_entry", "write_manifest", "write_parts", "write_split",
]
