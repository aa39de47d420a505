"""One raw sample → what a task reads (``Decoder``), a list of them → a batch (``collate``), and which
targets (label, text) a dataset's shards carry (``shard_targets``).

Human-centric shards (``data.human``: UniHCP's pose, parsing, attributes, ReID, detection) are decoded by
``foundation.data.human_transforms``, which augments the targets with the image.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import default_collate

from foundation.config import DataConfig
from foundation.data.human_transforms import HumanDecodeError, collate_targets, decode_human_sample, pad_images
from foundation.data.manifest import is_remote, read_manifest
from foundation.data.tars import Reporter, first_samples
from foundation.data.transforms import build_eval_transform, build_train_transform, decode_image

Tokenizer = Callable[[list[str]], Tensor]


class BadSample(Exception):
    """A sample that cannot be used; the message is the reason reported."""


def _keys(spec: str) -> list[str]:
    return [k.strip().lower() for k in spec.split(";") if k.strip()]


class Decoder:
    """Raw sample → {"image", "image2"?, "label"?, "text"?, "texts"?, "key"}; raises BadSample."""

    def __init__(self, cfg: DataConfig, targets: frozenset[str], train: bool):
        self.cfg = cfg
        self.targets = targets
        self.train = train
        self.image_keys = _keys(cfg.image_key)
        self.label_keys = _keys(cfg.label_key)
        self.text_keys = _keys(cfg.text_key)
        # human-centric samples have their own letterbox (and may name a [height, width] rectangle)
        self.transform = None if cfg.human else build_train_transform(cfg) if train else build_eval_transform(cfg)

    def __call__(self, sample: dict) -> dict:
        if self.cfg.human:  # human-centric targets, augmented with the image (UniHCP)
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


def collate(items: list[dict], tokenizer: Tokenizer | None, eval_fields: bool) -> dict:
    # default_collate stacks straight into shared memory inside a worker: one copy less per batch
    images = [it["image"] for it in items]
    if "targets" in items[0] and any(x.shape != images[0].shape for x in images):  # data.resize: per-image sizes
        batch: dict = {"image": pad_images(images)}
    else:
        batch = {"image": default_collate(images)}
    if "image2" in items[0]:
        batch["image2"] = default_collate([it["image2"] for it in items])
    if "targets" in items[0]:  # data.human
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


def shard_targets(cfg: DataConfig, sources: list[list[str]], split: str) -> frozenset[str]:
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
    manifest = None if is_remote(urls[0]) else read_manifest(urls[0])
    names = {Path(u).name for u in urls}
    for entry in (manifest or {}).get("splits", {}).values():
        if names & {s["name"] for s in entry.get("shards", [])}:
            counts.update(entry.get("keys", {}))
            total += entry.get("samples", 0)
    if not total:
        reporter = Reporter()
        for sample in first_samples(urls[:4], reporter, 32):
            counts.update(k for k in sample if not k.startswith("__"))
            total += 1
    have = set()
    for target, spec in (("label", cfg.label_key), ("text", cfg.text_key)):
        if total and sum(counts.get(k, 0) for k in _keys(spec)) * 2 >= total:
            have.add(target)
    return have


__all__ = ["BadSample", "Decoder", "Tokenizer", "collate", "shard_targets"]
