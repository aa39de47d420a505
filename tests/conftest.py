"""Shared fixtures: tiny real data (scikit-learn digits as 32 px PNG shards) and tiny recipes."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def write_digits_shards(out: Path, per_shard: int = 400) -> Path:
    """scikit-learn's 1,797 real 8x8 digits, upscaled to 32 px PNGs, as train (4 shards) / val (1 shard)."""
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    labels = digits.target
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(0).permutation(len(labels))
    val_idx, train_idx = order[:297], order[297:]
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for shard, start in enumerate(range(0, len(idx), per_shard)):
            with wds.TarWriter(str(out / f"{split}-{shard:06d}.tar")) as sink:
                for i in idx[start : start + per_shard]:
                    buf = io.BytesIO()
                    Image.fromarray(images[i]).resize((32, 32), Image.NEAREST).save(buf, format="PNG")
                    sink.write({"__key__": f"{split}{i:05d}", "png": buf.getvalue(), "cls": str(int(labels[i]))})
    return out


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    return write_digits_shards(tmp_path_factory.mktemp("digits"))


def tiny_recipe(shards: Path, run_root: Path, name: str = "tiny", **sections) -> dict:
    """A raw recipe dict: a narrow ResNet-10 (widths 16-128) on 32 px digits; ``sections`` update it
    (``model`` replaces the model section)."""
    recipe = {
        "name": name,
        "seed": 0,
        "output_dir": str(run_root),
        "model": {"backbone": "resnet10t", "num_classes": 10, "kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}},
        "task": {"name": "classification", "label_smoothing": 0.1},
        "data": {"train": str(shards), "val": str(shards), "image_size": 32, "in_chans": 1, "workers": 0,
                 "shuffle_buffer": 100, "augment": {"scale": [0.7, 1.0], "interpolation": "bilinear"}},
        "optim": {"lr": 5e-3, "warmup_steps": 3, "weight_decay": 0.05},
        "train": {"steps": 20, "batch_size": 16, "log_every": 1, "eval_batches": 2},
        "logging": {"wandb": "disabled", "progress": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and section != "model":
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


TINY_VIT = {"backbone": "vit_tiny_patch16_224", "num_classes": 10, "img_size": 32, "patch_size": 8,
            "kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2}}


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: record}; a step logged twice (killed, then resumed) keeps the later one."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec
    return out


FMNIST_SRC = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> Path:
    """Fashion-MNIST (Debian package dataset-fashion-mnist) as shards with captions, built once per session."""
    import argparse

    from foundation.data.cli import add_cli

    if not (FMNIST_SRC / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{FMNIST_SRC} is missing: `apt-get install dataset-fashion-mnist` (make test does it as root)")
    out = tmp_path_factory.mktemp("fashion-mnist")
    parser = argparse.ArgumentParser(prog="foundation")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["data", "fashion-mnist", "--out", str(out), "--workers", "2", "--captions"])
    assert args.func(args) == 0
    return out
