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
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from foundation.config import RecipeError, load_recipe
from foundation.data import DataError
from foundation.data.shards import iter_raw_samples, read_manifest, write_manifest, write_split

if TYPE_CHECKING:
    from foundation.adapt.run import Adaptation

log = logging.getLogger(__name__)


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


def generate_recipe(adaptation: Adaptation, train_data: str, seed: int, run_root: Path, name: str,
                    scratch: bool = False) -> dict:
    """The classification recipe (a raw dict) that fine-tunes (or, ``scratch``, trains afresh) on the subset."""
    backbone = adaptation.backbone
    arch = backbone.finetune
    if arch is None:
        raise RecipeError(f"{adaptation.checkpoint}: a {backbone.kind} checkpoint cannot be fine-tuned by the training "
                          "engine (its vision tower is not a timm model); use the platform run it was exported from, "
                          "or --method linear / knn")
    # num_classes: the manifest's class names, else the largest training label + 1
    num_classes = len(adaptation.class_names) if adaptation.class_names else int(adaptation.train_index()[1].max()) + 1
    o, ft = adaptation.opts, adaptation.opts.finetune
    pre = backbone.preprocessing
    model = {"backbone": arch["backbone"], "num_classes": num_classes, "in_chans": pre["in_chans"],
             "kwargs": arch.get("kwargs", {}), "freeze": [] if scratch else list(ft.freeze)}
    for key in ("img_size", "patch_size"):
        if arch.get(key) is not None:
            model[key] = arch[key]
    if not scratch:
        classifier = _classifier_name(arch)
        model["init"] = {"path": arch["init"], "part": "backbone",
                         "exclude": [f"{classifier}.*"] if classifier else []}
    val = str(Path(adaptation.data))
    return {
        "name": name, "seed": seed, "output_dir": str(run_root),
        "model": model,
        "task": {"name": "classification"},
        "data": {"train": train_data, "val": val, "image_size": pre["image_size"], "in_chans": pre["in_chans"],
                 "mean": pre.get("mean"), "std": pre.get("std"), "workers": o.workers,
                 "augment": {"scale": [0.6, 1.0], "hflip": 0.0, "interpolation": pre.get("interpolation", "bicubic"),
                             "crop_pct": pre.get("crop_pct", 1.0)}},
        "optim": {"name": ft.optimizer, "lr": ft.lr, "weight_decay": ft.weight_decay,
                  "layer_decay": None if scratch else ft.layer_decay, "warmup_steps": ft.warmup_steps},
        "train": {"steps": ft.steps, "batch_size": ft.batch_size, "log_every": max(1, ft.steps // 10),
                  "device": o.device},
        "parallel": dict(ft.parallel),
        "logging": {"wandb": ft.wandb, "progress": o.progress, "tags": ["adapt", "scratch" if scratch else "finetune"]},
    }


def finetune(adaptation: Adaptation, split: dict, seed: int, out_dir: Path, scratch: bool = False) -> dict:
    """Fine-tune (or train from scratch) on ``split``'s training keys; top-1/top-5 on the data's val split."""
    from foundation.train import train

    ft = adaptation.opts.finetune
    full = split.get("samples") == split.get("of")
    train_data = str(adaptation.data) if full else str(subset_shards(
        adaptation.data, split["name"], split["keys"], out_dir / "data", adaptation.class_names))
    name = f"{'scratch' if scratch else 'finetune'}-seed{seed}"
    raw = generate_recipe(adaptation, train_data, seed, out_dir, name, scratch)
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


__all__ = ["finetune", "generate_recipe", "subset_shards"]
