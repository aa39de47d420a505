"""Webdataset shards: writing them with a manifest, and reading them for training and evaluation.

Layout of a built dataset directory::

    DIR/train-000000.tar  DIR/train-000001.tar ...  DIR/val-000000.tar ...  DIR/manifest.json

A sample is the group of tar members sharing a key: ``<key>.png`` (or jpg/webp), ``<key>.cls`` (the class
index as text), ``<key>.txt`` (captions, one per line), optionally ``<key>.json``.

Reading (``DataConfig.train`` / ``DataConfig.val``): a brace pattern, a directory, a ``manifest.json``,
or several of these joined with ``::`` (one source each, mixed by ``DataConfig.weights``).

Training stream, per (rank, worker): for each source, shards drawn with replacement by a seeded
``ResampledShards`` → tar samples → seeded shuffle buffer; sources mixed by weight with a seeded
generator. Raw (undecoded) samples are numbered; sample ``i`` is decoded and augmented with random
generators reseeded from ``(seed, rank, worker, i)``, so a batch is a pure function of the stream
position. Each batch carries its worker's raw count, which the main process records: ``position()``
is exact, and a loader given that position skips the consumed raw samples (read, not decoded) and
continues bitwise identically. Bad samples are skipped, counted and reported, never fatal.
"""

from __future__ import annotations

