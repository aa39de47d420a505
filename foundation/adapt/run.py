"""One adaptation run: a checkpoint, a dataset, methods × training subsets × seeds → results JSON.

``Adaptation`` holds what several methods and subsets share (the loaded backbone, the cached features,
the training split's keys and labels), so ``foundation adapt --method linear knn --fraction 0.1`` and a
suite cell extract features once. Each (method, subset) is a *cell*; its JSON holds every seed's figures
and their mean and standard deviation.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foundation.adapt.backbone import Backbone, load_backbone
from foundation.adapt.features import Features, data_identity, extract_features
from foundation.adapt.finetune import FinetuneOptions, FinetuneSource, finetune
from foundation.adapt.knn import knn_classify
from foundation.adapt.probe import linear_probe
from foundation.adapt.splits import make_split, read_split, split_name, write_split
from foundation.adapt.zeroshot import zeroshot_cell
from foundation.data import DataError
from foundation.data.shards import class_names as manifest_class_names
from foundation.data.shards import iter_raw_samples

log = logging.getLogger(__name__)

# scratch: the from-scratch baseline (no init); zeroshot: a dual encoder's class prompts (no training subset)
METHODS = ("linear", "knn", "finetune", "scratch", "zeroshot")


@dataclass
class AdaptOptions:
    """Settings shared by every cell of a run (CLI flags of the same names)."""

    feature: str = "pooled"
    weights: str | None = None
    image_size: int | None = None
    batch_size: int = 256
    device: str = "cpu"
    workers: int = 2
    cache_dir: str | None = None
    k: int = 20
    temperature: float = 0.07
    holdout: float = 0.2  # linear probe: part of each class of the subset held out to choose the weight decay
    probe_lr: float = 0.1  # linear probe: AdamW lr, epochs, batch (CLIP_benchmark's defaults)
    probe_epochs: int = 10
    probe_batch_size: int = 64
    train_split: str = "train"
    val_split: str = "val"
    progress: bool = True
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)


def _summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class Adaptation:
    """A checkpoint and a dataset; ``cell(method, fraction, shots, seeds)`` runs one result."""

    def __init__(self, checkpoint: str, data: str, out_dir: str | Path, opts: AdaptOptions):
        self.checkpoint, self.data, self.out, self.opts = checkpoint, data, Path(out_dir), opts
        self._backbone: Backbone | None = None
        self._features: dict[str, Features] = {}
        self._index: tuple[np.ndarray, np.ndarray] | None = None
        self.class_names = manifest_class_names(data)

    # --- shared, loaded on first use ----------------------------------------------------------------
    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            o = self.opts
            self._backbone = load_backbone(self.checkpoint, feature=o.feature, weights=o.weights,
                                           image_size=o.image_size)
        return self._backbone

    def features(self, split: str) -> Features:
        if split not in self._features:
            o = self.opts
            self._features[split] = extract_features(self.backbone, self.data, split, cache_dir=o.cache_dir,
                                                     batch_size=o.batch_size, device=o.device, workers=o.workers,
                                                     progress=o.progress)
        return self._features[split]

    def train_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted keys and labels of the training split: the extracted features' (samples that decoded), else read
        from the shards without decoding images."""
        if self._index is None:
            if self.opts.train_split in self._features:
                f = self._features[self.opts.train_split]
                self._index = (f.keys, f.y)
            else:
                keys, labels = [], []
                for s in iter_raw_samples(self.data, self.opts.train_split):
                    raw = s.get("cls")
                    try:
                        label = int(raw.decode().strip()) if raw is not None else None
                    except ValueError:
                        label = None
                    if label is not None:
                        keys.append(s["__key__"])
                        labels.append(label)
                if not keys:
                    raise DataError(f"{self.data}: split {self.opts.train_split!r} has no labelled samples (cls)")
                k = np.asarray(keys)
                order = np.argsort(k, kind="stable")
                self._index = (k[order], np.asarray(labels, dtype=np.int64)[order])
        return self._index

    def finetune_source(self) -> FinetuneSource:
        """What ``--method finetune`` / ``scratch`` starts from: this checkpoint's backbone and this data."""
        o, backbone = self.opts, self.backbone
        # num_classes: the manifest's class names, else the largest training label + 1 (not read when the
        # backbone cannot be fine-tuned: generate_recipe refuses it)
        num_classes = (len(self.class_names) if self.class_names else
                       int(self.train_index()[1].max()) + 1 if backbone.finetune is not None else 0)
        return FinetuneSource(self.checkpoint, backbone, self.data, self.class_names, num_classes, o.finetune,
                              workers=o.workers, device=o.device, progress=o.progress)

    # --- subsets ---------------------------------------------------------------------------------------
    def split(self, fraction: float | None, shots: int | None, seed: int, split_file: str | None = None) -> dict:
        """The training subset (its keys), written as a split file under ``<out>/splits/``."""
        if split_file:
            split = read_split(split_file)
            split["file"] = str(split_file)
            return split
        keys, labels = self.train_index()
        split = make_split(keys, labels, fraction=fraction, shots=shots, seed=seed, class_names=self.class_names)
        path = self.out / "splits" / f"{split['name']}.json"
        write_split(split, path, data=self.data, data_identity=data_identity(self.data, self.opts.train_split),
                    source_split=self.opts.train_split)
        split["file"] = str(path)
        return split

    # --- one result ----------------------------------------------------------------------------------
    def cell(self, method: str, *, fraction: float | None = None, shots: int | None = None, seeds: int = 1,
             split_file: str | None = None) -> dict:
        """Run ``method`` on the subset for each seed; returns (and writes) the cell's JSON."""
        if method not in METHODS:
            raise DataError(f"unknown method {method!r}; choose from {list(METHODS)}")
        if method == "zeroshot":
            return zeroshot_cell(self)
        full = shots is None and (fraction is None or fraction >= 1) and not split_file
        # a full split is the same for every seed: linear/knn would repeat the same figure
        n_seeds = 1 if (full and method in ("linear", "knn")) or split_file else seeds
        if method in ("linear", "knn"):
            self.features(self.opts.train_split)  # subsets are then drawn from the samples that decoded
        runs = []
        for seed in range(n_seeds):
            split = self.split(fraction, shots, seed, split_file)
            seed = int(split.get("seed") or 0) if split_file else seed  # a shared split reproduces its run
            if method in ("finetune", "scratch"):
                result = finetune(self.finetune_source(), split, seed, self.out / method / split["name"],
                                  scratch=method == "scratch")
            else:
                train, val = self.features(self.opts.train_split), self.features(self.opts.val_split)
                sub = train.subset(split["keys"])
                if method == "linear":
                    o = self.opts
                    result = linear_probe(sub.x, sub.y, val.x, val.y, holdout=o.holdout, seed=seed, lr=o.probe_lr,
                                          epochs=o.probe_epochs, batch_size=o.probe_batch_size, device=o.device)
                else:
                    result = knn_classify(sub.x, sub.y, val.x, val.y, k=self.opts.k, temperature=self.opts.temperature)
                result["features_cached"] = {"train": train.cached, "val": val.cached}
            runs.append({"seed": seed, "split": split["name"], "split_file": split["file"], **result})
        top1_mean, top1_std = _summarise([r["top1"] for r in runs])
        cell = {
            "checkpoint": self.checkpoint, "data": self.data, "method": method,
            "feature": self.opts.feature if method in ("linear", "knn") else None,
            "fraction": 1.0 if full else fraction, "shots": shots, "seeds": n_seeds,
            "top1": top1_mean, "top1_std": top1_std, "top5": _summarise([r["top5"] for r in runs])[0],
            "mean_per_class_recall": (_summarise([r["mean_per_class_recall"] for r in runs])[0]
                                      if all("mean_per_class_recall" in r for r in runs) else None),
            "train_samples": runs[0]["train_samples"], "runs": runs,
        }
        name = f"{method}_{split_name(cell['fraction'] if not split_file else None, shots, 0).rsplit('-seed', 1)[0]}"
        if split_file:
            name = f"{method}_{Path(split_file).stem}"
        path = self.out / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell, indent=2) + "\n")
        cell["file"] = str(path)
        log.info("%s %s: top-1 %.2f ± %.2f (%d seed(s), %d training samples) -> %s", method, name, top1_mean,
                 top1_std, n_seeds, cell["train_samples"], path)
        return cell


__all__ = ["AdaptOptions", "Adaptation", "FinetuneOptions", "METHODS"]
