"""DeepSpeed ZeRO-0 in fp32 with a torch optimizer reports no gradient norm: the engine measures it, so
its steps are not counted as non-finite (nan_patience would otherwise stop every such run), and the norm it
logs is the true one: the same recipe's norms without DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PYTHON, REPO, read_metrics, tiny_recipe, write_recipe
from foundation.config import validate
from foundation.train import train


@pytest.mark.slow
def test_zero0_fp32_steps_have_a_norm_and_count_no_nonfinite(digits_shards, tmp_path):
    settings = {"steps": 6, "nan_patience": 3, "precision": "fp32"}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        digits_shards, tmp_path, "z0", train=settings, parallel={"backend": "deepspeed", "zero_stage": 0}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    out = subprocess.run([PYTHON, str(REPO / "tests" / "train_driver.py"), str(recipe), "--summary-out",
                          str(tmp_path / "s")], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "s.rank0.json").read_text())
    assert summary["nonfinite_steps"] == 0
    norms = [m["train/grad_norm"] for m in read_metrics(tmp_path / "z0").values()]
    train(validate(tiny_recipe(digits_shards, tmp_path, "plain", train=settings)))  # the same run, no DeepSpeed
    true_norms = [m["train/grad_norm"] for m in read_metrics(tmp_path / "plain").values()]
    assert len(norms) == len(true_norms) == 6
    assert norms == pytest.approx(true_norms, rel=1e-4)