import hashlib
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
POSITION_VERSION = 1
MAX_BAD_RUN = 1000  # this many unusable samples in a row means a wrong setting, not bad input: stop
_OUR_SHARD = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")

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
                   class_names: list[str] | None, source: dict, command: str) -> dict:
    """Merge the new ``splits`` entries into ``manifest`` (or a new one) and write ``manifest.json``."""
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
        self.quiet = False  # while fast-forwarding on resume: those were reported before
        self.report_shards = True
        self.url = ""
        self._bad_urls: set[str] = set()

    def sample(self, sample: dict, reason: str) -> None:
        if not self.quiet:
            self.lines.append(f"{sample.get('__url__', self.url)}, {sample.get('__key__', '-')}, {reason}")

    def shard(self, url: str, reason: str) -> None:
        if url not in self._bad_urls:  # once per shard: resampling revisits it
            self._bad_urls.add(url)
            if self.report_shards and not self.quiet:
                self.lines.append(f"{url}, -, {reason}")

    def handler(self, exn: Exception) -> bool:
        self.shard(self.url, f"unreadable shard: {type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def pop(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def _shard_samples(urls: Iterable[str], reporter: _Reporter, limit: int | None = None) -> Iterator[dict]:
    """Samples of the shards ``urls``: unreadable and empty shards are reported and passed over.

    With ``limit``, more than that many shards in a row without a sample is an error (every shard bad).
    """
    state = {"since": 0, "url_samples": 0, "url": None}

    def check_empty() -> None:
        if state["url"] is not None and state["url_samples"] == 0 and state["url"] not in reporter._bad_urls:
            reporter.shard(state["url"], "empty shard")

    def opened() -> Iterator[dict]:
        for url in urls:
            check_empty()
            if limit is not None and state["since"] >= limit:
                raise DataError(f"no sample could be read from {state['since']} shards in a row (last: {url}); "
                                "check the shards with `foundation data inspect`")
            state.update(since=state["since"] + 1, url_samples=0, url=url)
            reporter.url = url
            yield {"url": url}

    for sample in wds.tarfile_to_samples(handler=reporter.handler)(opened()):
        state.update(since=0, url_samples=state["url_samples"] + 1)
        yield sample
    check_empty()


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
                 offset: int, tokenizer: Tokenizer | None):
        super().__init__()
        self.sources, self.weights, self.cfg, self.targets = sources, weights, cfg, targets
        self.batch_size, self.seed, self.rank, self.workers = batch_size, seed, rank, workers
        self.start, self.skipped, self.offset, self.tokenizer = start, skipped, offset, tokenizer

    def _raw(self, worker: int, reporter: _Reporter) -> Iterator[dict]:
        streams = []
        for i, urls in enumerate(self.sources):
            seed = _seed(self.seed, self.rank, worker, i, 1)
            shards = wds.ResampledShards(urls, seed=seed, worker_seed=_zero, deterministic=True)
            samples = _shard_samples((s["url"] for s in shards), reporter, limit=100 + 10 * len(urls))
            if self.cfg.shuffle_buffer > 1:
                buf = self.cfg.shuffle_buffer
                samples = wds.shuffle(buf, initial=buf, rng=random.Random(_seed(seed, 2)))(samples)
            streams.append(samples)
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(_seed(self.seed, self.rank, worker, 3))
        choices = range(len(streams))
        while True:
            yield next(streams[rng.choices(choices, weights=self.weights)[0]])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.offset) % self.workers
        decoder = _Decoder(self.cfg, self.targets, train=True)
        reporter = _Reporter()
        raw = self._raw(worker, reporter)
        index, skipped = self.start[worker], self.skipped[worker]
        reporter.quiet = True
        for _ in range(index):  # resume: the consumed samples are read again, not decoded
            next(raw)
        reporter.quiet = False
        items: list[dict] = []
        bad_run = 0
        while True:
            with _SavedRNG() if info is None else nullcontext():
                while len(items) < self.batch_size:
                    sample = next(raw)
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
            batch["_meta"] = [worker, index, skipped, reporter.pop()]
            items = []
            yield batch


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
        self._next = position["next_worker"]
        self._batches = position["batches"]
        self._samples = position["samples"]
        self._fixed = {k: position[k] for k in ("seed", "rank", "world_size", "workers", "batch_size")}
        self._epoch_samples = epoch_samples
        self._reports: list[str] = []
        self._loader = DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None, generator=torch.Generator().manual_seed(seed),
        )
        self._it: Iterator | None = None

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self._loader)
        batch = next(self._it)
        worker, raw, skipped, reports = batch.pop("_meta")
        self._raw[worker], self._skipped[worker] = raw, skipped
        self._next = (worker + 1) % self._logical
        self._batches += 1
        self._samples += batch["image"].shape[0]
        self._reports.extend(reports)
        return batch

    def position(self) -> dict:
        """How far batches were consumed (ints, lists and strings only: safe for ``weights_only`` loads)."""
        return {"version": POSITION_VERSION, **self._fixed, "raw": list(self._raw), "skipped": list(self._skipped),
                "next_worker": self._next, "batches": self._batches, "samples": self._samples}

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
                    "samples": 0}
    else:
        _check_position(position, fixed, logical)
    stream = _TrainStream(
        sources, weights, cfg, _targets(cfg, sources, "train"), batch_size=batch_size, seed=seed, rank=rank,
        workers=logical, start=list(position["raw"]), skipped=list(position["skipped"]),
        offset=position["next_worker"], tokenizer=tokenizer,
    )
    return TrainLoader(stream, workers=cfg.workers, seed=seed, position=position,
                       epoch_samples=cfg.epoch_samples or _dataset_size(sources))


def _check_position(position: dict, fixed: dict, logical: int) -> None:
    if not isinstance(position, dict) or position.get("version") != POSITION_VERSION:
        raise DataError(f"data position {position!r} is not one written by this version of TrainLoader.position()")
    changed = [f"{k}={position.get(k)!r} then, {v!r} now" for k, v in fixed.items() if position.get(k) != v]
    if changed:
        raise DataError(
            "the data position was saved with different settings (" + "; ".join(changed) + "); the stream can only "
            "continue exactly with the same ones: restore them, or start the data stream afresh"
        )
    if len(position.get("raw", [])) != logical or len(position.get("skipped", [])) != logical:
        raise DataError(f"data position has {len(position.get('raw', []))} worker counts, expected {logical}")


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
