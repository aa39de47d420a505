"""``foundation adapt --suite FILE``: datasets x methods x (fractions, K shots) for one checkpoint, into one table.

Every (dataset, method, fraction or K shots) is a cell run by ``Adaptation.cell`` and written as its own JSON
under ``<out>/cells/<dataset>/``; K-shot cells run ``shot_seeds`` subsets (ELEVATER: 5 / 20 / 50 shots x 3
seeds, mean ± std); a dual encoder's zero-shot classification (``zeroshot: true``) and a from-scratch baseline
trained on 100% of each dataset (INTERN's comparison) are one more cell each per dataset. A cell whose JSON exists (same checkpoint, seeds and settings) is read, not
recomputed, so a killed suite resumes where it stopped. A fraction that leaves a class of a dataset
empty is recorded as that cell's error and shown in the table; the other cells still run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from foundation.adapt.backbone import FEATURES
from foundation.adapt.report import write_table
from foundation.adapt.run import AdaptOptions, Adaptation
from foundation.config import RecipeError, format_errors, read_yaml
from foundation.data import DataError

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuiteFinetune(_Strict):
    """Fine-tuning (and from-scratch) runs of the suite; fields as the ``--steps`` ... flags."""

    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    optimizer: str = "adamw"
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float | None = Field(None, gt=0, le=1)
    freeze: list[str] = []
    warmup_steps: int = Field(0, ge=0)
    scratch_steps: int | None = Field(None, gt=0)  # the from-scratch baseline's steps (None: steps)
    scratch_lr: float | None = Field(None, gt=0)  # (None: lr)
    overrides: list[str] = []  # dotted recipe overrides for every run, e.g. train.precision=bf16


class Suite(_Strict):
    """A suite file (``recipes/adapt/*.yaml``)."""

    name: str
    checkpoint: str  # any kind `foundation adapt --checkpoint` takes (`--checkpoint` on the command line wins)
    weights: str | None = None  # for checkpoint timm:NAME
    datasets: dict[str, str]  # name -> shards with train and val splits (directory or manifest.json)
    methods: list[Literal["linear", "knn", "finetune"]] = ["linear", "knn"]
    fractions: list[float] = [0.01, 0.1, 1.0]
    seeds: int = Field(1, ge=1)  # subsets per fraction (a full split runs once for linear / k-NN)
    shots: list[int] = []  # K-shot subsets per class, e.g. ELEVATER's [5, 20, 50]
    shot_seeds: int = Field(3, ge=1)  # subsets per K (ELEVATER: seeds 0, 1, 2)
    zeroshot: bool = False  # zero-shot classification of a dual encoder (clip / declip run) on each val split
    scratch: bool = True  # the from-scratch baseline on 100% of each dataset
    feature: Literal[FEATURES] = "pooled"  # type: ignore[valid-type]
    image_size: int | None = Field(None, gt=0)
    out: str | None = None  # default runs/adapt/<name>
    cache: str | None = None  # feature cache (default ~/.cache/foundation/features)
    workers: int = Field(2, ge=0)
    batch_size: int = Field(256, gt=0)
    k: int = Field(20, gt=0)
    temperature: float = Field(0.07, gt=0)
    holdout: float = Field(0.2, gt=0, lt=1)  # linear probe: part of each class held out to choose the weight decay
    probe_lr: float = Field(0.1, gt=0)  # linear probe (CLIP_benchmark's defaults): AdamW lr, epochs, batch size
    probe_epochs: int = Field(10, gt=0)
    probe_batch_size: int = Field(64, gt=0)
    finetune: SuiteFinetune = Field(default_factory=SuiteFinetune)
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "foundation"


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    raw = read_yaml(path, "adaptation suite")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(format_errors(e, str(path), Suite, "adaptation suite")) from None
    bad = [f for f in suite.fractions if not 0 < f <= 1]
    if bad:
        raise RecipeError(f"{path}: fractions must be in (0, 1], got {bad}")
    if any(k < 1 for k in suite.shots):
        raise RecipeError(f"{path}: shots must be at least 1, got {suite.shots}")
    return suite


def _settings_key(suite: Suite, opts: AdaptOptions, method: str, seeds: int) -> str:
    """What a cell's figure depends on besides (dataset, method, subset): a changed setting reruns the cell."""
    parts = {"checkpoint": suite.checkpoint, "weights": suite.weights, "seeds": seeds}
    if method == "zeroshot":
        parts = {"checkpoint": suite.checkpoint, "image_size": opts.image_size, "zeroshot": 1}
    elif method in ("linear", "knn"):
        parts |= {"feature": opts.feature, "image_size": opts.image_size}
        parts |= {"k": opts.k, "T": opts.temperature} if method == "knn" else {
            "probe": [2, opts.holdout, opts.probe_lr, opts.probe_epochs, opts.probe_batch_size]}  # 2: wd search
    else:
        parts |= {"finetune": dataclasses.asdict(opts.finetune)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _options(suite: Suite, base: AdaptOptions, scratch: bool = False) -> AdaptOptions:
    f = suite.finetune
    ft = dataclasses.replace(
        base.finetune, steps=(f.scratch_steps or f.steps) if scratch else f.steps, batch_size=f.batch_size,
        lr=(f.scratch_lr or f.lr) if scratch else f.lr, optimizer=f.optimizer, weight_decay=f.weight_decay,
        layer_decay=f.layer_decay, freeze=list(f.freeze), warmup_steps=f.warmup_steps, wandb=suite.wandb,
        overrides=[*f.overrides, *base.finetune.overrides])
    return dataclasses.replace(base, feature=suite.feature, weights=suite.weights, image_size=suite.image_size,
                               batch_size=suite.batch_size, workers=suite.workers, cache_dir=suite.cache,
                               k=suite.k, temperature=suite.temperature, holdout=suite.holdout,
                               probe_lr=suite.probe_lr, probe_epochs=suite.probe_epochs,
                               probe_batch_size=suite.probe_batch_size, finetune=ft)


def run_suite(path: str | Path, base: AdaptOptions, out: str | None = None, checkpoint: str | None = None) -> dict:
    """Run (or resume) every cell of the suite; write and return the table."""
    suite = load_suite(path)
    if checkpoint:
        suite = suite.model_copy(update={"checkpoint": checkpoint})
    root = Path(out or suite.out or Path("runs") / "adapt" / suite.name)
    for name, data in suite.datasets.items():
        if not Path(data).exists():
            raise DataError(f"suite dataset {name!r}: {data} not found (see docs/adaptation.md for the command that "
                            "builds it)")
    cells = []
    for name, data in suite.datasets.items():
        # (method, fraction, shots, seeds, cell file stem)
        plan = ([("zeroshot", None, 0, 1, "zeroshot")] if suite.zeroshot else []) + [
            (m, f, None, suite.seeds, f"{m}_{'full' if f >= 1 else f'fraction{f:g}'}")
            for m in suite.methods for f in suite.fractions] + [
            (m, None, k, suite.shot_seeds, f"{m}_shots{k}") for m in suite.methods for k in suite.shots] + (
            [("scratch", 1.0, None, suite.seeds, "scratch_full")] if suite.scratch else [])
        adaptations: dict[bool, Adaptation] = {}
        for method, fraction, shots, seeds, stem in plan:
            scratch = method == "scratch"
            opts = _options(suite, base, scratch)
            key = _settings_key(suite, opts, method, seeds)
            path_ = root / "cells" / name / f"{stem}.json"
            if path_.is_file():
                done = json.loads(path_.read_text())
                if done.get("settings") == key:
                    log.info("suite %s: %s %s done (%s)", suite.name, name, stem, path_)
                    cells.append({**done, "dataset": name, "file": str(path_), "reused": True})
                    continue
            if scratch not in adaptations:
                adaptations[scratch] = Adaptation(suite.checkpoint, data, root / "cells" / name, opts)
            try:
                cell = adaptations[scratch].cell(method, fraction=fraction, shots=shots, seeds=seeds)
            except DataError as e:  # e.g. a fraction that empties a class of this dataset, zero-shot of a classifier
                cell = {"checkpoint": suite.checkpoint, "data": data, "method": method, "fraction": fraction,
                        "shots": shots, "seeds": seeds, "error": str(e)}
                log.warning("suite %s: %s %s: %s", suite.name, name, stem, e)
            cell = {**{k: v for k, v in cell.items() if k != "file"}, "dataset": name, "settings": key}
            path_.parent.mkdir(parents=True, exist_ok=True)
            path_.write_text(json.dumps(cell, indent=2) + "\n")
            cells.append({**cell, "file": str(path_), "reused": False})
    return write_table(suite.name, suite.checkpoint, cells, root, wandb_mode=suite.wandb, project=suite.wandb_project,
                       config=suite.model_dump(mode="json"))


__all__ = ["Suite", "load_suite", "run_suite"]
