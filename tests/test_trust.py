"""A checkpoint is data: evaluating one someone else wrote never runs a command or unpickles code.

Each test crafts a checkpoint the way an attacker would (a trained tiny checkpoint whose recipe.yaml
or quant.json is edited) and checks that the command refuses it with exit code 2 and that the payload
did not run (its marker file does not exist).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe

from foundation.cli import main
from foundation.config import RecipeError, validate
from foundation.train import train
from foundation.trust import (
    ArtefactRefused, check_open_clip_config, check_recipe, check_timm_export, hubs_offline, inside, model_kwargs,
    output_under, read_artefact_yaml, timm_name,
)


class _Payload:
    """Unpickling this creates ``marker``: the proof that a load executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trusted")
    recipe = tiny_recipe(digits_shards, root, name="victim", train={"steps": 2, "log_every": 1})
    summary = train(validate(recipe))
    return Path(summary["checkpoint"])


def _tampered(trained: Path, tmp_path: Path, edit) -> Path:
    ckpt = tmp_path / "step_2"
    shutil.copytree(trained, ckpt)
    recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    edit(recipe)
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return ckpt


@pytest.mark.parametrize("command", ["sysnoise", "robustness"])
def test_pipe_in_checkpoint_data_is_not_run(trained, tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    ckpt = _tampered(trained, tmp_path, lambda r: r["data"].update(val=f"pipe:touch {marker}; cat /dev/null"))
    extra = ["--corruptions", "none", "--attacks", "none"] if command == "robustness" else []
    code = main(["eval", command, "--checkpoint", str(ckpt), "--max-samples", "4", "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.val" in err and "--data" in err and "Traceback" not in err
    assert not marker.exists()


def test_url_in_checkpoint_data_is_refused_but_local_data_is_used(trained, digits_shards, tmp_path, capsys):
    ckpt = _tampered(trained, tmp_path, lambda r: r["data"].update(val="https://example.invalid/val-{000..009}.tar"))
    assert main(["eval", "sysnoise", "--checkpoint", str(ckpt), "--max-samples", "4", "--quiet"]) == 2
    assert "command or URL" in capsys.readouterr().err
    # the same checkpoint with the data named on the command line evaluates normally
    local = _tampered(trained, tmp_path / "local", lambda r: r["data"].update(val=str(digits_shards)))
    assert main(["eval", "sysnoise", "--checkpoint", str(local), "--max-samples", "4", "--quiet",
                 "--axes", "precision", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "sysnoise.json").is_file()


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_timm_file_loading_kwargs_from_a_checkpoint_are_refused(trained, digits_shards, tmp_path, capsys, key):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    value = str(evil) if key == "checkpoint_path" else {"file": str(evil)}
    ckpt = _tampered(trained, tmp_path, lambda r: r["model"]["kwargs"].update({key: value}))
    code = main(["eval", "classification", "--checkpoint", str(ckpt), "--data", str(digits_shards)])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "model.init" in err and "Traceback" not in err
    assert not marker.exists()


def test_file_loading_kwargs_in_a_recipe_fail_at_load_with_the_key_path(digits_shards, tmp_path):
    recipe = tiny_recipe(digits_shards, tmp_path)
    recipe["model"]["kwargs"]["checkpoint_path"] = "x.pth"
    with pytest.raises(RecipeError, match=r"model\.kwargs: .*checkpoint_path"):
        validate(recipe)


def test_quantized_checkpoint_kwargs_are_refused(tmp_path):
    from foundation.quant.runner import build_architecture

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="checkpoint_path"):
        build_architecture({"source": "timm", "name": "resnet10t", "kwargs": {"checkpoint_path": str(evil)}})
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# the artefact gate (foundation/trust.py): unit tests, no process started


@pytest.mark.parametrize("name", ["hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp/model", "https://x.invalid/m",
                                  "/etc/passwd", "../resnet18", "timm/resnet18", "no_such_model", "", None, 3])
def test_model_names_must_be_registered_here(name):
    with pytest.raises(ArtefactRefused, match="model.backbone"):
        timm_name(name, "model.backbone")


def test_registered_names_pass_ours_included():
    assert timm_name("resnet10t", "x") == "resnet10t"
    assert timm_name("ceit_test", "x") == "ceit_test"
    assert timm_name("intern_generalist", "x") == "intern_generalist"


def test_kwargs_pass_the_family_allow_list_only():
    ok = {"channels": [16, 32, 64, 128], "stem_width": 16, "global_pool": "avg"}
    assert model_kwargs("resnet10t", ok, "k") == ok
    assert model_kwargs("vit_tiny_patch16_224", {"embed_dim": 64, "depth": 2}, "k") == {"embed_dim": 64, "depth": 2}
    # keys no deny-list names: an allow-list refuses them all the same
    for key in ("checkpoint_path", "pretrained_cfg_overlay", "cache_dir", "block", "norm_layer", "act_layer",
                "embed_layer", "weight_init", "device"):
        with pytest.raises(ArtefactRefused, match=rf"k\.{key}: not an allowed argument for"):
            model_kwargs("vit_tiny_patch16_224", {key: "x"}, "k")
    with pytest.raises(ArtefactRefused, match="not a plain value"):
        model_kwargs("resnet10t", {"global_pool": "/etc/passwd"}, "k")
    with pytest.raises(ArtefactRefused, match="plain data"):
        model_kwargs("resnet10t", {"global_pool": object()}, "k")


def test_generalist_base_and_experts_are_gated(tmp_path):
    with pytest.raises(ArtefactRefused, match=r"k\.base: 'hf-hub:timm/vit_tiny_patch16_224'"):
        model_kwargs("intern_generalist", {"base": "hf-hub:timm/vit_tiny_patch16_224", "experts": []}, "k", tmp_path)
    with pytest.raises(ArtefactRefused, match="cannot be the base of a generalist"):
        model_kwargs("intern_generalist", {"base": "intern_generalist"}, "k", tmp_path)
    with pytest.raises(ArtefactRefused, match=r"k\.checkpoint_path"):  # base's own kwargs pass base's family list
        model_kwargs("intern_generalist", {"base": "vit_tiny_patch16_224", "checkpoint_path": "x"}, "k", tmp_path)
    # expert paths are never opened from an artefact: the checkpoint holds the experts' weights, the list only
    # says how many to build (whatever it names: outside paths, hub strings)
    for experts in (["../../elsewhere"], ["hf-hub:org/x", "/etc/passwd"], 3):
        out = model_kwargs("intern_generalist", {"experts": experts}, "k", tmp_path)
        assert out["experts"] == (experts if isinstance(experts, int) else len(experts))
    with pytest.raises(ArtefactRefused, match=r"k\.experts"):
        model_kwargs("intern_generalist", {"experts": "elsewhere"}, "k", tmp_path)
    out = model_kwargs("intern_generalist", {"base": "vit_tiny_patch16_224", "experts": ["e"], "embed_dim": 64}, "k",
                       tmp_path)
    assert out == {"base": "vit_tiny_patch16_224", "experts": 1, "embed_dim": 64}


def test_a_checkpoint_recipe_includes_no_other_file(tmp_path):
    (tmp_path / "recipe.yaml").write_text("base: /home/user/secret.yaml\nname: x\n")
    with pytest.raises(ArtefactRefused, match="base: a recipe read from a checkpoint includes no other file"):
        read_artefact_yaml(tmp_path / "recipe.yaml")
    (tmp_path / "recipe.yaml").write_text("name: x\n")
    assert read_artefact_yaml(tmp_path / "recipe.yaml") == {"name": "x"}


def test_checkpoint_recipe_model_section_is_gated(tmp_path):
    for model, match in (({"backbone": "hf-hub:timm/resnet18"}, "model.backbone"),
                         ({"backbone": "resnet10t", "kwargs": {"pretrained": True}}, "model.kwargs.pretrained"),
                         ({"backbone": "resnet10t", "dual_encoder": {"vision_open_clip": "hf-hub:x/y"}},
                          "vision_open_clip"),
                         ({"backbone": "resnet10t", "dual_encoder": {"text": {"hf_model": "bert-base-uncased"}}},
                          "text.hf_model")):
        with pytest.raises(ArtefactRefused, match=match):
            check_recipe({"model": model}, tmp_path, "r")


def test_a_checkpoint_names_its_hf_text_tower_inside_itself(tmp_path):
    """Training copies a Hugging Face text tower's config and tokenizer files (no weights, no code) into each
    checkpoint and names them relative to it; the gate reads such a directory only inside the checkpoint."""
    from foundation.trust import bundle_text_tower

    tower, step, outside = tmp_path / "bert", tmp_path / "step_3", tmp_path / "elsewhere"
    for d in (tower, step, outside):
        d.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "model.safetensors", "pytorch_model.bin",
                 "modeling_evil.py"):
        (tower / name).write_text("{}")
    raw = {"model": {"backbone": "resnet10t", "dual_encoder": {"text": {"hf_model": str(tower),
                                                                        "hf_tokenizer": str(tower)}}}}
    saved = yaml.safe_load(bundle_text_tower(yaml.safe_dump(raw), step))
    assert saved["model"]["dual_encoder"]["text"] == {"hf_model": "hf_text_model", "hf_tokenizer": "hf_text_model"}
    assert sorted(p.name for p in (step / "hf_text_model").iterdir()) == ["config.json", "tokenizer_config.json",
                                                                         "vocab.txt"]
    text = check_recipe(saved, step, "r")["model"]["dual_encoder"]["text"]
    assert text["hf_model"] == text["hf_tokenizer"] == str((step / "hf_text_model").resolve())
    assert bundle_text_tower("model: {backbone: resnet10t}\n", step) == "model: {backbone: resnet10t}\n"
    # a directory outside the checkpoint (absolute or ../), or one that is not there, is refused
    for path, match in ((str(outside), "lies outside"), ("../elsewhere", "lies outside"),
                        ("hf_tokenizer", "not a directory inside")):
        with pytest.raises(ArtefactRefused, match=match):
            check_recipe({"model": {"backbone": "resnet10t", "dual_encoder": {"text": {"hf_model": path}}}}, step, "r")


def test_a_model_init_source_run_passes_the_gate_too(tmp_path):
    """model.init from a run reads only the source's task layout and weights, but its recipe is gated all the
    same: a crafted source run is refused as every other command refuses it."""
    from safetensors.torch import save_file
    import torch

    from foundation.checkpoint_io import source_tensors

    step = tmp_path / "step_1"
    step.mkdir()
    save_file({"w": torch.zeros(1)}, str(step / "model.safetensors"))
    (step / "recipe.yaml").write_text("model: {backbone: resnet10t}\ntask: {name: classification}\n")
    assert set(source_tensors(step, "all")) == {"model.w"}
    (step / "recipe.yaml").write_text("model: {backbone: 'hf-hub:timm/resnet18.a1_in1k'}\n")
    with pytest.raises(ArtefactRefused, match="model.backbone"):
        source_tensors(step, "all")


def test_timm_export_config_is_gated(tmp_path):
    good = {"architecture": "resnet10t", "num_classes": 0, "in_chans": 1, "kwargs": {"stem_width": 16},
            "pretrained_cfg": {"input_size": [1, 32, 32], "mean": [0.5], "std": [0.5], "interpolation": "bilinear",
                               "crop_pct": 1.0}, "note": "x"}
    assert check_timm_export(good, tmp_path)["kwargs"] == {"stem_width": 16}
    for edit, match in (({"architecture": "hf-hub:timm/resnet18"}, "architecture"),
                        ({"kwargs": {"checkpoint_path": "/x.pth"}}, "kwargs.checkpoint_path"),
                        ({"pretrained_cfg": {"hf_hub_id": "timm/x"}}, "pretrained_cfg.hf_hub_id"),
                        ({"file": "x"}, r"config.json\.file"),
                        ({"num_classes": "10"}, "num_classes")):
        with pytest.raises(ArtefactRefused, match=match):
            check_timm_export({**good, **edit}, tmp_path)


def test_open_clip_export_config_is_gated(tmp_path):
    (tmp_path / "text").mkdir()
    good = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                          "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}},
            "preprocess_cfg": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}}
    assert check_open_clip_config(good, tmp_path) == good
    local = {**good, "model_cfg": {**good["model_cfg"], "text_cfg": {"hf_model_name": "text", "width": 32}}}
    assert check_open_clip_config(local, tmp_path)["model_cfg"]["text_cfg"]["hf_model_name"] == str(tmp_path / "text")

    def edited(part, **kv):
        cfg = json.loads(json.dumps(good))
        cfg["model_cfg"][part].update(kv)
        return cfg

    for cfg, match in ((edited("text_cfg", hf_model_name="bert-base-uncased"), "not a directory inside the export"),
                       (edited("text_cfg", hf_model_name="hf-hub:org/bert"), "not a path inside"),
                       (edited("text_cfg", hf_model_pretrained=True), "hf_model_pretrained"),
                       (edited("text_cfg", hf_tokenizer_name="/etc"), "outside the artefact"),
                       (edited("vision_cfg", timm_model_name="hf-hub:timm/vit_tiny_patch16_224"), "timm_model_name"),
                       (edited("vision_cfg", timm_model_pretrained=True), "timm_model_pretrained"),
                       (edited("vision_cfg", norm_kwargs={"device": "meta"}), r"norm_kwargs\.device: not an allowed key"),
                       (edited("vision_cfg", embed_layer="x"), r"vision_cfg\.embed_layer: not an allowed key")):
        with pytest.raises(ArtefactRefused, match=match):
            check_open_clip_config(cfg, tmp_path)


