"""Features of a frozen backbone over a split of shards, extracted once and cached on disk.

The cache key joins the backbone's identity (weights sha256, feature, preprocessing) and the data's
(the manifest's shard checksums for the split; file sizes and modification times without a manifest),
so a second ``foundation adapt`` on the same checkpoint and data reads ``<cache>/<key>.npz`` instead of
running the model. Rows are sorted by sample key: the order never depends on reader workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from foundation.adapt.backbone import Backbone
from foundation.data import DataError
from foundation.data.shards import build_eval_loader, class_names, read_manifest, resolve_shards

log = logging.getLogger(__name__)

CACHE_FORMAT = "foundation-features/1"


@dataclass
class Features:
    """One split's features: ``x`` (N, D) float32, ``y`` (N,) int64 labels, ``keys`` (N,) sample keys, sorted."""

    x: np.ndarray
    y: np.ndarray
    keys: np.ndarray
    class_names: list[str] | None
    cached: bool = False  # read from the cache (no forward pass)
    path: str | None = None
    images_per_s: float | None = None

    def subset(self, keys: list[str] | np.ndarray) -> Features:
        """The rows of ``keys`` (which must all be present)."""
        idx = np.searchsorted(self.keys, np.asarray(keys))
        idx = np.clip(idx, 0, len(self.keys) - 1)
        found = self.keys[idx] == np.asarray(keys)
        if not found.all():
            missing = np.asarray(keys)[~found]
            raise DataError(f"{len(missing)} split keys are not in the data, e.g. {list(missing[:3])}; the split "
                            "file was made for other shards")
        return Features(self.x[idx], self.y[idx], self.keys[idx], self.class_names)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "foundation" / "features"


def data_identity(spec: str, split: str) -> str:
    """A hash of what ``spec``'s ``split`` holds: shard checksums from the manifest, else sizes and mtimes."""
    manifest = read_manifest(spec) if Path(spec).is_dir() or spec.endswith("manifest.json") else None
    entry = (manifest or {}).get("splits", {}).get(split)
    if entry and all("sha256" in s for s in entry["shards"]):
        parts = [(s["name"], s["sha256"]) for s in entry["shards"]]
    else:
        urls = [u for source in resolve_shards(spec, split) for u in source]
        parts = [(str(Path(u).resolve()), *(lambda st: (st.st_size, st.st_mtime_ns))(Path(u).stat())) for u in urls]
    return hashlib.sha256(json.dumps([split, parts]).encode()).hexdigest()


@torch.inference_mode()
def _extract(backbone: Backbone, spec: str, split: str, *, batch_size: int, device: str, workers: int,
             progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    loader = build_eval_loader(spec, backbone.data_config(workers), batch_size=batch_size, split=split)
    module = backbone.module.to(device).eval()
    manifest = read_manifest(spec) if Path(spec).is_dir() or spec.endswith("manifest.json") else None
    total = ((manifest or {}).get("splits", {}).get(split) or {}).get("samples")
    xs, ys, keys = [], [], []
    start = time.perf_counter()
    with tqdm(total=total, desc=f"features {split}", unit="img", disable=not progress, mininterval=1.0,
              dynamic_ncols=True) as bar:
        for batch in loader:
            x = module(batch["image"].to(device, non_blocking=True))  # (B, D)
            xs.append(x.float().flatten(1).cpu().numpy())
            ys.append(batch["label"].numpy())
            keys += batch["key"]
            bar.update(len(batch["key"]))
    seconds = time.perf_counter() - start
    if not keys:
        raise DataError(f"{spec}: split {split!r} gave no usable samples with labels ({loader.skipped} skipped)")
    for line in loader.pop_skip_reports()[:20]:
        log.warning("skipped: %s", line)
    x, y, k = np.concatenate(xs), np.concatenate(ys).astype(np.int64), np.asarray(keys)
    order = np.argsort(k, kind="stable")
    if len(np.unique(k)) != len(k):
        raise DataError(f"{spec}: split {split!r} has duplicate sample keys; keys must identify samples")
    return x[order], y[order], k[order], loader.skipped, len(keys) / seconds


def extract_features(backbone: Backbone, spec: str, split: str, *, cache_dir: str | Path | None = None,
                     batch_size: int = 256, device: str = "cpu", workers: int = 2, progress: bool = True) -> Features:
    """``spec``'s ``split`` through the frozen backbone (eval transform), from the cache when it is there."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{CACHE_FORMAT}|{backbone.identity}|{data_identity(spec, split)}".encode()).hexdigest()[:32]
    path = cache / f"{key}.npz"
    names = class_names(spec)
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            log.info("features of %s/%s: cached %s", spec, split, path)
            return Features(f["x"], f["y"], f["keys"], names, cached=True, path=str(path))
    x, y, k, skipped, rate = _extract(backbone, spec, split, batch_size=batch_size, device=device, workers=workers,
                                      progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.{os.getpid()}.npz"
    np.savez(tmp, x=x, y=y, keys=k)
    os.replace(tmp, path)
    (cache / f"{key}.json").write_text(json.dumps({
        "format": CACHE_FORMAT, "data": spec, "split": split, "samples": len(k), "dim": int(x.shape[1]),
        "skipped": skipped, "backbone": backbone.source, "feature": backbone.feature,
        "preprocessing": backbone.preprocessing}, indent=2) + "\n")
    log.info("features of %s/%s: %d x %d at %.0f img/s -> %s", spec, split, *x.shape, rate, path)
    return Features(x, y, k, names, cached=False, path=str(path), images_per_s=rate)


__all__ = ["Features", "data_identity", "default_cache_dir", "extract_features"]
