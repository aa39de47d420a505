"""The evaluation stream (``build_eval_loader``): every sample of a split exactly once across all ranks and
workers, with the evaluation transform; finite and re-iterable."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from foundation.config import DataConfig
from foundation.data.decode import BadSample, Decoder, Tokenizer, collate, shard_targets
from foundation.data.manifest import class_names, resolve_shards
from foundation.data.tars import Reporter, shard_samples
from foundation.data.workers import dies_with_this_process

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
        decoder = Decoder(self.cfg, self.targets, train=False)
        reporter = Reporter()
        reporter.report_shards = by_shard or slot == 0  # when all slots read every shard, one reports them
        skipped = 0
        items: list[dict] = []
        for i, sample in enumerate(shard_samples(urls, reporter)):
            if not by_shard and i % slots != slot:
                continue
            try:
                items.append(decoder(sample))
            except BadSample as e:
                skipped += 1
                reporter.sample(sample, str(e))
            if len(items) == self.batch_size:
                yield {**collate(items, self.tokenizer, eval_fields=True), "_meta": [skipped, reporter.pop()]}
                items, skipped = [], 0
        tail = collate(items, self.tokenizer, eval_fields=True) if items else {}
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
                            prefetch_factor=2 if self._workers > 0 else None, generator=torch.Generator(),
                            worker_init_fn=dies_with_this_process())
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
    stream = _EvalStream(urls, cfg, shard_targets(cfg, sources, split), batch_size=batch_size, rank=rank,
                         world_size=world_size, workers=max(1, cfg.workers), tokenizer=tokenizer)
    return EvalLoader(stream, cfg.workers, class_names(spec))


__all__ = ["EvalLoader", "build_eval_loader"]
