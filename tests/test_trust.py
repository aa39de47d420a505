"""A checkpoint is data: evaluating one someone else wrote never runs a command or unpickles code.

Each test crafts a checkpoint the way an attacker would (a trained tiny checkpoint whose recipe.yaml
or quant.json is edited) and checks that the command refuses it with exit code 2 and that the payload
did not run (its marker file does not exist).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe

from foundation.cli import main
from foundation.config import RecipeError, validate
from foundation.train import train


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
