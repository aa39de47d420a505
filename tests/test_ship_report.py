"""`foundation report`: the ship-readiness page joins what train, eval, robustness, SysNoise and
quantize wrote for one run — the same figures, not recomputed — and names what was not run."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_recipe
from test_clip import declip_run, shards  # noqa: F401 (fixtures: a tiny DeCLIP run on grey-level captions)
from foundation.cli import main
from foundation.config import validate
from foundation.train import train


@pytest.mark.slow
def test_report_joins_every_evaluation_of_a_run(digits_shards, tmp_path, capsys):
    recipe = validate(tiny_recipe(digits_shards, tmp_path / "runs", "ship", train={"steps": 30}))
    train(recipe)
    weak = validate(tiny_recipe(digits_shards, tmp_path / "runs", "weak", train={"steps": 3}))  # mCE reference
    train(weak)
    run, ev = recipe.run_dir, recipe.run_dir / "eval"
    data = str(digits_shards)

    # only training so far: the end-of-training top-1, and a command for every missing part
    assert main(["report", str(run)]) == 0
    partial = json.loads((ev / "report" / "report.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert partial["classification"]["top1"] == summary["eval/classification/top1"]
    assert [m[0] for m in partial["missing"]] == ["robustness", "sysnoise", "quantization"]
    assert f"foundation eval robustness --checkpoint {run}" in (ev / "report" / "report.md").read_text()

    assert main(["eval", "classification", "--checkpoint", str(run), "--data", data,
                 "--out", str(ev / "classification.json")]) == 0
    assert main(["quantize", "--checkpoint", str(run), "--data", data, "--val", data, "--method", "rtn",
                 "--wbits", "8", "--abits", "8", "--calib-images", "32", "--val-images", "64", "--onnx",
                 "--out", str(run / "quant")]) == 0
    assert main(["eval", "robustness", "--checkpoint", str(run), "--data", data, "--corruptions", "contrast",
                 "--severities", "1", "--eps", "2/255", "--pgd-steps", "2", "--max-samples", "16",
                 "--reference", str(weak.run_dir), "--quiet"]) == 0
    assert main(["eval", "sysnoise", "--checkpoint", str(run), "--data", data, "--axes", "precision",
                 "architecture", "--max-samples", "16", "--int8", str(run / "quant" / "rtn_w8a8_academic"),
                 "--quiet"]) == 0
    capsys.readouterr()

    assert main(["report", str(run)]) == 0
    report = json.loads((ev / "report" / "report.json").read_text())
    assert report["missing"] == []
    cls = json.loads((ev / "classification.json").read_text())
    rob = json.loads((ev / "robustness" / "robustness.json").read_text())
    sn = json.loads((ev / "sysnoise" / "sysnoise.json").read_text())
    quant = json.loads((run / "quant" / "results.json").read_text())
    assert report["classification"]["top1"] == cls["top1"]
    assert report["robustness"]["mce"] == rob["mce"]["mce"]
    ref = json.loads((ev / "robustness" / "reference_robustness.json").read_text())
    [model_err], [ref_err] = rob["corruptions"]["error"]["contrast"], ref["corruptions"]["error"]["contrast"]
    assert ref_err != model_err and rob["mce"]["mce"] == pytest.approx(100 * model_err / ref_err)
    pgd = [a for a in rob["adversarial"]["attacks"] if a["attack"] == "pgd"]
    assert [a["robustness"] for a in report["robustness"]["attacks"] if a["attack"] == "pgd"] == \
        [a["robustness"] for a in pgd]
    ok = [v for v in sn["variants"] if v["axis"] == "precision" and v["status"] == "ok"]
    assert {"int8", "int8_onnxruntime"} <= {v["name"] for v in ok}  # simulated and deployed INT8 rows
    assert report["sysnoise"]["worst_per_axis"]["precision"]["delta_top1"] == min(v["delta_top1"] for v in ok)
    assert {r["method"] for r in report["quantization"]} == {r["method"] for r in quant}
    md = (ev / "report" / "report.md").read_text()
    assert "INT8 (W8A8) Δtop-1" in md and "Not run yet" not in md
    assert (ev / "report" / "report.html").read_text().startswith("<!doctype html>")

    (ev / "sysnoise" / "sysnoise.json").write_text("{ truncated")
    assert main(["report", str(run)]) == 2
    assert "sysnoise.json: not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_report_covers_a_dual_encoder(declip_run, shards, tmp_path, capsys):  # noqa: F811
    """A DeCLIP run: zero-shot and retrieval from the end of training, the W8A8 delta of both towers (simulated
    and deployed in onnxruntime, tower by tower), corruptions of the zero-shot classifier."""
    import shutil

    summary, src = declip_run
    run = tmp_path / src.name
    shutil.copytree(src, run)  # the fixture's run is shared: write this test's evaluations into a copy
    data = str(shards)
    assert main(["report", str(run)]) == 0
    partial = json.loads((run / "eval" / "report" / "report.json").read_text())
    assert partial["kind"] == "dual encoder"
    assert partial["zeroshot"]["top1"] == summary["eval/zeroshot/top1"]
    assert partial["retrieval"]["mean_recall"] == summary["eval/retrieval/mean_recall"]
    assert [m[0] for m in partial["missing"]] == ["robustness", "sysnoise", "quantization"]

    assert main(["quantize", "--checkpoint", str(run), "--data", data, "--val", data, "--method", "rtn", "--wbits", "8",
                 "--abits", "8", "--calib-images", "32", "--batch-size", "16", "--onnx", "--out", str(run / "quant")]) == 0
    assert main(["eval", "robustness", "--checkpoint", str(run), "--data", data, "--corruptions", "contrast",
                 "--severities", "3", "--eps", "2/255", "--pgd-steps", "1", "--max-samples", "16", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    report = json.loads((run / "eval" / "report" / "report.json").read_text())
    rows = {r["method"]: r for r in json.loads((run / "quant" / "results.json").read_text())}
    assert [m[0] for m in report["missing"]] == ["sysnoise"]
    assert report["robustness"]["samples"] == 16
    md = (run / "eval" / "report" / "report.md").read_text()
    assert "INT8 (W8A8) Δzero-shot top-1" in md and "INT8 deployed in onnxruntime: Δzero-shot top-1" in md
    assert "image tower only %" in md and "retrieval mean recall (%)" in md
    rtn = rows["rtn"]
    assert f"{100 * (rtn['onnx']['top1'] - rtn['top1_fp']):.2f}" in md
