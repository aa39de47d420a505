"""The training loop in one process: learning, checkpoints, exact resume after SIGKILL, NaN guard."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REPO, TINY_VIT, read_metrics, tiny_recipe, write_recipe
from foundation.config import validate
from foundation.engine.checkpoint import CheckpointError, find_latest, load_model, load_state
from foundation.tasks import TASKS
from foundation.tasks.classification import ClassificationTask
from foundation.train import NonFiniteLossError, build_optimizer, train


def run_driver(recipe_path: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.update(env_extra or {})
    return subprocess.run([PYTHON, str(REPO / "tests" / "train_driver.py"), str(recipe_path), *extra],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_loss_falls_and_checkpoint_layout(digits_shards, tmp_path):
    recipe = validate(tiny_recipe(digits_shards, tmp_path, train={"steps": 40, "save_every": 20, "eval_every": 20}))
    summary = train(recipe)
    metrics = read_metrics(recipe.run_dir)
    first = sum(metrics[s]["train/loss"] for s in (1, 2, 3)) / 3
    last = sum(metrics[s]["train/loss"] for s in (38, 39, 40)) / 3
    assert last < first - 0.3, (first, last)
    assert summary["eval/classification/top1"] > 30.0  # 10 classes: chance is 10%
    assert summary["eval/classification/samples"] == 32  # train.eval_batches=2 batches of 16
    ckpt = recipe.run_dir / "checkpoints" / "step_40"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "state.pt", "recipe.yaml"}
    keys = load_file(str(ckpt / "model.safetensors"))
    assert "fc.weight" in keys and not any(k.startswith(("module.", "model.")) for k in keys)
    state = load_state(ckpt)
    assert state["step"] == 40 and len(state["rng"]) == 1 and len(state["data"]) == 1
    model, loaded = load_model(recipe.run_dir)  # a run directory resolves to its newest checkpoint
    assert loaded.name == recipe.name and not model.training
    assert (recipe.run_dir / "recipe.yaml").is_file() and (recipe.run_dir / "summary.json").is_file()


def test_no_weight_decay_on_norms_biases_and_tokens(digits_shards, tmp_path):
    recipe = validate(tiny_recipe(digits_shards, tmp_path, model=TINY_VIT))
    task = TASKS["classification"].build(recipe.model, recipe.task, recipe.data)
    opt = build_optimizer(task, recipe.optim)
    names = {id(p): n for n, p in task.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "model.cls_token" in no_decay and "model.pos_embed" in no_decay
    assert "model.blocks.0.norm1.weight" in no_decay and "model.head.bias" in no_decay
    assert "model.head.weight" not in no_decay and "model.blocks.0.attn.qkv.weight" not in no_decay


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(digits_shards, tmp_path):
    """20 steps straight == 10 steps, SIGKILL, resume for 10 more: same loss at every step, same weights."""
    base = dict(train={"steps": 20, "save_every": 10}, data={"workers": 2},
                task={"name": "classification", "label_smoothing": 0.1, "mixup": 0.4})
    straight = write_recipe(tmp_path / "a.yaml", tiny_recipe(digits_shards, tmp_path, "straight", **base))
    killed = write_recipe(tmp_path / "b.yaml", tiny_recipe(digits_shards, tmp_path, "killed", **base))
    a = run_driver(straight)
    assert a.returncode == 0, a.stderr[-3000:]
    b1 = run_driver(killed, "--die-after-save", "10")
    assert b1.returncode == -signal.SIGKILL, b1.stderr[-3000:]
    assert find_latest(tmp_path / "killed" / "checkpoints").name == "step_10"
    b2 = run_driver(killed)  # resume: auto
    assert b2.returncode == 0, b2.stderr[-3000:]
    assert "resumed from" in b2.stderr
    ma, mb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert sorted(ma) == sorted(mb) == list(range(1, 21))
    for step in range(1, 21):
        assert ma[step]["train/loss"] == mb[step]["train/loss"], step  # bitwise, single fp32 process
    wa = load_file(str(tmp_path / "straight/checkpoints/step_20/model.safetensors"))
    wb = load_file(str(tmp_path / "killed/checkpoints/step_20/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_while_saving_keeps_previous_checkpoint(digits_shards, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(digits_shards, tmp_path, "r", train={"steps": 30, "save_every": 10}))
    b1 = run_driver(recipe, "--die-during-save", "20")
    assert b1.returncode == -signal.SIGKILL, b1.stderr[-3000:]
    ckpts = tmp_path / "r" / "checkpoints"
    assert list(ckpts.glob(".step_20.*")), "the half-written checkpoint should be left under its temporary name"
    assert find_latest(ckpts).name == "step_10"
    load_state(find_latest(ckpts))  # the previous one still loads
    b2 = run_driver(recipe)
    assert b2.returncode == 0, b2.stderr[-3000:]
    assert "resumed from" in b2.stderr and "step_10 at step 10" in b2.stderr
    assert find_latest(ckpts).name == "step_30" and not list(ckpts.glob(".step_*"))


def test_pickled_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    torch.save({"step": 1, "payload": Evil()}, ckpt / "state.pt")
    with pytest.raises(CheckpointError, match="refused: loading it would execute pickled code"):
        load_state(ckpt)


class NanAtSteps(ClassificationTask):
    """Classification whose loss turns NaN on chosen forward calls (counted from 1)."""

    nan_calls: set[int] = set()

    def forward(self, batch):
        out = super().forward(batch)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls in self.nan_calls:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_is_skipped_and_counted(digits_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "nan_classification", NanAtSteps)
    monkeypatch.setattr(NanAtSteps, "nan_calls", {3, 4})
    recipe = validate(tiny_recipe(digits_shards, tmp_path, task={"name": "nan_classification"},
                                  train={"steps": 8, "nan_patience": 3}))
    summary = train(recipe)
    assert summary["nonfinite_steps"] == 2
    metrics = read_metrics(recipe.run_dir)
    assert metrics[8]["train/nonfinite_steps"] == 2
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for s, m in metrics.items() if s not in (3, 4))


def test_nan_patience_stops_with_step_and_terms(digits_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "nan_classification", NanAtSteps)
    monkeypatch.setattr(NanAtSteps, "nan_calls", {2, 3, 4, 5})
    recipe = validate(tiny_recipe(digits_shards, tmp_path, task={"name": "nan_classification"},
                                  train={"steps": 8, "nan_patience": 3}))
    with pytest.raises(NonFiniteLossError, match=r"stopping at step 4: 3 non-finite steps in a row.*loss=nan"):
        train(recipe)


def test_grad_accumulation_matches_big_batch(digits_shards, tmp_path):
    """2 micro-batches of 8 give the same first update as one batch of 16 (same samples; a ViT, since
    BatchNorm's batch statistics would differ by construction)."""
    common = dict(optim={"lr": 1e-3, "warmup_steps": 0}, data={"workers": 0, "shuffle_buffer": 0}, model=TINY_VIT,
                  train={"steps": 2, "evals": []})
    big = validate(tiny_recipe(digits_shards, tmp_path, "big", **common))
    acc = validate(tiny_recipe(digits_shards, tmp_path, "acc", **common))
    big.train.batch_size, acc.train.batch_size, acc.train.grad_accum = 16, 8, 2
    train(big), train(acc)
    wa = load_file(str(big.run_dir / "checkpoints/step_2/model.safetensors"))
    wb = load_file(str(acc.run_dir / "checkpoints/step_2/model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow
def test_cli_train_writes_run_directory(digits_shards, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(digits_shards, tmp_path, "cli"))
    out = subprocess.run([PYTHON, "-m", "foundation.cli", "train", str(recipe), "train.steps=3", "optim.lr=1e-3"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["steps"] == 3 and summary["ranks_agree"]
    saved = (tmp_path / "cli" / "recipe.yaml").read_text()
    assert "lr: 0.001" in saved and "steps: 3" in saved


def test_wandb_offline_run_and_auto_mode(digits_shards, tmp_path, monkeypatch):
    from foundation.engine.tracking import resolve_wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.delenv("WANDB_API_KEY")

    recipe = validate(tiny_recipe(digits_shards, tmp_path, "wb", train={"steps": 3}, logging={"wandb": "auto"}))
    train(recipe)
    runs = list((recipe.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record_file = next(runs[0].glob("*.wandb"))
    for _ in range(120):  # the W&B service flushes its record file shortly after finish() returns
        record = record_file.read_bytes()  # protobuf records: strings are stored as-is
        if b"train/loss" in record:
            break
        time.sleep(0.25)
    assert b"resnet10t" in record and b"train/loss" in record  # the recipe as config, and the metrics


def test_ema_weights_are_kept_evaluated_and_resumed(digits_shards, tmp_path):
    recipe = validate(tiny_recipe(digits_shards, tmp_path, "ema", train={"steps": 6, "save_every": 3, "ema_decay": 0.9}))
    summary = train(recipe)
    assert "eval/classification_ema/top1" in summary
    ckpt = recipe.run_dir / "checkpoints" / "step_6"
    ema, live = load_file(str(ckpt / "ema.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert ema.keys() == live.keys() and not torch.equal(ema["fc.weight"], live["fc.weight"])
    model, _ = load_model(ckpt, ema=True)
    assert torch.equal(model.state_dict()["fc.weight"], ema["fc.weight"])
    # resumed: without step_6, the run restarts from step_3 (its EMA too) and ends on the same EMA, bit for bit
    shutil.rmtree(ckpt)
    train(recipe)
    assert find_latest(recipe.run_dir / "checkpoints").name == "step_6"
    resumed = load_file(str(ckpt / "ema.safetensors"))
    assert resumed.keys() == ema.keys() and all(torch.equal(resumed[k], ema[k]) for k in ema)


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path):
    import io

    import webdataset as wds
    from PIL import Image

    shards = tmp_path / "shards"
    shards.mkdir()
    rng = torch.Generator().manual_seed(0)
    for shard in range(2):
        with wds.TarWriter(str(shards / f"train-{shard:06d}.tar")) as sink:
            for i in range(40):
                buf = io.BytesIO()
                Image.fromarray((torch.rand(32, 32, generator=rng) * 255).byte().numpy()).save(buf, format="PNG")
                data = buf.getvalue()
                if shard == 1 and i % 4 == 0:
                    data = data[: len(data) // 2]  # truncated PNG
                sink.write({"__key__": f"s{shard}_{i:03d}", "png": data, "cls": str(i % 10)})
    shutil.copy(shards / "train-000000.tar", shards / "val-000000.tar")
    recipe = validate(tiny_recipe(shards, tmp_path, "corrupt", train={"steps": 10, "log_every": 5}))
    summary = train(recipe)
    metrics = read_metrics(recipe.run_dir)
    assert summary["data_skipped"] > 0 and metrics[10]["data/skipped"] == summary["data_skipped"]
    log = (recipe.run_dir / "train.log").read_text()
    assert "skipped sample" in log and "train-000001.tar" in log


def test_eval_every_and_save_every_zero_mean_never(digits_shards, tmp_path):
    """0 switches evaluation (or checkpoints) off, from the command line too: not refused, not 'at the end'."""
    from foundation.cli import main

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(digits_shards, tmp_path, "never", train={"steps": 4}))
    assert main(["train", str(path), "train.eval_every=0", "logging.wandb=disabled"]) == 0
    summary = json.loads((tmp_path / "never" / "summary.json").read_text())
    assert not any(k.startswith("eval/") for k in summary) and summary["checkpoint"].endswith("step_4")
    off = validate(tiny_recipe(digits_shards, tmp_path, "nosave", train={"steps": 4, "save_every": 0, "eval_every": 2}))
    summary = train(off)
    assert summary["checkpoint"] is None and not (off.run_dir / "checkpoints").exists()
    assert "eval/classification/top1" in summary  # evaluation still runs when only saving is off


def test_rerun_of_a_finished_run_writes_the_straight_runs_summary(digits_shards, tmp_path):
    """A run killed after its final checkpoint, before its summary: the rerun trains nothing, evaluates the final
    weights and names the final checkpoint (foundation sweep counts a run finished by its summary)."""
    recipe = validate(tiny_recipe(digits_shards, tmp_path, "done", train={"steps": 4}))
    straight = train(recipe)
    (recipe.run_dir / "summary.json").unlink()
    again = train(recipe)
    assert again["steps_this_run"] == 0 and again["checkpoint"] == straight["checkpoint"]
    assert again["weights_sha256"] == straight["weights_sha256"]
    evals = {k: v for k, v in straight.items() if k.startswith("eval/")}
    assert evals and {k: again[k] for k in evals} == evals