def test_quant_json_arch_is_gated(tmp_path):
    from foundation.quant.config import check_arch

    assert check_arch({"source": "timm", "name": "resnet10t", "kwargs": {"stem_width": 16}}, tmp_path)["name"] == "resnet10t"
    for arch, match in (({"source": "timm", "name": "hf-hub:timm/resnet18"}, r"arch\.name"),
                        ({"source": "timm", "name": "resnet10t", "kwargs": {"pretrained_cfg": {}}}, "pretrained_cfg"),
                        ({"source": "recipe", "model": {"backbone": "local-dir:/x"}}, "backbone"),
                        ({"source": "pickle"}, r"arch\.source")):
        with pytest.raises(ArtefactRefused, match=match):
            check_arch(arch, tmp_path)


def test_paths_stay_inside(tmp_path):
    assert inside("a/b", tmp_path, "w") == (tmp_path / "a" / "b").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x", "https://x.invalid/a", "pipe:cat x"):
        with pytest.raises(ArtefactRefused):
            inside(bad, tmp_path, "w")
    assert output_under(tmp_path / "run" / "eval", [tmp_path / "run"], "w") == (tmp_path / "run" / "eval").resolve()
    with pytest.raises(ArtefactRefused, match="--out"):
        output_under(tmp_path / "elsewhere", [tmp_path / "run"], "w")


