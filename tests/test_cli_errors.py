"""Every mistake a user can make on the command line ends in exit code 2 and one stderr line that starts
with ``error:`` and names the problem, never a traceback; ``recipes check`` validates each recipe kind
with its own schema."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import webdataset as wds
import yaml

from conftest import REPO, tiny_recipe, write_recipe
from foundation.cli import main
from foundation.config import validate
from foundation.train import train
from test_clip import clip_recipe, write_caption_shards

FOUNDATION = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "foundation")


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory) -> dict[str, Path]:
    """A 2-step classifier and a 2-step CLIP model, caption shards, and shards whose only image is corrupt."""
    root = tmp_path_factory.mktemp("cli_errors")
    captions = write_caption_shards(root / "captions", per_class=(8, 4))
    cls = validate(tiny_recipe(digits_shards, root / "runs", "cls", train={"steps": 2, "eval_every": None}))
    clip = validate(clip_recipe(captions, root / "runs", "clip", task="clip", train={"steps": 2, "evals": []}))
    train(cls)
    train(clip)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    with wds.TarWriter(str(corrupt / "val-000000.tar")) as sink:
        sink.write({"__key__": "broken", "png": b"not a png", "cls": "0"})
    good = write_recipe(root / "good.yaml", tiny_recipe(digits_shards, root / "runs", "x"))
    (root / "badkey.yaml").write_text("optim: {lrr: 1.0e-3}\n")
    return {"root": root, "cls": cls.run_dir, "clip": clip.run_dir, "digits": digits_shards, "good": good,
            "captions": captions / "manifest.json", "corrupt": corrupt}


# (argv with {placeholders}, a fragment the one error line must contain)
CASES = {
    "train: missing recipe": (["train", "{root}/nope.yaml"], "nope.yaml: recipe file not found"),
    "train: bad key in the file": (["train", "{root}/badkey.yaml"], "optim.lrr: unknown key (did you mean 'lr'?)"),
    "train: bad key in an override": (["train", "{good}", "optim.lrr=1"], "optim.lrr: no such key"),
    "train: bad value": (["train", "{good}", "train.precision=bf61"], "train.precision: Input should be"),
    "train: bad value type": (["train", "{good}", "train.steps=many"], "train.steps"),
    "eval classification: clip checkpoint": (
        ["eval", "classification", "--checkpoint", "{clip}", "--data", "{digits}"],
        "eval classification needs a classification checkpoint; this one is task 'clip'"),
    "eval classification: missing checkpoint": (
        ["eval", "classification", "--checkpoint", "{root}/nope", "--data", "{digits}"], "nope"),
    "eval classification: missing data": (
        ["eval", "classification", "--checkpoint", "{cls}", "--data", "{root}/nodata"], "shard not found"),
    "eval zeroshot: classification checkpoint": (
        ["eval", "zeroshot", "--checkpoint", "{cls}", "--data", "{captions}"],
        "eval zeroshot needs a clip/declip checkpoint; this one is task 'classification'"),
    "eval zeroshot: missing checkpoint": (
        ["eval", "zeroshot", "--checkpoint", "{root}/nope", "--data", "{captions}"], "nope"),
    "eval zeroshot: missing data": (
        ["eval", "zeroshot", "--checkpoint", "{clip}", "--data", "{root}/nodata"], "nodata"),
    "eval retrieval: classification checkpoint": (
        ["eval", "retrieval", "--checkpoint", "{cls}", "--data", "{captions}"],
        "eval retrieval needs a clip/declip checkpoint"),
    "eval retrieval: missing checkpoint": (
        ["eval", "retrieval", "--checkpoint", "{root}/nope", "--data", "{captions}"], "nope"),
    "eval retrieval: missing data": (
        ["eval", "retrieval", "--checkpoint", "{clip}", "--data", "{root}/nodata"], "shard not found"),
    "eval robustness: no readable sample": (
        ["eval", "robustness", "--checkpoint", "{cls}", "--data", "{corrupt}", "--corruptions", "contrast",
         "--severities", "1", "--attacks", "none", "--quiet", "--out", "{root}/rob"],
        "no samples to evaluate in split 'val' (1 unreadable, e.g. broken)"),
    "eval robustness: --max-samples 0": (
        ["eval", "robustness", "--checkpoint", "{cls}", "--data", "{digits}", "--max-samples", "0"],
        "--max-samples: '0' is not a positive integer"),
    "eval robustness: bad --corruptions": (
        ["eval", "robustness", "--checkpoint", "{cls}", "--data", "{digits}", "--corruptions", "fogg"],
        "unknown corruption 'fogg' (did you mean 'fog'?)"),
    "eval robustness: missing checkpoint": (
        ["eval", "robustness", "--checkpoint", "{root}/nope", "--data", "{digits}"], "nope"),
    "eval sysnoise: no readable sample": (
        ["eval", "sysnoise", "--checkpoint", "{cls}", "--data", "{corrupt}", "--axes", "precision", "--quiet",
         "--out", "{root}/sn"], "no samples to evaluate in split 'val'"),
    "eval sysnoise: no shards": (
        ["eval", "sysnoise", "--checkpoint", "{cls}", "--data", "{root}", "--axes", "precision"], "no .tar shards"),
    "eval sysnoise: bad --axes": (
        ["eval", "sysnoise", "--checkpoint", "{cls}", "--data", "{digits}", "--axes", "colours"],
        "argument --axes: invalid choice: 'colours'"),
    "export: open_clip of a classifier": (
        ["export", "--checkpoint", "{cls}", "--format", "open_clip", "--out", "{root}/exp"],
        "--format open_clip needs a clip/declip checkpoint; this one is task 'classification'"),
    "export: unihcp_scene of a classifier": (
        ["export", "--checkpoint", "{cls}", "--format", "unihcp_scene", "--out", "{root}/exp"],
        "no UniHCP task (unihcp_*) in this checkpoint"),
    "export: unihcp_scene of size 0": (
        ["export", "--checkpoint", "{cls}", "--format", "unihcp_scene", "--scene-size", "0", "720", "--out",
         "{root}/exp"], "--scene-size 0 720 / --max-people 20: sizes and counts must be positive"),
    "export: unknown format": (
        ["export", "--checkpoint", "{cls}", "--format", "onnx", "--out", "{root}/exp"], "invalid choice: 'onnx'"),
    "quantize: bad method": (
        ["quantize", "--checkpoint", "{cls}", "--data", "{digits}", "--method", "rtm", "--out", "{root}/q"],
        "method: unknown name 'rtm' (did you mean 'rtn'?)"),
    "quantize: bits not a number": (
        ["quantize", "--checkpoint", "{cls}", "--data", "{digits}", "--wbits", "four", "--abits", "8"],
        "--wbits four --abits 8: bit widths are integers"),
    "eval: --device that is not here": (  # no CUDA at all, or fewer than 100 GPUs
        ["eval", "sysnoise", "--checkpoint", "{cls}", "--data", "{digits}", "--device", "cuda:99"],
        "--device cuda:99: "),
    "eval robustness: --device typo": (
        ["eval", "robustness", "--checkpoint", "{cls}", "--data", "{digits}", "--device", "gpu"],
        "--device gpu: not a device"),
    "quantize: bad bits": (
        ["quantize", "--checkpoint", "{cls}", "--data", "{digits}", "--wbits", "9", "--out", "{root}/q"], "wbits"),
    "report: missing run": (["report", "{root}/runs/nope"], "no such run directory"),
    "data build: missing source": (
        ["data", "build", "{root}/nosrc", "--format", "imagefolder", "--out", "{root}/o"], "source not found"),
    "recipes check: missing path": (["recipes", "check", "{root}/nope.yaml"], "no such recipe file or directory"),
    "no command": (["eval"], "the following arguments are required"),
}


def run(argv: list[str]) -> int:
    """``foundation ARGV`` in-process: its exit code, whether returned or raised (argparse) as SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("case", list(CASES))
