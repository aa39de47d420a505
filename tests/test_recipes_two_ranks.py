"""Every multi-task recipe in recipes/ (found by its ``tasks:``) trains 3 steps at world size 2 (DDP, gloo).

The recipes run as shipped except for what a test machine needs: 3 steps, fp32, no ``model.init``, tiny
data of each task's kind, small batches, no workers, a short evaluation. A paper-scale recipe (its
backbone is not a tiny one) also needs a tiny override file, ``tests/fixtures/two_ranks/`` (README there):
a new recipe without one fails here, saying so, rather than being skipped. All runs share one torchrun
(``train_driver.py --also``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_recipe
from test_equivalence import TORCHRUN, captioned_digits, humans, run  # noqa: F401 (fixtures)

FIXTURES = REPO / "tests" / "fixtures" / "two_ranks"
RECIPES = sorted(p.relative_to(REPO / "recipes") for p in (REPO / "recipes").rglob("*.yaml")
                 if "tasks" in (yaml.safe_load(p.read_text()) or {}))


def merge(into: dict, update: dict) -> dict:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v
    return into


def tiny(rel: Path, out: Path, data: dict[str, Path]) -> dict:
    raw = yaml.safe_load((REPO / "recipes" / rel).read_text())
    fixture = FIXTURES / f"{str(rel.with_suffix('')).replace('/', '__')}.yaml"
    if "tiny" not in raw["model"]["backbone"]:
        assert fixture.is_file(), f"recipes/{rel} is paper-scale: add {fixture.relative_to(REPO)} (see its README)"
    over = yaml.safe_load(fixture.read_text()) if fixture.is_file() else {}
    every = over.pop("every_task", {})
    merge(raw, over)
    raw["model"]["init"] = None
    raw.update(name=str(rel.with_suffix("")).replace("/", "__"), output_dir=str(out),
               logging={"wandb": "disabled", "progress": False})
    raw["train"] = {**raw.get("train", {}), "steps": 3, "log_every": 1, "eval_every": 3, "save_every": 3,
                    "eval_batches": 1, "precision": "fp32", "resume": "none"}
    raw["parallel"] = {"backend": "ddp"}
    for entry in raw["tasks"].values():
        merge(entry, every)
        kind = entry["task"]["name"]
        if kind in ("classification", "clip"):
            train, val = str(data["digits"] / "manifest.json"), str(data["digits"] / "train-000000.tar")
        elif kind.startswith("unihcp_"):
            task = kind.removeprefix("unihcp_")
            train = val = str(data["humans"] / task / "manifest.json")
            if task == "reid":
                val = f"{data['humans']}/reid/query-000000.tar::{data['humans']}/reid/gallery-000000.tar"
        else:
            raise AssertionError(f"recipes/{rel}: no tiny data for task kind {kind}: add one in {__file__}")
        entry["data"].update(train=train, val=val, workers=0, shuffle_buffer=32)
        entry["data"].pop("weights", None)  # per-source weights of several sources: one source here
        entry["batch_size"] = 2
    return raw


@pytest.fixture(scope="module")
def launched(tmp_path_factory, captioned_digits, humans) -> tuple[Path, dict[str, str]]:  # noqa: F811
    root = tmp_path_factory.mktemp("two_ranks")
    data = {"digits": captioned_digits, "humans": humans}
    paths = [write_recipe(root / f"{i}.yaml", tiny(rel, root, data)) for i, rel in enumerate(RECIPES)]
    also = [a for p in paths[1:] for a in ("--also", str(p))]
    run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "train_driver.py"), str(paths[0]),
         *also, "--summary-out", str(root / "sum")])
    return root, {str(rel): f".{i}" if i else "" for i, rel in enumerate(RECIPES)}


def test_the_glob_finds_the_multitask_recipes():
    assert {"multitask/vit_tiny_fmnist_cls_clip.yaml", "unihcp/tiny_synthetic.yaml",
            "unihcp/vit_base_multitask.yaml", "intern/stages/amateur_paper.yaml"} <= {str(r) for r in RECIPES}


@pytest.mark.slow
@pytest.mark.parametrize("rel", RECIPES, ids=[str(r) for r in RECIPES])
def test_recipe_runs_three_steps_at_world_size_two(launched, rel):
    root, suffix = launched
    summaries = [json.loads((root / f"sum{suffix[str(rel)]}.rank{r}.json").read_text()) for r in (0, 1)]
    for s in summaries:
        assert s["steps_this_run"] == 3 and s["nonfinite_steps"] == 0 and s["ranks_agree"], s
    assert summaries[0]["weights_sha256"] == summaries[1]["weights_sha256"]
