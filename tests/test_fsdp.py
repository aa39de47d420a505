"""FSDP2 (parallel.backend: fsdp2) and resuming on another world size or backend.

Fast tier: which modules get sharded, the precision policy, the refusals, the optimizer-state conversions
and the data-position rules. Full tier (slow, torchrun on gloo): FSDP2 at 2 ranks against one process with
the same global batch; SIGKILL + resume bitwise; a DDP and an FSDP2 checkpoint resumed by every backend at
1, 2 and 4 ranks with the same weights and optimizer state, every saved stream continued.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REPO, TINY_VIT, read_metrics, tiny_recipe, write_recipe

TORCHRUN = str(Path(PYTHON).parent / "torchrun")


# --------------------------------------------------------------------------------------------------
# fast


def test_shard_units_are_blocks_and_stages():
    import timm

    from foundation.engine.fsdp import shard_units

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2)
    assert [n for n, _ in shard_units(vit)] == ["blocks.0", "blocks.1", "blocks.2"]
    resnet = timm.create_model("resnet10t", channels=[16, 32, 64, 128], stem_width=16)
    assert sorted(n for n, _ in shard_units(resnet)) == ["layer1", "layer2", "layer3", "layer4"]
    # an MLP's list of Linear layers is not a list of blocks
    from foundation.models.unihcp import MLP

    assert shard_units(MLP(8, 8, 8, 3)) == []


def test_mixed_precision_policy():
    from foundation.engine.fsdp import mixed_precision

    gpu = mixed_precision("bf16", torch.device("cuda", 0), reduce_fp32=False)
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    assert mixed_precision("bf16", torch.device("cuda", 0), reduce_fp32=True).reduce_dtype == torch.float32
    cpu = mixed_precision("bf16", torch.device("cpu"), reduce_fp32=False)  # autocast on CPU, fp32 shards and reduction
    assert (cpu.param_dtype, cpu.reduce_dtype) == (None, None)
    assert mixed_precision("fp32", torch.device("cuda", 0), reduce_fp32=False).param_dtype is None


@pytest.mark.parametrize("update, word", [
    ({"train": {"precision": "fp16"}}, "train.precision=fp16: not available with parallel.backend=fsdp2"),
    ({"train": {"ema_decay": 0.99}}, "train.ema_decay: not available with parallel.backend=fsdp2"),
])
def test_fsdp_refuses_what_it_cannot_run(tmp_path, digits_shards, update, word):
    """At recipe load, one line each; the engine checks again (a recipe built without validation)."""
    from foundation.config import RecipeError, validate
    from foundation.engine.fsdp import check_recipe

    raw = tiny_recipe(digits_shards, tmp_path, parallel={"backend": "fsdp2"}, **update)
    with pytest.raises(RecipeError) as e:
        validate(raw)
    assert [line.strip() for line in str(e.value).splitlines() if "fsdp2" in line][0].startswith(word)
    plain = validate(tiny_recipe(digits_shards, tmp_path))
    section, values = next(iter(update.items()))
    unchecked = plain.model_copy(update={"parallel": plain.parallel.model_copy(update={"backend": "fsdp2"}),
                                         section: getattr(plain, section).model_copy(update=values)})
    with pytest.raises(RecipeError, match=word.split(":")[0]):
        check_recipe(unchecked)


def test_optimizer_state_by_name_and_back():
    from foundation.engine.resume import by_name, by_position, param_names

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW([{"params": [net[0].weight, net[2].weight]}, {"params": [net[0].bias, net[2].bias],
                                                                         "weight_decay": 0.0}], lr=0.1)
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    names = param_names(net, opt)
    assert names == ["0.weight", "2.weight", "0.bias", "2.bias"]
    full = by_name(opt.state_dict(), names)
    assert set(full["state"]) == set(names) and full["param_groups"][1]["params"] == ["0.bias", "2.bias"]
    back = by_position(full, names, opt)
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]
    for i, s in ref["state"].items():
        assert all(torch.equal(s[k], back["state"][i][k]) for k in s)


def _position(rank: int, world: int, raw: int) -> dict:
    return {"version": 2, "seed": 0, "rank": rank, "world_size": world, "workers": 0, "batch_size": 16,
            "raw": [raw], "skipped": [0], "streams": [[{}]], "next_worker": 0, "batches": raw // 16, "samples": raw}


def test_data_position_across_world_sizes(tmp_path, digits_shards):
    from foundation.config import validate
    from foundation.engine.distributed import DistInfo
    from foundation.engine.resume import data_position

    recipe = validate(tiny_recipe(digits_shards, tmp_path, train={"batch_size": 8}))
    state = {"world_size": 2, "data": [_position(0, 2, 32), _position(1, 2, 48)]}
    at = lambda rank, world: data_position(state, recipe, DistInfo(rank, world, rank, torch.device("cpu"), "fsdp2"))
    assert at(1, 2) == state["data"][1]  # same world size: exactly the saved position
    grown = at(1, 4)  # continues rank 1's stream after its last batch, at the new world size and batch size
    assert grown["raw"] == [48] and grown["rank"] == 1 and grown["world_size"] == 4 and grown["batch_size"] == 8
    assert grown["samples"] == 24  # samples x world stays the epoch's count
    assert at(3, 4) is None  # a new rank: a new stream
    assert at(0, 1)["raw"] == [32]  # shrinking: rank 0 continues, rank 1's stream ends


def test_deepspeed_checkpoint_still_refused_by_other_backends(tmp_path, digits_shards):
    from foundation.checkpoint_io import CheckpointError
    from foundation.config import validate
    from foundation.engine.distributed import DistInfo
    from foundation.train import check_resumable

    recipe = validate(tiny_recipe(digits_shards, tmp_path, parallel={"backend": "fsdp2"}))
    info = DistInfo(0, 2, 0, torch.device("cpu"), "fsdp2")
    with pytest.raises(CheckpointError, match="was written by a deepspeed run and this one is fsdp2"):
        check_resumable({"backend": "deepspeed", "world_size": 2}, recipe, info, tmp_path)
    ds = validate(tiny_recipe(digits_shards, tmp_path, parallel={"backend": "deepspeed", "zero_stage": 2}))
    with pytest.raises(CheckpointError, match="DeepSpeed's optimizer state is in its own files"):
        check_resumable({"backend": "deepspeed", "world_size": 2}, ds, DistInfo(0, 4, 0, torch.device("cpu"),
                                                                                 "deepspeed"), tmp_path)
    check_resumable({"backend": "ddp", "world_size": 2}, recipe, info, tmp_path)  # ddp -> fsdp2: allowed


# --------------------------------------------------------------------------------------------------
# full tier: several processes


def _launch(ranks: int, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [PYTHON, str(REPO / "tests" / script), *args] if ranks == 0 else \
        [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", str(REPO / "tests" / script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    return out


def _ok(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])


def _vit_recipe(tmp_path: Path, shards: Path, steps: int = 4) -> Path:
    return write_recipe(tmp_path / "vit.yaml", tiny_recipe(
        shards, tmp_path / "runs", "vit", model=TINY_VIT, train={"steps": steps, "save_every": 2, "eval_every": steps}))


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert sorted(wa) == sorted(wb)
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process_and_resume_exactly(tmp_path, digits_shards):
    """2 FSDP2 ranks reading halves of the global batch = one process with the whole batch: loss within 1e-5
    and weights within 1e-4 after 4 AdamW steps (lr 5e-3; the gradients are summed in another order, fp32
    rounding, amplified by Adam's normalisation in the first steps). SIGKILL after the step-2 checkpoint +
    resume: every loss and the final weights bitwise those of the straight run (same world size: the
    shards, the optimizer's shards, RNG and data positions come back exactly). An FSDP2 run is read like any
    run: ``foundation export`` and ``foundation eval`` take its directory."""
    recipe = _vit_recipe(tmp_path, digits_shards)
    runs = tmp_path / "runs"
    _ok(_launch(2, "train_driver.py", str(recipe), "parallel.backend=fsdp2", "name=fsdp", "--same-global-batch"))
    _ok(_launch(0, "train_driver.py", str(recipe), "name=one", "train.batch_size=32"))
    ma, mb = read_metrics(runs / "fsdp"), read_metrics(runs / "one")
    for step in range(1, 5):
        assert abs(ma[step]["train/loss"] - mb[step]["train/loss"]) < 1e-5, step
    assert _max_diff(runs / "fsdp/checkpoints/step_4/model.safetensors", runs / "one/checkpoints/step_4/model.safetensors") < 1e-4
    assert (runs / "fsdp/checkpoints/step_4/dcp/.metadata").is_file()

    dead = _launch(2, "train_driver.py", str(recipe), "parallel.backend=fsdp2", "name=killed", "--same-global-batch",
                   "--die-after-save", "2")
    assert dead.returncode != 0
    _ok(_launch(2, "train_driver.py", str(recipe), "parallel.backend=fsdp2", "name=killed", "--same-global-batch"))
    mk = read_metrics(runs / "killed")
    assert [mk[s]["train/loss"] for s in range(1, 5)] == [ma[s]["train/loss"] for s in range(1, 5)]
    assert _max_diff(runs / "fsdp/checkpoints/step_4/model.safetensors", runs / "killed/checkpoints/step_4/model.safetensors") == 0.0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([PYTHON, "-m", "foundation.cli", "export", "--checkpoint", str(runs / "fsdp"), "--format", "timm",
                          "--out", str(tmp_path / "export")], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _max_diff(tmp_path / "export/model.safetensors", runs / "fsdp/checkpoints/step_4/model.safetensors") == 0.0


def _dump(prefix: Path, rank: int = 0) -> dict:
    """What tests/fsdp_driver.py saved: state dicts, ints, strings and the data position (plain containers)."""
    return torch.load(f"{prefix}.rank{rank}.pt", weights_only=True)


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b.to(a.dtype)), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_resume_across_backends_and_world_sizes(tmp_path, digits_shards):
    """A DDP checkpoint (2 ranks) and an FSDP2 checkpoint (2 ranks), each resumed by FSDP2 at 2 and 4 ranks,
    by DDP and by one process: the weights and the optimizer state every rank holds are exactly those the
    writing backend resumes with (compared as full state dicts keyed by parameter name). Data: at the same
    world size every rank's position is the saved one; at another, each saved rank's stream continues from
    its saved position (only world size and the epoch count change), a new rank starts at 0 of a new stream.
    Then DDP 2 ranks -> FSDP2 4 ranks trains 2 more steps: ranks 0 and 1 end exactly where the straight
    2-rank run's streams end (their streams continued, nothing served again), and the 4 ranks agree."""
    recipe = _vit_recipe(tmp_path, digits_shards)
    runs = tmp_path / "runs"
    _ok(_launch(2, "train_driver.py", str(recipe), "parallel.backend=ddp", "name=ddp"))
    _ok(_launch(2, "train_driver.py", str(recipe), "parallel.backend=fsdp2", "name=fsdp", "train.steps=2"))
    out = tmp_path / "dumps"
    out.mkdir()
    for writer in ("ddp", "fsdp"):
        ckpt = runs / writer / "checkpoints/step_2"
        cases = {"ddp2": (2, "ddp"), "fsdp2": (2, "fsdp2"), "single": (0, "single"), "fsdp4": (4, "fsdp2")}
        if writer == "fsdp":
            cases["ddp4"] = (4, "ddp")
        for case, (ranks, backend) in cases.items():
            _ok(_launch(ranks, "fsdp_driver.py", str(recipe), str(out / f"{writer}_{case}"), f"name={writer}_{case}",
                        f"train.resume={ckpt}", f"parallel.backend={backend}"))
        ref = _dump(out / f"{writer}_{'ddp2' if writer == 'ddp' else 'fsdp2'}")
        assert ref["step"] == 2 and ref["optim"]["state"]
        saved = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.equal(saved[k], ref["model"][f"model.{k}"]) for k in saved)
        for case, (ranks, _) in cases.items():
            got = _dump(out / f"{writer}_{case}")
            _assert_same(ref["model"], got["model"], f"{writer}->{case} model")
            _assert_same(ref["optim"], got["optim"], f"{writer}->{case} optim")
            world = max(ranks, 1)
            for rank in range(world):
                pos, mine = _dump(out / f"{writer}_{case}", rank)["data"], None
                if rank < 2:
                    mine = _dump(out / f"{writer}_{'ddp2' if writer == 'ddp' else 'fsdp2'}", rank)["data"]
                    assert {**pos, "world_size": 2, "samples": mine["samples"]} == mine, (writer, case, rank)
                    assert pos["samples"] * world == mine["samples"] * 2
                else:
                    assert pos["raw"] == [0] and pos["rank"] == rank

    _ok(_launch(4, "train_driver.py", str(recipe), "parallel.backend=fsdp2", "name=grown",
                f"train.resume={runs / 'ddp/checkpoints/step_2'}", "--summary-out", str(tmp_path / "grown")))
    summaries = [json.loads((tmp_path / f"grown.rank{r}.json").read_text()) for r in range(4)]
    assert all(s["ranks_agree"] and s["steps_this_run"] == 2 for s in summaries)
    grown = torch.load(runs / "grown/checkpoints/step_4/state.pt", weights_only=True)
    straight = torch.load(runs / "ddp/checkpoints/step_4/state.pt", weights_only=True)
    assert grown["world_size"] == 4 and grown["backend"] == "fsdp2"
    for rank in (0, 1):
        a, b = grown["data"][rank], straight["data"][rank]
        assert {**a, "world_size": 2, "samples": b["samples"]} == b, rank


@pytest.mark.slow
def test_fsdp2_two_task_clip_mix_equals_one_process(tmp_path, fmnist_shards):
    """The shipped two-task recipe (classification + CLIP, per-task micro-batches, CLIP's 0-d logit scale
    kept whole and averaged by the engine), 2 FSDP2 ranks with half the global batch each against one
    process: every loss and gradient norm within 1e-5 relative after 3 steps."""
    manifest = str(fmnist_shards / "manifest.json")
    common = [f"output_dir={tmp_path}", "train.steps=3", "train.save_every=3", "train.eval_every=3",
              "train.eval_batches=1", "train.log_every=1", "logging.wandb=disabled", "logging.progress=false",
              *(f"tasks.{t}.data.{s}={manifest}" for t in ("fmnist", "captions") for s in ("train", "val"))]
    recipe = str(REPO / "recipes/multitask/vit_tiny_fmnist_cls_clip.yaml")
    _ok(_launch(2, "train_driver.py", recipe, *common, "name=fsdp", "parallel.backend=fsdp2",
                "tasks.fmnist.batch_size=8", "tasks.captions.batch_size=8", "--same-global-batch"))
    _ok(_launch(0, "train_driver.py", recipe, *common, "name=one", "tasks.fmnist.batch_size=16",
                "tasks.captions.batch_size=16"))
    ma, mb = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "one")
    for step in (1, 2, 3):
        for key in ("train/loss", "train/fmnist/loss", "train/captions/loss", "train/grad_norm"):
            assert abs(ma[step][key] - mb[step][key]) <= 1e-5 * abs(mb[step][key]), (step, key)


@pytest.mark.slow
def test_fsdp2_one_process_matches_single_and_activation_checkpointing_changes_nothing(tmp_path, digits_shards):
    """FSDP2 forced on one process (a one-rank group: the shards are the whole tensors) trains bitwise as the
    plain loop does, gradient clipping included (the norm is torch's, taken over the shards); recomputing the
    blocks in backward (activation checkpointing) changes nothing either."""
    from foundation.config import validate
    from foundation.train import train

    runs = {}
    for name, parallel in (("single", {}), ("fsdp", {"backend": "fsdp2"}),
                           ("fsdp_ac", {"backend": "fsdp2", "activation_checkpointing": True})):
        train(validate(tiny_recipe(digits_shards, tmp_path, name, model=TINY_VIT, parallel=parallel,
                                   train={"steps": 3, "eval_every": 3, "clip_grad": 1.0})))
        runs[name] = tmp_path / name / "checkpoints/step_3/model.safetensors"
    assert _max_diff(runs["fsdp"], runs["single"]) == 0.0
    assert _max_diff(runs["fsdp"], runs["fsdp_ac"]) == 0.0
