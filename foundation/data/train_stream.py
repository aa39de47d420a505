"""The training stream of one rank and its exact position (``build_train_loader``, ``TrainLoader.position``).

Per (rank, worker): for each source, shards drawn with replacement (draw ``d`` is shard ``h(seed, d) mod n``)
→ tar samples → a shuffle buffer whose ``p``-th pick takes slot ``h(seed, p) mod size``; sources mixed by
weight, raw sample ``i`` from source ``h(seed, i)``. Raw (undecoded) samples are numbered; sample ``i`` is
decoded and augmented with random generators reseeded from ``(seed, rank, worker, i)``, so a batch is a pure
function of the stream position.

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
import hashlib
import itertools
import random
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from foundation.config import DataConfig
from foundation.data import DataError
from foundation.data.decode import BadSample, Decoder, Tokenizer, collate, shard_targets
from foundation.data.manifest import is_remote, read_manifest, resolve_shards
from foundation.data.workers import dies_with_this_process
from foundation.data.tars import Reporter, tar_samples

POSITION_VERSION = 2
MAX_BAD_RUN = 1000  # this many unusable samples in a row means a wrong setting, not bad input: stop


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

    def __init__(self, urls: list[str], seed: int, bufsize: int, reporter: Reporter, state: dict | None = None):
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
                self._open = tar_samples(self._url, self.offset, at=at, at_ordinal=self.offset - 1)
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
                    got = next(tar_samples(url, o, at=at, at_ordinal=o), None)
                except Exception:
                    got = None
                if got is not None and got[0] == o:
                    found[(url, o)] = got[2]
                    continue
            wanted.setdefault(url, set()).add(o)
        for url, ordinals in wanted.items():
            try:
                found.update(((url, o), s) for o, _, s in tar_samples(url, wanted=ordinals))
            except Exception as e:
                raise DataError(f"{url}: cannot re-read the samples of the saved data position ({type(e).__name__}: "
                                f"{e}); restore the shards, or start the data stream afresh") from None
            if any((url, o) not in found for o in ordinals):
                raise DataError(f"{url} has fewer samples than when the data position was saved; the shards changed: "
                                "restore them, or start the data stream afresh")
        self.buffer = [(d, o, at, found[(self.shard_url(d), o)]) for d, o, at in zip(draws, offsets, ats, strict=True)]


def _dataset_size(sources: list[list[str]]) -> int | None:
    total = 0
    for urls in sources:
        manifest = None if is_remote(urls[0]) else read_manifest(urls[0])
        by_name = {s["name"]: s["samples"] for e in (manifest or {}).get("splits", {}).values() for s in e["shards"]}
        if not all(Path(u).name in by_name for u in urls):
            return None
        total += sum(by_name[Path(u).name] for u in urls)
    return total


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
        decoder = Decoder(self.cfg, self.targets, train=True)
        reporter = Reporter()
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
                batch = collate(items, self.tokenizer, eval_fields=False)
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
            worker_init_fn=dies_with_this_process(),
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
        sources, weights, cfg, shard_targets(cfg, sources, "train"), batch_size=batch_size, seed=seed, rank=rank,
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


__all__ = ["POSITION_VERSION", "TrainLoader", "build_train_loader"]
