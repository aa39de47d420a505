"""Two processes on CPU (gloo): DDP under torchrun, DeepSpeed ZeRO-2 under torchrun and under the
deepspeed launcher. Loss falls and both ranks end with identical parameters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import PYTHON, REPO, read_metrics, tiny_recipe, write_recipe

TORCHRUN = str(Path(PYTHON).parent / "torchrun")
DEEPSPEED = str(Path(PYTHON).parent / "deepspeed")


def launch(cmd: list[str], tmp_path: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if expect_ok:
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    return out


def summaries(prefix: Path) -> list[dict]:
    return [json.loads((prefix.parent / f"{prefix.name}.rank{r}.json").read_text()) for r in (0, 1)]


def assert_learned_and_agree(run_dir: Path, prefix: Path, steps: int) -> None:
    metrics = read_metrics(run_dir)
    first = sum(metrics[s]["train/loss"] for s in (1, 2, 3)) / 3
    last = sum(metrics[s]["train/loss"] for s in (steps - 2, steps - 1, steps)) / 3
    assert last < first - 0.2, (first, last)
    s0, s1 = summaries(prefix)
    assert s0["weights_sha256"] == s1["weights_sha256"]
    assert s0["ranks_agree"] and s1["ranks_agree"]


def driver_cmd(recipe: Path, prefix: Path, *overrides: str) -> list[str]:
    return [str(REPO / "tests" / "train_driver.py"), str(recipe), *overrides, "--summary-out", str(prefix)]


@pytest.mark.slow
def test_ddp_two_processes_and_resume(digits_shards, tmp_path):
    """Learns, ranks agree; 15 steps + SIGKILL + resume matches 30 straight steps within tolerance."""
    steps = 30
    sections = dict(train={"steps": steps, "eval_every": 30, "save_every": 15}, data={"workers": 1})
    straight = write_recipe(tmp_path / "a.yaml", tiny_recipe(digits_shards, tmp_path, "ddp", **sections))
    killed = write_recipe(tmp_path / "b.yaml", tiny_recipe(digits_shards, tmp_path, "ddp_killed", **sections))
    prefix = tmp_path / "summary"
    torchrun = [TORCHRUN, "--standalone", "--nproc_per_node=2"]
    launch([*torchrun, *driver_cmd(straight, prefix)], tmp_path)
    assert_learned_and_agree(tmp_path / "ddp", prefix, steps)
    s0, _ = summaries(prefix)
    assert s0["eval/classification/samples"] == 64  # 2 eval batches of 16 on each of 2 ranks

    dead = launch([*torchrun, *driver_cmd(killed, prefix, "--die-after-save", "15")], tmp_path, expect_ok=False)
    assert dead.returncode != 0
    launch([*torchrun, *driver_cmd(killed, prefix)], tmp_path)
    ma, mb = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "ddp_killed")
    for step in range(1, steps + 1):
        assert abs(ma[step]["train/loss"] - mb[step]["train/loss"]) < 1e-4, step
    wa = load_file(str(tmp_path / "ddp/checkpoints/step_30/model.safetensors"))
    wb = load_file(str(tmp_path / "ddp_killed/checkpoints/step_30/model.safetensors"))
    assert max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa) < 1e-4


@pytest.mark.slow
def test_deepspeed_zero2_under_torchrun_and_resume(digits_shards, tmp_path):
    """Learns, ranks agree; 15 steps + SIGKILL + resume from the ZeRO-2 checkpoint (partitioned optimizer
    state, scheduler, data position) matches 30 straight steps: loss at every step and final weights."""
    steps = 30
    sections = dict(train={"steps": steps, "save_every": 15})
    straight = write_recipe(tmp_path / "a.yaml", tiny_recipe(digits_shards, tmp_path, "ds", **sections))
    killed = write_recipe(tmp_path / "b.yaml", tiny_recipe(digits_shards, tmp_path, "ds_killed", **sections))
    prefix = tmp_path / "summary"
    torchrun = [TORCHRUN, "--standalone", "--nproc_per_node=2"]
    zero2 = ("parallel.backend=deepspeed", "parallel.zero_stage=2")
    launch([*torchrun, *driver_cmd(straight, prefix, *zero2)], tmp_path)
    assert_learned_and_agree(tmp_path / "ds", prefix, steps)
    ckpt = tmp_path / "ds" / "checkpoints" / f"step_{steps}"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "deepspeed").is_dir()

    dead = launch([*torchrun, *driver_cmd(killed, prefix, *zero2, "--die-after-save", "15")], tmp_path,
                  expect_ok=False)
    assert dead.returncode != 0
    out = launch([*torchrun, *driver_cmd(killed, prefix, *zero2)], tmp_path)
    assert "resumed from" in out.stderr + out.stdout
    assert [s["steps_this_run"] for s in summaries(prefix)] == [15, 15]
    ma, mb = read_metrics(tmp_path / "ds"), read_metrics(tmp_path / "ds_killed")
    assert sorted(ma) == sorted(mb) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(ma[step]["train/loss"] - mb[step]["train/loss"]) < 1e-4, step
    wa = load_file(str(ckpt / "model.safetensors"))
    wb = load_file(str(tmp_path / "ds_killed" / "checkpoints" / f"step_{steps}" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa) < 1e-4


@pytest.mark.slow
def test_deepspeed_launcher_zero3_config_file_and_resume(digits_shards, tmp_path):
    """launch/deepspeed.sh's way: the deepspeed launcher with a ZeRO JSON; then resume from its checkpoint."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(digits_shards, tmp_path, "ds3", train={"steps": 6, "save_every": 3}))
    prefix = tmp_path / "summary"
    base = [DEEPSPEED, "--num_gpus", "2", "--no_local_rank", *driver_cmd(
        recipe, prefix, "parallel.backend=deepspeed", f"parallel.deepspeed_config={REPO}/launch/ds_configs/zero3.json")]
    launch(base, tmp_path)
    s0, s1 = summaries(prefix)
    assert s0["weights_sha256"] == s1["weights_sha256"]
    shutil.rmtree(tmp_path / "ds3" / "checkpoints" / "step_6")
    out = launch(base, tmp_path)  # resume: auto picks step_3
    assert "resumed from" in out.stderr + out.stdout
    assert summaries(prefix)[0]["steps_this_run"] == 3


@pytest.mark.slow
def test_ddp_forced_on_one_process_matches_single(digits_shards, tmp_path):
    """parallel.backend=ddp on one process (one GPU, or a launcher-less run) opens a one-rank group and
    trains exactly like the plain single-process loop; torchrun with one rank takes the same path."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(digits_shards, tmp_path, "one", train={"steps": 4}))
    digests = []
    for name, launcher, backend in (("single", [PYTHON], "single"), ("ddp", [PYTHON], "ddp"),
                                    ("torchrun", [TORCHRUN, "--standalone", "--nproc_per_node=1"], "ddp")):
        prefix = tmp_path / name
        launch([*launcher, *driver_cmd(recipe, prefix, f"name={name}", f"parallel.backend={backend}")], tmp_path)
        digests.append(json.loads((tmp_path / f"{name}.rank0.json").read_text())["weights_sha256"])
    assert digests[0] == digests[1] == digests[2]
