"""``tasks.<name>.grad_accum``: one task accumulates several micro-batches per step (UniHCP's release:
detection trains with batch 1 and ``batch_accumulation`` 4 while the other tasks take one batch). Its loss
is their mean, so k micro-batches of b give the gradient of one batch of k x b; under ``groups`` the other
tasks' ranks join as many agreements, so nothing waits; DeepSpeed refuses it at load."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from conftest import read_metrics, write_recipe
from foundation.config import RecipeError, validate
from test_multitask import VIT, parity_shards, run_driver, two_tasks  # noqa: F401 (a fixture)

SECTIONS = dict(steps=3, log_every=1, eval_batches=1, clip_grad=0.5)


def _pair(digits, parity, tmp_path, schedule: str = "mix"):
    """The same recipe twice: parity as one batch of 16, and as 2 accumulated micro-batches of 8."""
    whole = two_tasks(digits, parity, tmp_path, "whole", schedule, model=VIT, **SECTIONS)
    parts = two_tasks(digits, parity, tmp_path, "parts", schedule, model=VIT, **SECTIONS)
    whole["tasks"]["parity"]["batch_size"] = 16
    parts["tasks"]["parity"].update(batch_size=8, grad_accum=2)
    return whole, parts


def _weights_equal(a, b, atol=1e-5):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < atol, worst


def test_k_micro_batches_of_b_train_as_one_batch_of_k_times_b(digits_shards, parity_shards, tmp_path):
    whole, parts = _pair(digits_shards, parity_shards, tmp_path)
    for recipe in (whole, parts):
        r = run_driver(write_recipe(tmp_path / f"{recipe['name']}.yaml", recipe))
        assert r.returncode == 0, r.stderr[-3000:]
    _weights_equal(tmp_path / "whole/checkpoints/step_3/model.safetensors",
                   tmp_path / "parts/checkpoints/step_3/model.safetensors")
    ma, mb = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    for step in (1, 3):
        assert mb[step]["train/parity/loss"] == pytest.approx(ma[step]["train/parity/loss"], rel=1e-5)
        assert mb[step]["train/loss"] == pytest.approx(ma[step]["train/loss"], rel=1e-5)
    # the task's throughput counts every accumulated image
    assert mb[3]["train/parity/samples_per_s"] / mb[3]["train/digits/samples_per_s"] == pytest.approx(16 / 16, rel=0.01)


def test_sample_weight_counts_the_accumulated_images_and_deepspeed_refuses(digits_shards, parity_shards, tmp_path):
    _, parts = _pair(digits_shards, parity_shards, tmp_path)
    parts["tasks"]["parity"].pop("loss_weight")
    parts["tasks"]["parity"]["sample_weight"] = 0.5  # the release's detection: weight per image x 1 x 4 accumulated
    assert validate(parts).tasks["parity"].loss_weight == pytest.approx(0.5 * 8 * 2)
    parts["parallel"] = {"backend": "deepspeed", "zero_stage": 1}
    with pytest.raises(RecipeError, match=r"tasks\.parity\.grad_accum: .*not available under DeepSpeed"):
        validate(parts)
    parts["parallel"] = {}
    parts["tasks"]["parity"]["grad_accum"] = 0
    with pytest.raises(RecipeError, match=r"tasks\.parity\.grad_accum"):
        validate(parts)


@pytest.mark.slow
def test_groups_with_one_accumulating_task_equals_one_process(digits_shards, parity_shards, tmp_path):
    """2 ranks, one task each; the parity rank runs 2 micro-batches per step, the digits rank 1 (plus one
    agreement to match): no rank waits on another, and the weights are one process's with mix."""
    whole, _ = _pair(digits_shards, parity_shards, tmp_path / "ref")
    _, parts = _pair(digits_shards, parity_shards, tmp_path, "groups")
    r = run_driver(write_recipe(tmp_path / "whole.yaml", whole))
    assert r.returncode == 0, r.stderr[-3000:]
    b = run_driver(write_recipe(tmp_path / "parts.yaml", parts), ranks=2)
    assert b.returncode == 0, b.stderr[-5000:]
    _weights_equal(tmp_path / "ref/whole/checkpoints/step_3/model.safetensors",
                   tmp_path / "parts/checkpoints/step_3/model.safetensors")
    assert read_metrics(tmp_path / "parts")[3]["train/loss"] == pytest.approx(
        read_metrics(tmp_path / "ref/whole")[3]["train/loss"], rel=1e-4)
