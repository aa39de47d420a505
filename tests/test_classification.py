"""Supervised classification end to end: DeiT-style augmentation, evaluation CLI, timm interoperability."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO, read_metrics, tiny_recipe
from foundation.config import validate
from foundation.engine.checkpoint import load_model
from foundation.train import train

CEIT = {"backbone": "ceit_test", "num_classes": 10, "img_size": 32}


@pytest.mark.slow
def test_deit_style_recipe_learns(digits_shards, tmp_path):
    """Every DeiT ingredient at once (label smoothing, mixup + cutmix, RandAugment, random erasing, bicubic,
    EMA) on the tiny CeiT: it must learn, not only stay finite. Measured (150 steps, 2-core CPU, ~25 s):
    val top-1 21.2 % (chance 10 %), train loss 2.31 -> 2.22 (first/last 10 steps). Magnitudes are the
    recipe's scaled down (mixup/cutmix alpha 0.2, RandAugment m5 with one op): at m9/alpha 0.8 this model
    needs far more than a test's budget of steps."""
    recipe = validate(tiny_recipe(
        digits_shards, tmp_path, "deit", model=CEIT,
        task={"label_smoothing": 0.1, "mixup": 0.2, "cutmix": 0.2},
        data={"augment": {"auto_augment": "rand-m5-n1-mstd0.5-inc1", "re_prob": 0.25, "interpolation": "bicubic"}},
        optim={"lr": 5e-3, "warmup_steps": 10},
        train={"steps": 150, "batch_size": 32, "ema_decay": 0.99, "eval_batches": None},
    ))
    summary = train(recipe)
    assert summary["nonfinite_steps"] == 0
    losses = [m["train/loss"] for _, m in sorted(read_metrics(recipe.run_dir).items())]
    assert len(losses) == 150
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.05, (first, last)
    assert summary["eval/classification/samples"] == 297
    assert summary["eval/classification/top1"] >= 16.0, summary  # chance: 10 %
    assert "eval/classification_ema/top1" in summary


def test_randaugment_increasing_posterize_at_full_magnitude_does_not_crash():
    """timm's RandAugment ``inc1`` posterizes to 0 bits at magnitude 10; Pillow 13 refuses 0 bits
    (ValueError killed a DeiT-style run). The op must give the black image older Pillow gave."""
    from PIL import Image

    from foundation.config import DataConfig
    from foundation.data.transforms import build_train_transform

    cfg = DataConfig(image_size=32, in_chans=1, augment={"auto_augment": "rand-m10-n3-inc1"})
    transform = build_train_transform(cfg)
    [posterize] = [op for t in transform.transforms for op in getattr(t, "ops", []) if op.name == "PosterizeIncreasing"]
    img = Image.fromarray((torch.arange(32 * 32).reshape(32, 32) % 256).to(torch.uint8).numpy())
    assert posterize.level_fn(10, posterize.hparams) == (0,)
    assert not torch.from_numpy(np.asarray(posterize.aug_fn(img, 0))).any()
    for _ in range(100):  # 3 of ~15 ops per call: posterize runs about 20 times at magnitude 10
        assert transform(img).shape == (1, 32, 32)


@pytest.mark.slow
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
    assert result["samples"] == 297
    # the same figures computed here from the model's logits over the same eval loader
    from foundation.data.shards import build_eval_loader

    _, loaded = load_model(recipe.run_dir)
    correct1 = correct5 = n = 0
    with torch.no_grad():
        for batch in build_eval_loader(str(digits_shards), loaded.data, batch_size=64, split="val"):
            top5 = model(batch["image"]).topk(5, dim=1).indices
            correct1 += int((top5[:, 0] == batch["label"]).sum())
            correct5 += int((top5 == batch["label"][:, None]).any(dim=1).sum())
            n += len(batch["label"])
    assert n == 297
    assert result["top1"] == pytest.approx(100 * correct1 / n) and result["top5"] == pytest.approx(100 * correct5 / n)
