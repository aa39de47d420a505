"""A run directory or export works anywhere on its own: copied to a fresh directory, with the shards it was
trained on, its teacher, its experts and its source run deleted, and the working directory elsewhere, every
command that reads it works: eval, export, adapt, predict (UniHCP) and quantize. Exports (timm, open_clip)
and quantized models are moved in turn and used again (adapt; eval sysnoise --int8).

Each family trains a few steps on a private copy of its shards, which the test deletes before using the
artefact; evaluation data are other copies, named on the command line as a user would.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_recipe
from test_clip import clip_recipe, write_caption_shards

from foundation.cli import main
from foundation.config import validate
from foundation.train import train

pytestmark = pytest.mark.slow

QUANTIZE = ["--method", "rtn", "--calib-images", "16", "--val-images", "16", "--batch-size", "16"]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("portable")
    return {"root": root, "elsewhere": tmp_path_factory.mktemp("elsewhere"),
            "captions": write_caption_shards(root / "captions-eval")}


def _private(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _move(run_dir: Path, place: dict, name: str, *sources: Path) -> Path:
    """Copy ``run_dir`` to a fresh place, delete the original and ``sources`` (shards, teacher runs)."""
    moved = place["root"] / "moved" / name
    shutil.copytree(run_dir, moved)
    for path in (run_dir, *sources):
        shutil.rmtree(path)
    return moved


def _ok(argv: list[str], capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, (argv, err[-2000:])
    return out


def _json_out(argv: list[str], capsys) -> dict:
    out = _ok(argv, capsys)
    return json.loads(out[out.index("{"):])


def _adapt(artefact: Path, data: Path, out: Path, capsys) -> dict:
    return _json_out(["adapt", "--checkpoint", str(artefact), "--data", str(data), "--method", "knn", "--shots", "2",
                      "--out", str(out), "--cache", str(out / "cache"), "--workers", "0", "--device", "cpu"], capsys)


def test_classification_run(place, digits_shards, monkeypatch, capsys):
    data = _private(digits_shards, place["root"] / "cls-shards")
    summary = train(validate(tiny_recipe(data, place["root"] / "runs", name="cls", train={"steps": 3})))
    run = _move(Path(summary["run_dir"]), place, "cls", data)
    monkeypatch.chdir(place["elsewhere"])
    before = _json_out(["eval", "classification", "--checkpoint", str(run), "--data", str(digits_shards)], capsys)
    assert before["samples"] == 297
    _ok(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(place["root"] / "cls-timm")], capsys)
    assert _adapt(run, digits_shards, place["root"] / "cls-adapt", capsys)
    _ok(["quantize", "--checkpoint", str(run), "--data", str(digits_shards), *QUANTIZE,
         "--out", str(place["root"] / "cls-quant")], capsys)
    # the timm export and the quantized model, moved in turn
    export = _move(place["root"] / "cls-timm", place, "cls-timm")
    assert _adapt(export, digits_shards, place["root"] / "cls-timm-adapt", capsys)
    quant = next(p for p in (place["root"] / "cls-quant").rglob("quant.json")).parent
    qmoved = _move(quant, place, "cls-int8")
    _ok(["eval", "sysnoise", "--checkpoint", str(run), "--data", str(digits_shards), "--int8", str(qmoved),
         "--axes", "precision", "--max-samples", "16", "--quiet", "--out", str(place["root"] / "sn")], capsys)
    assert json.loads((place["root"] / "sn" / "sysnoise.json").read_text())["samples"] == 16


def test_clip_run_and_its_open_clip_export(place, monkeypatch, capsys):
    data = write_caption_shards(place["root"] / "clip-shards")
    recipe = clip_recipe(data, place["root"] / "runs", "clip", task="clip", data={"two_view": False},
                         train={"steps": 3, "evals": []})
    summary = train(validate(recipe))
    run = _move(Path(summary["run_dir"]), place, "clip", data)
    monkeypatch.chdir(place["elsewhere"])
    zs = _json_out(["eval", "zeroshot", "--checkpoint", str(run), "--data", str(place["captions"])], capsys)
    assert zs["samples"] > 0
    _ok(["export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(place["root"] / "oc")], capsys)
    assert _adapt(run, place["captions"], place["root"] / "clip-adapt", capsys)
    _ok(["quantize", "--checkpoint", str(run), "--data", str(place["captions"]), *QUANTIZE,
         "--out", str(place["root"] / "clip-quant")], capsys)
    export = _move(place["root"] / "oc", place, "oc")
    assert _adapt(export, place["captions"], place["root"] / "oc-adapt", capsys)


def test_two_task_run_without_num_classes(place, digits_shards, monkeypatch, capsys):
    captions = write_caption_shards(place["root"] / "mt-captions")
    digits = _private(digits_shards, place["root"] / "mt-digits")
    base = tiny_recipe(digits, place["root"] / "runs", name="two", train={"steps": 3})
    recipe = {k: v for k, v in base.items() if k not in ("task", "data")}
    recipe["model"] = {**base["model"], "num_classes": 0}
    recipe["tasks"] = {
        "shapes": {"task": {"name": "classification"}, "data": {**base["data"], "train": str(captions / "manifest.json"),
                                                                "val": str(captions / "manifest.json")}},
        "digits": {"task": {"name": "classification"}, "num_classes": 10, "data": base["data"]},
    }
    summary = train(validate(recipe))
    saved = yaml.safe_load((Path(summary["run_dir"]) / "recipe.yaml").read_text())
    assert saved["tasks"]["shapes"]["num_classes"] == 4  # from the manifest, written at train time
    run = _move(Path(summary["run_dir"]), place, "two", captions, digits)
    monkeypatch.chdir(place["elsewhere"])
    res = _json_out(["eval", "classification", "--checkpoint", str(run), "--task", "shapes",
                     "--data", str(place["captions"])], capsys)
    assert res["samples"] > 0
    _ok(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(place["root"] / "two-timm")], capsys)
    assert _adapt(run, digits_shards, place["root"] / "two-adapt", capsys)
    _ok(["quantize", "--checkpoint", str(run), "--task", "shapes", "--data", str(place["captions"]), *QUANTIZE,
         "--out", str(place["root"] / "two-quant")], capsys)


def test_distilled_student_without_its_teacher(place, digits_shards, monkeypatch, capsys):
    data = _private(digits_shards, place["root"] / "kd-shards")
    teacher = train(validate(tiny_recipe(data, place["root"] / "runs", name="teacher", train={"steps": 3})))
    student = train(validate(tiny_recipe(data, place["root"] / "runs", name="student", train={"steps": 3},
                                         task={"name": "distill", "distill": {"teacher": teacher["run_dir"]}})))
    run = _move(Path(student["run_dir"]), place, "student", data, Path(teacher["run_dir"]))
    monkeypatch.chdir(place["elsewhere"])
    res = _json_out(["eval", "classification", "--checkpoint", str(run), "--data", str(digits_shards)], capsys)
    assert res["samples"] == 297
    _ok(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(place["root"] / "kd-timm")], capsys)
    assert _adapt(run, digits_shards, place["root"] / "kd-adapt", capsys)
    _ok(["quantize", "--checkpoint", str(run), "--data", str(digits_shards), *QUANTIZE,
         "--out", str(place["root"] / "kd-quant")], capsys)


def test_unihcp_run_without_its_shards(place, digits_shards, monkeypatch, capsys):
    from foundation.data.synthetic_humans import generate

    train_data, eval_data = place["root"] / "humans-train", place["root"] / "humans-eval"
    generate(train_data, n=6, seed=0, views=2, size=64)
    generate(eval_data, n=4, seed=1, views=2, size=64)
    raw = yaml.safe_load((REPO / "recipes" / "unihcp" / "tiny_synthetic.yaml").read_text())
    raw["tasks"] = {k: raw["tasks"][k] for k in ("pose", "attributes")}
    for name, entry in raw["tasks"].items():
        entry["data"].update(train=str(train_data / name / "manifest.json"), val=str(train_data / name / "manifest.json"))
        entry["evals"] = []
        entry.pop("share", None)
    raw.update(output_dir=str(place["root"] / "runs"), name="unihcp")
    raw["train"].update(steps=2, log_every=1)
    summary = train(validate(raw))
    run = _move(Path(summary["run_dir"]), place, "unihcp", train_data)
    monkeypatch.chdir(place["elsewhere"])
    res = _json_out(["eval", "unihcp_pose", "--checkpoint", str(run), "--task", "pose",
                     "--data", str(eval_data / "pose" / "manifest.json")], capsys)
    assert res["samples"] > 0
    with tarfile.open(next((eval_data / "pose").glob("*.tar"))) as tar:  # a picture of a person, as a user has
        member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".png")))
        person = place["root"] / f"person{Path(member.name).suffix}"
        person.write_bytes(tar.extractfile(member).read())
    _ok(["predict", "--checkpoint", str(run), "--image", str(person), "--out", str(place["root"] / "pred")], capsys)
    assert (place["root"] / "pred" / "prediction.json").is_file()
    _ok(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(place["root"] / "unihcp-timm")], capsys)
    assert _adapt(run, digits_shards, place["root"] / "unihcp-adapt", capsys)
    # no --val: quantize evaluates on the calibration data it was given, never on the recipe's (deleted) data.val
    pose = str(eval_data / "pose" / "manifest.json")
    _ok(["quantize", "--checkpoint", str(run), "--task", "pose", "--data", pose, *QUANTIZE,
         "--out", str(place["root"] / "unihcp-quant")], capsys)
    rows = json.loads((place["root"] / "unihcp-quant" / "results.json").read_text())
    assert {r["eval"] for r in rows if r["method"] == "fp32"} == {pose}
    row = next(r for r in rows if r["method"] == "rtn")
    # the quantized model stands alone: moved, with the run it was quantized from deleted, it reloads and
    # computes what the quantize command measured (its output error against the FP network)
    from evaluation.unihcp_robustness import task_network
    from foundation.quant.runner import load_quantized
    from foundation.quant.unihcp import calibration_images, relative_error

    _, _, cfg, deploy, _ = task_network(run, "pose")
    deploy.packed = True
    calib = calibration_images(pose, cfg, 16, 16)
    quant = next((place["root"] / "unihcp-quant").rglob("quant.json")).parent
    qmoved = _move(quant, place, "unihcp-int8", run)
    again = load_quantized(qmoved)
    assert relative_error(deploy, again, calib[:32]) == pytest.approx(row["output_rel_error"], rel=1e-4, abs=1e-7)



def test_intern_generalist_without_its_experts(place, digits_shards, monkeypatch, capsys):
    """The generalist's frozen experts are saved with it: the expert weights it was built from are deleted."""
    import timm
    import torch
    from safetensors.torch import save_file

    data = _private(digits_shards, place["root"] / "intern-shards")
    kw = {"channels": [16, 32, 64, 128], "stem_width": 16}
    experts_dir = place["root"] / "intern-experts"
    experts_dir.mkdir()
    experts = []
    for i in range(2):
        torch.manual_seed(100 + i)
        experts.append(str(experts_dir / f"expert{i}.safetensors"))
        save_file(timm.create_model("resnet10t", num_classes=0, in_chans=1, **kw).state_dict(), experts[-1])
    model = {"backbone": "intern_generalist", "num_classes": 10,
             "kwargs": {"base": "resnet10t", "experts": experts, "adapter_stages": [0, 2], **kw}}
    summary = train(validate(tiny_recipe(data, place["root"] / "runs", name="generalist", model=model,
                                         train={"steps": 3})))
    run = _move(Path(summary["run_dir"]), place, "generalist", data, experts_dir)
    monkeypatch.chdir(place["elsewhere"])
    res = _json_out(["eval", "classification", "--checkpoint", str(run), "--data", str(digits_shards)], capsys)
    assert res["samples"] == 297
    _ok(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(place["root"] / "g-timm")], capsys)
    assert _adapt(run, digits_shards, place["root"] / "g-adapt", capsys)
    _ok(["quantize", "--checkpoint", str(run), "--data", str(digits_shards), *QUANTIZE,
         "--out", str(place["root"] / "g-quant")], capsys)
    export = _move(place["root"] / "g-timm", place, "g-timm")
    assert _adapt(export, digits_shards, place["root"] / "g-timm-adapt", capsys)


