"""``foundation sweep``: seeds and grid parsing, variants, the mean ± std table, printed commands, errors
before any run; slow: a 2 seeds x 2 variants sweep of tiny CLIP runs, its table against the runs' own
summaries, and a rerun that skips finished runs and finishes an unfinished one."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from conftest import write_recipe
from foundation.config import RecipeError
from foundation.sweep import aggregate, make_variants, mean_std, parse_grid, parse_seeds, to_csv, to_markdown


def test_seeds_and_grid_parsing():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-3,7,2") == [0, 1, 2, 3, 7]
    for bad in ("", "a", "3-1", "1,,x"):
        with pytest.raises(RecipeError, match="--seeds"):
            parse_seeds(bad)
    assert parse_grid(["optim.lr=1e-3,2e-3", "data.augment.scale=[0.2,1.0],[0.6, 1.0]"]) == [
        ("optim.lr", ["1e-3", "2e-3"]), ("data.augment.scale", ["[0.2,1.0]", "[0.6, 1.0]"])]
    for bad in (["optim.lr"], ["=1,2"], ["optim.lr=1,"], ["a=1", "a=2"]):
        with pytest.raises(RecipeError, match="--grid"):
            parse_grid(bad)


def test_variants_are_the_named_ones_times_the_grid():
    grid = parse_grid(["seed_x=1,2"])
    assert [(v.name, v.overrides) for v in make_variants(None, [])] == [("base", [])]
    got = make_variants([["clip", "task.name=clip"], ["declip", "task.name=declip", "data.two_view=true"]], grid)
    assert [(v.name, v.overrides) for v in got] == [
        ("clip,seed_x=1", ["task.name=clip", "seed_x=1"]), ("clip,seed_x=2", ["task.name=clip", "seed_x=2"]),
        ("declip,seed_x=1", ["task.name=declip", "data.two_view=true", "seed_x=1"]),
        ("declip,seed_x=2", ["task.name=declip", "data.two_view=true", "seed_x=2"])]
    with pytest.raises(RecipeError, match="name given twice"):
        make_variants([["a"], ["a"]], [])
    with pytest.raises(RecipeError, match="not KEY=VALUE"):
        make_variants([["a", "oops"]], [])


def test_aggregate_is_mean_and_sample_std_per_variant_and_key():
    rows = [{"variant": "a", "seed": s, "eval": {"eval/x": x, "eval/y": 1.0}} for s, x in enumerate([1.0, 2.0, 6.0])]
    rows += [{"variant": "b", "seed": 0, "eval": {"eval/x": 5.0}}]
    table = aggregate(rows)
    assert list(table) == ["a", "b"]
    a = table["a"]["eval/x"]
    assert a["values"] == [1.0, 2.0, 6.0] and a["n"] == 3
    assert a["mean"] == pytest.approx(3.0) and a["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 6.0]))
    assert table["a"]["eval/y"]["std"] == 0.0
    assert table["b"]["eval/x"] == {"values": [5.0], "mean": 5.0, "std": None, "n": 1}  # one seed: no spread
    assert mean_std([2.0, 4.0]) == (3.0, pytest.approx(2**0.5))
    md = to_markdown(table, "t")
    assert "| a | 3 | 3.00 ± 2.65 | 1.00 ± 0.00 |" in md and "| b | 1 | 5.00 ± – |  |" in md
    parsed = list(csv.DictReader(to_csv(table).splitlines()))
    assert parsed[0] == {"variant": "a", "metric": "eval/x", "mean": "3.0", "std": repr(a["std"]), "n": "3"}
    assert parsed[-1]["std"] == ""


def tiny_recipe(tmp_path: Path, shards: str = "unused") -> Path:
    from test_clip import clip_recipe

    r = clip_recipe(Path(shards), tmp_path / "runs", "tiny", task="clip")
    r["train"].update(steps=4, evals=["zeroshot"], save_every=2)
    return write_recipe(tmp_path / "tiny.yaml", r)


def test_print_commands_and_errors_before_any_run(tmp_path, capsys):
    from foundation.cli import main

    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "sw"
    assert main(["sweep", str(recipe), "train.steps=3", "--seeds", "0,1", "--grid", "optim.lr=1e-3,2e-3",
                 "--out", str(out), "--print-commands"]) == 0
    script = capsys.readouterr().out
    cmds = [line for line in script.splitlines() if " train " in line and not line.startswith("# then")]
    assert len(cmds) == 4 and "export WANDB_RUN_GROUP=sw" in script
    assert f"optim.lr=1e-3 seed=1 output_dir={out}/optim.lr=1e-3 name=seed_1 logging.group=sw" in script
    assert all("train.steps=3" in c for c in cmds) and "--aggregate" in script
    assert not out.exists()  # nothing ran
    # a bad key or seed list: one error line, exit 2, nothing run
    assert main(["sweep", str(recipe), "--seeds", "0", "--grid", "optim.nope=1,2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim.nope" in err and len(err.strip().splitlines()) == 1
    assert main(["sweep", str(recipe), "--seeds", "x", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --seeds")
    assert not out.exists()


@pytest.mark.slow
def test_sweep_runs_seeds_by_variants_tables_them_and_skips_finished_runs(tmp_path, capsys):
    from foundation.cli import main
    from test_clip import write_caption_shards

    shards = write_caption_shards(tmp_path / "shards", per_class=(8, 4))
    recipe = tiny_recipe(tmp_path, str(shards))
    out = tmp_path / "sw"
    argv = ["sweep", str(recipe), "--seeds", "0,1", "--grid", "optim.lr=1e-3,3e-3", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [(r["variant"], r["seed"], r["finished"]) for r in result["runs"]] == [
        ("optim.lr=1e-3", 0, True), ("optim.lr=1e-3", 1, True), ("optim.lr=3e-3", 0, True), ("optim.lr=3e-3", 1, True)]
    summaries = {}
    for v in ("optim.lr=1e-3", "optim.lr=3e-3"):
        for s in (0, 1):
            run = out / v / f"seed_{s}"
            summaries[v, s] = json.loads((run / "summary.json").read_text())
            resolved = (run / "recipe.yaml").read_text()
            assert f"seed: {s}" in resolved and "group: sw" in resolved
    assert summaries["optim.lr=1e-3", 0]["weights_sha256"] != summaries["optim.lr=1e-3", 1]["weights_sha256"]
    assert summaries["optim.lr=1e-3", 0]["weights_sha256"] != summaries["optim.lr=3e-3", 0]["weights_sha256"]
    for v in ("optim.lr=1e-3", "optim.lr=3e-3"):
        cell = result["table"][v]["eval/zeroshot/top1"]
        values = [summaries[v, s]["eval/zeroshot/top1"] for s in (0, 1)]
        assert cell["values"] == values and cell["n"] == 2
        assert cell["mean"] == pytest.approx(statistics.mean(values))
        assert cell["std"] == pytest.approx(statistics.stdev(values))
    assert "| optim.lr=1e-3 | 2 |" in (out / "sweep.md").read_text()
    assert {row["variant"] for row in csv.DictReader((out / "sweep.csv").open())} == {"optim.lr=1e-3", "optim.lr=3e-3"}

    # rerun: finished runs are skipped (untouched); one killed after step 2's checkpoint resumes to its end
    import shutil

    stamps = {k: (out / k[0] / f"seed_{k[1]}" / "summary.json").stat().st_mtime_ns for k in summaries}
    killed = out / "optim.lr=3e-3" / "seed_1"
    (killed / "summary.json").unlink()
    shutil.rmtree(killed / "checkpoints" / "step_4")
    capsys.readouterr()
    assert main(argv) == 0
    for k, stamp in stamps.items():
        now = (out / k[0] / f"seed_{k[1]}" / "summary.json").stat().st_mtime_ns
        assert (now == stamp) == (k != ("optim.lr=3e-3", 1)), k
    again = json.loads((out / "sweep.json").read_text())
    assert again["table"] == result["table"]  # resumed exactly: the same final weights, the same evaluation
    assert json.loads((killed / "summary.json").read_text())["steps_this_run"] == 2
    assert len((out / "logs" / "optim.lr=1e-3_seed_0.log").read_text().split("$ ")) == 2  # ran once
