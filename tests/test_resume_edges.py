"""Resuming with a changed recipe continues correctly or stops saying what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import read_metrics, tiny_recipe
from foundation.config import validate
from foundation.data import DataError
from foundation.engine.checkpoint import CheckpointError
from foundation.train import build_scheduler, train


def test_more_steps_on_resume_follow_the_new_schedule(digits_shards, tmp_path):
    first = tiny_recipe(digits_shards, tmp_path, "r", train={"steps": 10, "save_every": 10},
                        optim={"lr": 5e-3, "warmup_steps": 3, "min_lr": 0.0})
    train(validate(first))
    longer = tiny_recipe(digits_shards, tmp_path, "r", train={"steps": 20, "save_every": 10},
                         optim={"lr": 8e-3, "warmup_steps": 3, "min_lr": 0.0})
    recipe = validate(longer)
    summary = train(recipe)
    assert summary["steps_this_run"] == 10
    metrics = read_metrics(tmp_path / "r")
    # the lr of steps 11..20 is the 20-step, lr 8e-3 schedule's (the checkpoint's own schedule ended at 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.optim.lr)
    sched = build_scheduler(opt, recipe.optim, 20)
    for step in (11, 15, 20):
        sched.step_update(step - 1)
        assert metrics[step]["train/lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), step
    assert metrics[15]["train/lr"] > 1e-3  # the old schedule had decayed to ~0 at step 10


def test_backend_change_stops_with_what_to_do(digits_shards, tmp_path):
    from foundation.engine.distributed import DistInfo
    from foundation.train import check_resumable

    train(validate(tiny_recipe(digits_shards, tmp_path, "b", train={"steps": 2})))
    ckpt = tmp_path / "b" / "checkpoints" / "step_2"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    info = DistInfo(0, 1, 0, torch.device("cpu"), "deepspeed")
    with pytest.raises(CheckpointError, match=r"written by a single run.*parallel.backend=single.*model.init"):
        check_resumable(state, validate(tiny_recipe(digits_shards, tmp_path, "b")), info, ckpt)


def test_changed_workers_need_resume_data_restart(digits_shards, tmp_path):
    train(validate(tiny_recipe(digits_shards, tmp_path, "w", train={"steps": 4, "save_every": 4})))
    more = tiny_recipe(digits_shards, tmp_path, "w", train={"steps": 8}, data={"workers": 1})
    with pytest.raises(DataError, match="train.resume_data=restart"):
        train(validate(more))
    more["train"]["resume_data"] = "restart"
    summary = train(validate(more))
    assert summary["steps_this_run"] == 4 and summary["steps"] == 8


def test_ema_copy_is_made_before_compiling(digits_shards, tmp_path, monkeypatch):
    """The EMA must hold its own module: made after compile it would share the compiled live forward."""
    compiled = []

    def fake_compile(self, *args, **kwargs):
        compiled.append(self)
        self._fake_compiled = True  # what nn.Module.compile leaves on the module (its compiled call)

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    import timm.utils

    made = []
    real = timm.utils.ModelEmaV3.__init__

    def record(self, model, *a, **k):
        made.append(getattr(model, "_fake_compiled", False))
        real(self, model, *a, **k)

    monkeypatch.setattr(timm.utils.ModelEmaV3, "__init__", record)
    train(validate(tiny_recipe(digits_shards, tmp_path, "e", train={"steps": 2, "compile": True, "ema_decay": 0.9})))
    assert compiled and made == [False]