def test_clip_run_with_a_hugging_face_text_tower_directory(place, monkeypatch, capsys):
    """Each checkpoint holds a copy of the tower directory's config and tokenizer files (its weights are the
    checkpoint's), named relative to it: the run, its open_clip export and its quantized text tower work with
    the directory the run was trained from deleted."""
    from test_hf_text import write_tiny_bert

    from foundation.models.dual_encoder import HFTokenizer
    from foundation.quant.runner import load_quantized

    bert = write_tiny_bert(place["root"] / "tiny-bert")
    data = write_caption_shards(place["root"] / "hf-clip-shards")
    recipe = clip_recipe(data, place["root"] / "runs", "hfclip", task="clip", data={"two_view": False},
                         train={"steps": 3, "evals": []})
    recipe["model"]["dual_encoder"]["text"] = {"hf_model": str(bert), "hf_tokenizer": str(bert), "context_length": 12}
    summary = train(validate(recipe))
    step = Path(summary["checkpoint"])
    saved = yaml.safe_load((step / "recipe.yaml").read_text())["model"]["dual_encoder"]["text"]
    assert saved["hf_model"] == saved["hf_tokenizer"] == "hf_text_model"
    assert (step / "hf_text_model" / "config.json").is_file() and not list((step / "hf_text_model").glob("*.safetensors"))
    run = _move(Path(summary["run_dir"]), place, "hfclip", data, bert)
    monkeypatch.chdir(place["elsewhere"])
    zs = _json_out(["eval", "zeroshot", "--checkpoint", str(run), "--data", str(place["captions"])], capsys)
    assert zs["samples"] > 0
    _ok(["export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(place["root"] / "hfclip-oc")],
        capsys)
    _ok(["quantize", "--checkpoint", str(run), "--data", str(place["captions"]), *QUANTIZE,
         "--out", str(place["root"] / "hfclip-quant")], capsys)
    export = _move(place["root"] / "hfclip-oc", place, "hfclip-oc")
    assert _adapt(export, place["captions"], place["root"] / "hfclip-oc-adapt", capsys)
    text = next(p for p in (place["root"] / "hfclip-quant").rglob("quant.json") if p.parent.name == "text").parent
    qmoved = _move(text, place, "hfclip-int8-text", run)
    tower = load_quantized(qmoved)
    tokens = HFTokenizer(qmoved / "hf_text_model", 12)(["a photo of a square."])
    assert tower(tokens).shape[0] == 1
