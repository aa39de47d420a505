"""A multi-task run serves one task at a time to PTQ, robustness and SysNoise: ``--task NAME`` takes the shared
backbone with that task's head, scored on that task's data with its own metric (here two classification heads:
10-way digits and even/odd parity); without ``--task``, or with a name the run does not have, the command
refuses with one error line."""

from __future__ import annotations

import json

import pytest

from foundation.cli import main
from foundation.config import validate
from foundation.train import train
from test_multitask import parity_shards, two_tasks  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def two_task_run(digits_shards, parity_shards, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("mt")
    recipe = validate(two_tasks(digits_shards, parity_shards, root, "mt", steps=30, log_every=10))
    train(recipe)
    return recipe.run_dir


@pytest.mark.slow
def test_quantize_robustness_sysnoise_take_one_task_of_a_multi_task_run(two_task_run, digits_shards, parity_shards,  # noqa: F811
                                                                        tmp_path, capsys):
    run = str(two_task_run)
    out = tmp_path / "q"
    assert main(["quantize", "--checkpoint", run, "--task", "parity", "--data", str(parity_shards), "--val",
                 str(parity_shards), "--method", "rtn", "--wbits", "8", "--abits", "8", "--calib-images", "32",
                 "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert rows["rtn"]["model"].endswith("[parity]") and rows["rtn"]["eval_images"] == 300
    # the parity head's own top-1 on its own val split, as `foundation eval classification --task parity` scores it
    assert main(["eval", "classification", "--checkpoint", run, "--task", "parity", "--data", str(parity_shards),
                 "--out", str(tmp_path / "eval.json")]) == 0
    ref = json.loads((tmp_path / "eval.json").read_text())["top1"]
    assert 100 * rows["fp32"]["top1"] == pytest.approx(ref, abs=0.01)
    assert abs(rows["rtn"]["top1"] - rows["fp32"]["top1"]) <= 0.03

    rob = tmp_path / "rob"
    assert main(["eval", "robustness", "--checkpoint", run, "--task", "digits", "--data", str(digits_shards),
                 "--corruptions", "contrast", "--severities", "3", "--eps", "2/255", "--pgd-steps", "1",
                 "--max-samples", "64", "--quiet", "--out", str(rob)]) == 0
    result = json.loads((rob / "robustness.json").read_text())
    assert result["samples"] == 64 and len(result["corruptions"]["error"]["contrast"]) == 1
    sn = tmp_path / "sn"
    assert main(["eval", "sysnoise", "--checkpoint", run, "--task", "parity", "--data", str(parity_shards),
                 "--axes", "precision", "--max-samples", "64", "--quiet", "--out", str(sn)]) == 0
    assert json.loads((sn / "sysnoise.json").read_text())["variants"]
    capsys.readouterr()

    for cmd in (["quantize", "--checkpoint", run, "--data", str(parity_shards), "--out", str(tmp_path / "x")],
                ["quantize", "--checkpoint", run, "--task", "nope", "--data", str(parity_shards)],
                ["eval", "robustness", "--checkpoint", run, "--data", str(parity_shards), "--quiet"],
                ["eval", "sysnoise", "--checkpoint", run, "--task", "nope", "--data", str(parity_shards), "--quiet"]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and ("--task" in err[0] or "nope" in err[0]), (cmd, err)
