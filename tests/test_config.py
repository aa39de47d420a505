"""Recipes: typed, validated at load, with the key path and the valid choices in every error."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, REPO
from foundation.cli import main
from foundation.config import RecipeError, apply_override, load_recipe
from foundation.train import load_checked


def write(tmp_path: Path, name: str, data: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_path_and_suggests(tmp_path):
    p = write(tmp_path, "r.yaml", {"optim": {"lrr": 0.1}})
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "optim.lrr" in msg and "did you mean 'lr'" in msg and "warmup_steps" in msg


def test_wrong_type_names_path(tmp_path):
    p = write(tmp_path, "r.yaml", {"train": {"steps": "many"}})
    with pytest.raises(RecipeError, match=r"train\.steps: .*valid integer"):
        load_recipe(p)


def test_bad_choice_lists_choices_and_suggests(tmp_path):
    p = write(tmp_path, "r.yaml", {"train": {"precision": "bf61"}, "task": {"name": "clasification"}})
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "train.precision" in msg and "'fp32', 'bf16' or 'fp16'" in msg
    # registry names are checked where the registries live (foundation.train), still before any work
    p = write(tmp_path, "r.yaml", {"task": {"name": "clasification"}, "train": {"evals": ["zeroshto"]}})
    with pytest.raises(RecipeError) as e:
        load_checked(p)
    msg = str(e.value)
    assert "task.name" in msg and "did you mean 'classification'" in msg
    assert "train.evals.0" in msg and "did you mean 'zeroshot'" in msg


def test_override_of_missing_key(tmp_path):
    p = write(tmp_path, "r.yaml", {})
    with pytest.raises(RecipeError, match=r"train\.stepz: no such key \(did you mean 'steps'\?\)"):
        load_recipe(p, ["train.stepz=3"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(p, ["train.steps"])


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    p = write(tmp_path, "r.yaml", {"optim": {"lr": 0.1}})
    r = load_recipe(p, ["optim.lr=3e-4", "train.steps=7", "optim.betas=[0.9, 0.98]", "model.kwargs.depth=2"])
    assert r.optim.lr == 3e-4 and r.train.steps == 7 and r.optim.betas == (0.9, 0.98)
    assert r.model.kwargs == {"depth": 2}  # free-form dicts accept any key
    with pytest.raises(RecipeError, match="optim.lr"):
        load_recipe(p, ["optim.lr=-1"])


def test_base_inheritance_one_level(tmp_path):
    write(tmp_path, "base.yaml", {"name": "b", "optim": {"lr": 0.5, "weight_decay": 0.2}, "train": {"steps": 9}})
    child = write(tmp_path, "child.yaml", {"base": "base.yaml", "name": "c", "optim": {"lr": 0.1}})
    r = load_recipe(child)
    assert (r.name, r.optim.lr, r.optim.weight_decay, r.train.steps) == ("c", 0.1, 0.2, 9)
    write(tmp_path, "grand.yaml", {"base": "child.yaml"})
    with pytest.raises(RecipeError, match="one level"):
        load_recipe(tmp_path / "grand.yaml")


def test_weights_must_match_sources(tmp_path):
    p = write(tmp_path, "r.yaml", {"data": {"train": "a::b", "weights": [1.0]}})
    with pytest.raises(RecipeError, match="data.weights"):
        load_recipe(p)


def test_cli_exit_code_2_and_message(tmp_path, capsys):
    p = write(tmp_path, "r.yaml", {"trian": {}})
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert "trian: unknown key (did you mean 'train'?)" in err


@pytest.mark.slow
def test_recipes_check_cli(tmp_path):
    good = write(tmp_path, "good.yaml", {"name": "x"})
    bad = write(tmp_path, "bad.yaml", {"optim": {"lr": "fast"}})
    out = subprocess.run([PYTHON, "-m", "foundation.cli", "recipes", "check", str(good), str(bad)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "ok    " + str(good) in out.stdout and "optim.lr" in out.stdout and "1 valid, 1 invalid" in out.stdout


def test_every_recipe_in_repo_validates():
    """Each recipe by its kind's schema (the directory names the kind: quant/, adapt/, intern/, else training)."""
    from foundation.cli import recipe_loaders

    loaders = recipe_loaders()
    files = sorted((REPO / "recipes").rglob("*.yaml"))
    assert files, "no recipes found"
    kinds = set()
    for f in files:
        kind = f.parent.name if f.parent.name in loaders else "training"
        loaders[kind](f)
        kinds.add(kind)
    assert {"training", "quant"} <= kinds


def test_apply_override_creates_nested_sections():
    data: dict = {}
    apply_override(data, "data.augment.hflip=0.0")
    assert data == {"data": {"augment": {"hflip": 0.0}}}