def test_hubs_are_offline_unless_the_user_opts_in():
    env = {}
    assert hubs_offline(env) and env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    env = {"FOUNDATION_ALLOW_HUB": "1"}
    assert not hubs_offline(env) and "HF_HUB_OFFLINE" not in env


def test_a_hub_backbone_in_a_checkpoint_is_one_error_line(trained, digits_shards, tmp_path, capsys):
    ckpt = _tampered(trained, tmp_path, lambda r: r["model"].update(backbone="hf-hub:timm/resnet18.a1_in1k"))
    code = main(["eval", "classification", "--checkpoint", str(ckpt), "--data", str(digits_shards)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "model.backbone" in err and "hf-hub:timm/resnet18.a1_in1k" in err


@pytest.mark.slow  # builds a BERT tower and open_clip's model (imports transformers)
def test_an_open_clip_export_carries_its_hf_text_tower(tmp_path):
    """An open_clip export of a Hugging Face text tower copies the tower's directory (config, tokenizer; no
    weights) inside itself and names it relative to itself: moved, with the original directory deleted, it
    passes the gate (directories inside the export only) and rebuilds."""
    from test_clip import clip_recipe
    from test_hf_text import write_tiny_bert

    from foundation.adapt.backbone import load_backbone
    from foundation.export import export_open_clip
    from foundation.models.dual_encoder import build_dual_encoder

    bert = write_tiny_bert(tmp_path / "bert")
    raw = clip_recipe(tmp_path / "shards", tmp_path / "runs", "hfclip", task="clip", data={"two_view": False})
    raw["model"]["dual_encoder"]["text"] = {"hf_model": str(bert), "hf_tokenizer": str(bert), "context_length": 12}
    recipe = validate(raw)
    model = build_dual_encoder(recipe.model, in_chans=recipe.data.in_chans).eval()
    export_open_clip(model, recipe, tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert saved["hf_model_name"] == saved["hf_tokenizer_name"] == "hf_text_model"
    assert not list((tmp_path / "export" / "hf_text_model").glob("*.safetensors"))
    moved = shutil.move(tmp_path / "export", tmp_path / "elsewhere")
    shutil.rmtree(bert)
    backbone = load_backbone(str(moved))
    assert backbone.module(torch.zeros(1, 3, 32, 32)).shape[0] == 1
