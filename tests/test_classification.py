"""Supervised classification end to end: DeiT-style augmentation, evaluation CLI, timm interoperability."""

from __future__ import annotations

import json
import subprocess

import torch

from conftest import PYTHON, REPO, read_metrics, tiny_recipe
from foundation.config import validate
from foundation.engine.checkpoint import load_model
from foundation.train import train

CEIT = {"backbone": "ceit_test", "num_classes": 10, "img_size": 32}


def test_deit_style_recipe_trains(digits_shards, tmp_path):
    recipe = validate(tiny_recipe(
        digits_shards, tmp_path, "deit", model=CEIT,
        task={"label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0},
        data={"augment": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "interpolation": "bicubic"}},
        train={"steps": 4, "ema_decay": 0.99},
    ))
    summary = train(recipe)
    assert summary["nonfinite_steps"] == 0
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in read_metrics(recipe.run_dir).values())


def test_checkpoint_loads_in_timm_and_eval_cli(digits_shards, tmp_path):
    recipe = validate(tiny_recipe(digits_shards, tmp_path, "ceit", model=CEIT, train={"steps": 3}))
    train(recipe)
    ckpt = recipe.run_dir / "checkpoints" / "step_3"
    model, _ = load_model(ckpt)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    ours = model(x)
    code = (
        "import foundation, timm, torch, sys\n"
        f"m = timm.create_model('ceit_test', num_classes=10, in_chans=1, img_size=32, "
        f"checkpoint_path='{ckpt / 'model.safetensors'}').eval()\n"
        f"torch.save(m(torch.load('{tmp_path / 'x.pt'}', weights_only=True)), '{tmp_path / 'y.pt'}')\n"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), ours, rtol=0, atol=1e-6)

    out = subprocess.run([PYTHON, "-m", "foundation.cli", "eval", "classification", "--checkpoint", str(recipe.run_dir),
                          "--data", str(digits_shards), "--out", str(tmp_path / "eval.json")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["samples"] == 297 and 0.0 <= result["top1"] <= result["top5"] <= 100.0
