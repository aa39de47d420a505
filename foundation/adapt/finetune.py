"""Fine-tuning (and the from-scratch baseline) through the training engine.

A single-task classification recipe is generated: the source's architecture (``model.backbone`` and its
size arguments), ``num_classes`` from the target manifest, ``model.init`` pointing at the source (its
backbone; the classifier is excluded, so the head is new), ``model.freeze`` patterns, the optimizer by name
with layer-wise lr decay, the source's preprocessing, and the target data. The reader has no key filter,
so a subset's samples are written as their own shards next to the results (small: the subset is).
The recipe is saved (``recipe.generated.yaml``) and run by ``foundation.train.train`` — so resume, W&B,
DDP and DeepSpeed apply as to any run (``--set parallel.backend=ddp`` under torchrun).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from foundation.adapt.backbone import Backbone
from foundation.config import RecipeError, load_recipe
from foundation.data import DataError
from foundation.data.shards import iter_raw_samples, read_manifest, write_manifest, write_split

log = logging.getLogger(__name__)


@dataclass
class FinetuneOptions:
    """How ``--method finetune`` trains (the generated recipe's fields)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    layer_decay: float | None = None
    freeze: list[str] = field(default_factory=list)
    warmup_steps: int = 0
    eval_batch_size: int = 256
    wandb: str = "auto"
    parallel: dict[str, Any] = field(default_factory=dict)  # recipe `parallel:` (backend, zero_stage ...)
    overrides: list[str] = field(default_factory=list)  # further dotted recipe overrides, e.g. train.precision=bf16


@dataclass
class FinetuneSource:
    """What a fine-tune (or from-scratch) run starts from and trains on: the source checkpoint and its loaded
    backbone, the target data with its classes, and how to run (settings shared by every method)."""

    checkpoint: str
    backbone: Backbone
    data: str
    class_names: list[str] | None
    num_classes: int
    options: FinetuneOptions
    workers: int = 2
    device: str = "cpu"
    progress: bool = True


def subset_shards(data: str, split_name: str, keys: list[str], out_dir: Path, class_names: list[str] | None) -> Path:
    """The training samples of ``keys`` as shards + manifest in ``out_dir`` (reused when already written)."""
    def written() -> bool:
        manifest = read_manifest(out_dir) if (out_dir / "manifest.json").is_file() else None
        return bool(manifest and manifest["splits"].get("train", {}).get("samples") == len(keys)
                    and manifest.get("source", {}).get("keys_of") == split_name)

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 writes the subset; the others wait for it
        deadline = time.monotonic() + 1800
        while not written():
            if time.monotonic() > deadline:
                raise DataError(f"rank {os.environ['RANK']}: rank 0 did not write the subset shards in {out_dir}")
            time.sleep(2)
    if written():
        return out_dir / "manifest.json"
    wanted = set(keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("train-*.tar"):
        old.unlink()
    samples = ({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
               for s in iter_raw_samples(data, "train") if s["__key__"] in wanted)
    entry = write_split(out_dir, "train", samples, max_count=5000)
    if entry["samples"] != len(keys):
        raise DataError(f"{data}: found {entry['samples']} of the split's {len(keys)} keys in its train shards; the "
                        "split file was made for other data")
    write_manifest(out_dir, None, {"train": entry}, class_names=class_names,
                   source={"format": "subset", "data": data, "keys_of": split_name}, command="foundation adapt")
    return out_dir / "manifest.json"


def _classifier_name(arch: dict) -> str | None:
    """The classifier's module name in the timm model (``fc``, ``head`` ...), excluded from ``model.init``."""
    import timm

    import foundation.models  # noqa: F401  (our backbones register with timm)

    kwargs = {k: arch[k] for k in ("img_size", "patch_size") if arch.get(k) is not None}
    model = timm.create_model(arch["backbone"], pretrained=False, in_chans=arch.get("in_chans") or 3,
                              **kwargs, **arch.get("kwargs", {}))
    return model.pretrained_cfg.get("classifier") if getattr(model, "pretrained_cfg", None) else None


def generate_recipe(source: FinetuneSource, train_data: str, seed: int, run_root: Path, name: str,
                    scratch: bool = False) -> dict:
    """The classification recipe (a raw dict) that fine-tunes (or, ``scratch``, trains afresh) on the subset."""
    backbone = source.backbone
    arch = backbone.finetune
    if arch is None:
        raise RecipeError(f"{source.checkpoint}: a {backbone.kind} checkpoint cannot be fine-tuned by the training "
                          "engine (its vision tower is not a timm model); use the platform run it was exported from, "
                          "or --method linear / knn")
    ft = source.options
    pre = backbone.preprocessing
    model = {"backbone": arch["backbone"], "num_classes": source.num_classes, "in_chans": pre["in_chans"],
             "kwargs": arch.get("kwargs", {}), "freeze": [] if scratch else list(ft.freeze)}
    for key in ("img_size", "patch_size"):
        if arch.get(key) is not None:
            model[key] = arch[key]
    if not scratch:
        classifier = _classifier_name(arch)
        model["init"] = {"path": arch["init"], "part": "backbone",
                         "exclude": [f"{classifier}.*"] if classifier else []}
    val = str(Path(source.data))
    return {
        "name": name, "seed": seed, "output_dir": str(run_root),
        "model": model,
        "task": {"name": "classification"},
        "data": {"train": train_data, "val": val, "image_size": pre["image_size"], "in_chans": pre["in_chans"],
                 "mean": pre.get("mean"), "std": pre.get("std"), "workers": source.workers,
                 "augment": {"scale": [0.6, 1.0], "hflip": 0.0, "interpolation": pre.get("interpolation", "bicubic"),
                             "crop_pct": pre.get("crop_pct", 1.0)}},
        "optim": {"name": ft.optimizer, "lr": ft.lr, "weight_decay": ft.weight_decay,
                  "layer_decay": None if scratch else ft.layer_decay, "warmup_steps": ft.warmup_steps},
        "train": {"steps": ft.steps, "batch_size": ft.batch_size, "log_every": max(1, ft.steps // 10),
                  "device": source.device},
        "parallel": dict(ft.parallel),
        "logging": {"wandb": ft.wandb, "progress": source.progress, "tags": ["adapt", "scratch" if scratch else "finetune"]},
    }


def finetune(source: FinetuneSource, split: dict, seed: int, out_dir: Path, scratch: bool = False) -> dict:
    """Fine-tune (or train from scratch) on ``split``'s training keys; top-1/top-5 on the data's val split."""
    from foundation.train import train

    ft = source.options
    full = split.get("samples") == split.get("of")
    train_data = str(source.data) if full else str(subset_shards(
        source.data, split["name"], split["keys"], out_dir / "data", source.class_names))
    name = f"{'scratch' if scratch else 'finetune'}-seed{seed}"
    raw = generate_recipe(source, train_data, seed, out_dir, name, scratch)
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = out_dir / f"{name}.recipe.yaml"
    generated.write_text(yaml.safe_dump(raw, sort_keys=False))
    recipe = load_recipe(generated, ft.overrides)
    log.info("%s: %s (%d training samples) -> %s", name, generated, len(split["keys"]), recipe.run_dir)
    summary = train(recipe)
    if "eval/classification/top1" not in summary:
        raise RecipeError(f"{generated}: the run reported no eval/classification/top1 (train.evals?)")
    return {"top1": float(summary["eval/classification/top1"]), "top5": float(summary["eval/classification/top5"]),
            "train_samples": len(split["keys"]), "val_samples": int(summary.get("eval/classification/samples", 0)),
            "recipe": str(generated), "run_dir": str(recipe.run_dir), "steps": int(summary["steps"]),
            "init": None if scratch else raw["model"]["init"]["path"], "freeze": raw["model"]["freeze"],
            "layer_decay": raw["optim"]["layer_decay"]}


__all__ = ["FinetuneOptions", "FinetuneSource", "finetune", "generate_recipe", "subset_shards"]