def test_cli_error_is_one_line_and_exit_2(case, runs, capsys):
    argv, fragment = CASES[case]
    capsys.readouterr()
    code = run([a.format(**runs) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (case, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), (case, err)
    assert fragment in lines[0], (case, lines[0])


@pytest.mark.slow
def test_the_installed_command_prints_no_traceback(runs):
    """The real entry point, in its own process: a classification checkpoint given to zero-shot (an
    AttributeError traceback before)."""
    out = subprocess.run([FOUNDATION, "eval", "zeroshot", "--checkpoint", str(runs["cls"]), "--data",
                          str(runs["captions"])], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"error: {runs['cls']}: eval zeroshot needs a clip/declip checkpoint; this one is task 'classification' "
        "(use eval classification)"]


@pytest.mark.slow
def test_recipes_check_validates_every_repo_recipe_with_its_own_schema():
    out = subprocess.run([FOUNDATION, "recipes", "check", "recipes/"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    quant = sorted((REPO / "recipes" / "quant").glob("*.yaml"))
    assert len(quant) >= 7
    for f in quant:
        assert f"ok    recipes/quant/{f.name} (quant)" in out.stdout
    for f in sorted((REPO / "recipes" / "adapt").glob("*.yaml")):
        assert f"ok    recipes/adapt/{f.name} (adapt)" in out.stdout
    assert "ok    recipes/classification/resnet18_fmnist.yaml (training)" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == f"{len(list((REPO / 'recipes').rglob('*.yaml')))} valid, 0 invalid"


def test_recipes_check_names_the_key_path_of_a_broken_quant_recipe(tmp_path, capsys):
    good = yaml.safe_load((REPO / "recipes" / "quant" / "w4a4_brecq.yaml").read_text())
    (tmp_path / "quant").mkdir()
    broken = {**good, "reconstruction": {**good.get("reconstruction", {}), "iterz": 10}, "wbits": 12}
    (tmp_path / "quant" / "broken.yaml").write_text(yaml.safe_dump(broken))
    (tmp_path / "quant" / "fine.yaml").write_text(yaml.safe_dump(good))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"name": "x", "wbits": 4}))  # a quant key, not a quant dir
    assert main(["recipes", "check", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert f"ok    {tmp_path / 'quant' / 'fine.yaml'} (quant)" in out
    assert "reconstruction.iterz: unknown key (did you mean 'iters'?)" in out
    assert "wbits: Input should be less than or equal to 8 (got 12)" in out
    assert "train.yaml: invalid recipe" in out and "wbits: unknown key" in out  # validated as a training recipe
    assert out.strip().splitlines()[-1] == "1 valid, 2 invalid"
