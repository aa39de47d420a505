"""UniHCP through the engine: a tiny joint run of all five tasks on synthetic people lowers every task's
loss; one checkpoint serves `foundation eval unihcp_*` and `foundation predict` for every task; a
single-task fine-tune from the joint checkpoint loads every shared weight."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from foundation.cli import main as cli
from foundation.config import load_recipe
from foundation.data.shards import build_eval_loader
from foundation.data.synthetic_humans import generate
from foundation.tasks import build_task
from foundation.train import seed_everything, train

pytestmark = pytest.mark.slow  # training quality and end-to-end: the full tier (make test-all)

TASK_NAMES = ("pose", "parsing", "attributes", "reid", "detection")


def _overrides(data, out, steps=40):
    o = [f"output_dir={out}", f"train.steps={steps}", "train.log_every=10"]
    for t in TASK_NAMES:
        o.append(f"tasks.{t}.data.train={data}/{t}/manifest.json")
        val = (f"{data}/reid/query-000000.tar::{data}/reid/gallery-000000.tar" if t == "reid"
               else f"{data}/{t}/manifest.json")
        o.append(f"tasks.{t}.data.val={val}")
        o.append(f"tasks.{t}.evals=[]")
    return o


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    root = tmp_path_factory.mktemp("unihcp")
    data = root / "humans"
    generate(data, n=20, seed=0, views=3, size=64)
    recipe = load_recipe("recipes/unihcp/tiny_synthetic.yaml", _overrides(data, root / "runs"))
    seed_everything(recipe.seed)
    initial = build_task(recipe)  # the weights the run starts from (same seed)
    summary = train(recipe)
    return {"data": data, "recipe": recipe, "initial": initial, "run": recipe.run_dir, "summary": summary}


def _fixed_batch(entry, n=8):
    loader = build_eval_loader(entry.data.train, entry.data, batch_size=n, split="train")
    return next(iter(loader))


def test_joint_run_lowers_every_task_loss(joint):
    from foundation.engine.checkpoint import load_task

    trained, _, _ = load_task(joint["run"])
    initial = joint["initial"]
    for name, entry in joint["recipe"].tasks.items():
        batch = _fixed_batch(entry)
        losses = []
        for whole in (initial, trained):
            task = whole.tasks[name]
            task.train()
            torch.manual_seed(0)  # the same sampled points (parsing) for both
            with torch.no_grad():
                losses.append(float(task(batch)["loss"]))
        assert losses[1] < losses[0], f"{name}: loss {losses[0]:.4f} -> {losses[1]:.4f}"
    assert joint["summary"]["nonfinite_steps"] == 0


@pytest.mark.parametrize("name", TASK_NAMES)
def test_eval_cli_serves_every_task(joint, name, capsys):
    data = joint["data"]
    spec = f"{data}/reid/query-000000.tar::{data}/reid/gallery-000000.tar" if name == "reid" else f"{data}/{name}"
    assert cli(["eval", f"unihcp_{name}", "--checkpoint", str(joint["run"]), "--task", name, "--data", spec,
                "--batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the figure is the trained checkpoint's own task head on that data (not another task's, not initial weights)
    from evaluation import EVALS
    from foundation.engine.checkpoint import load_task

    trained, _, _ = load_task(joint["run"])
    loader = build_eval_loader(spec, joint["recipe"].tasks[name].data, batch_size=8, split="val")
    expected = EVALS[f"unihcp_{name}"](trained.tasks[name].model.eval(), loader, "cpu")
    key = {"pose": "AP", "parsing": "mIoU", "attributes": "mA", "reid": "mAP", "detection": "AP50"}[name]
    assert key in expected
    # every figure, the continuous ones too (mean OKS, accuracies): a tiny run's AP may be 0 with any weights
    assert {k: result[k] for k in expected} == pytest.approx(expected, abs=1e-6)
    if name == "reid":
        assert result["queries"] > 0 and result["gallery"] > result["queries"]
    else:
        assert result["samples"] > 0


def test_predict_draws_every_task(joint, tmp_path):
    from foundation.data.shards import iter_raw_samples
    from foundation.predict import draw_prediction, predict_image, unihcp_tasks

    raw = next(iter_raw_samples(str(joint["data"] / "detection"), "val"))
    image_path = tmp_path / "scene.png"
    image_path.write_bytes(raw["png"])
    assert cli(["predict", "--checkpoint", str(joint["run"]), "--image", str(image_path), "--task", "all",
                "--out", str(tmp_path / "pred"), "--score-threshold", "0", "--mode", "single"]) == 0
    out = tmp_path / "pred"
    summary = json.loads((out / "prediction.json").read_text())
    assert set(TASK_NAMES) <= set(summary)
    emb = np.load(out / "reid_embedding.npy", allow_pickle=False)
    assert emb.ndim == 1 and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-4)
    assert Image.open(out / "prediction.png").size[1] > Image.open(image_path).size[1]  # attribute lines below
    # each task's drawing changes the picture on its own
    image = Image.open(image_path).convert("RGB")
    tasks, _ = unihcp_tasks(joint["run"])
    results = predict_image(tasks, image, score_threshold=0.0)
    base = np.asarray(image)
    for name in TASK_NAMES:
        drawn = np.asarray(draw_prediction(image, {name: results[name]}))
        if name in ("attributes", "reid"):  # text lines under the image
            assert drawn.shape[0] > base.shape[0], name
        else:
            assert drawn.shape == base.shape and (drawn != base).any(), name
    assert len(results["detection"]["boxes"]) > 0
    assert len(results["pose"]["keypoints"]) == 17
    assert cli(["predict", "--checkpoint", str(joint["run"]), "--image", str(tmp_path / "missing.png")]) == 2
    assert cli(["predict", "--checkpoint", str(joint["run"]), "--image", str(image_path), "--task", "nope"]) == 2


def test_scene_graph_and_predict_scene_agree_on_the_trained_run(joint, tmp_path):
    """A trained checkpoint's scene pipeline (issue 24 items 3, 7): ``export --format unihcp_scene`` writes an inert
    folder (the ONNX graph and JSON) whose people, run in onnxruntime, are ``predict --mode scene``'s people."""
    from foundation.data.shards import iter_raw_samples
    from foundation.predict import image_tensor
    from foundation.quant.onnx_export import ort_session

    raw = next(iter_raw_samples(str(joint["data"] / "detection"), "val"))
    image_path = tmp_path / "scene.png"
    image_path.write_bytes(raw["png"])
    image = Image.open(image_path).convert("RGB")
    graph = tmp_path / "graph"
    assert cli(["export", "--checkpoint", str(joint["run"]), "--format", "unihcp_scene", "--out", str(graph),
                "--scene-size", str(image.height), str(image.width), "--score-threshold", "0"]) == 0
    assert sorted(p.name for p in graph.iterdir()) == ["scene.json", "scene.onnx"]
    info = json.loads((graph / "scene.json").read_text())
    assert set(info["tasks"]) == {"pose", "parsing", "attributes", "reid"} and info["detector"] == "detection"
    assert max(info["onnxruntime_max_abs_diff"].values()) < 1e-3
    assert cli(["predict", "--checkpoint", str(joint["run"]), "--image", str(image_path), "--mode", "scene",
                "--score-threshold", "0", "--out", str(tmp_path / "pred")]) == 0
    people = json.loads((tmp_path / "pred" / "prediction.json").read_text())["people"]
    outs = dict(zip(info["outputs"], ort_session(graph / "scene.onnx").run(None, {"image": image_tensor(image).numpy()})))
    valid = outs["valid"]
    assert len(people) == int(valid.sum()) > 0
    for key, name in (("box", "boxes"), ("score", "scores"), ("keypoints", "pose.keypoints")):
        np.testing.assert_allclose([p[key] for p in people], outs[name][valid], rtol=1e-5, atol=1e-3, err_msg=key)
    emb = np.load(tmp_path / "pred" / "reid_embeddings.npy", allow_pickle=False)
    np.testing.assert_allclose(emb, outs["reid.feature"][valid], atol=1e-4)


def test_single_task_finetune_loads_every_shared_weight(joint, tmp_path):
    from foundation.engine.transfer import apply_init

    recipe = load_recipe("recipes/unihcp/tiny_finetune_pose.yaml", [
        f"output_dir={tmp_path}", f"model.init.path={joint['run']}", "train.steps=2",
        f"data.train={joint['data']}/pose/manifest.json", f"data.val={joint['data']}/pose/manifest.json",
    ])
    task = build_task(recipe)
    report = apply_init(task, recipe.model.init)
    assert report.missing == [] and report.mismatched == []
    own = dict(task.named_parameters())
    assert any(k.startswith("model.encoder.blocks.") for k in own) and any(k.startswith("model.shared.layers.") for k in own)
    from foundation.engine.checkpoint import load_task

    whole, _, _ = load_task(joint["run"])
    joint_params = dict(whole.named_parameters())
    assert torch.equal(own["model.encoder.blocks.0.attn.qkv.weight"], joint_params["backbone.blocks.0.attn.qkv.weight"])
    assert torch.equal(own["model.shared.layers.0.cross.in_proj_weight"], joint_params["shared.unihcp.layers.0.cross.in_proj_weight"])
    assert torch.equal(own["model.query_pos"], joint_params["tasks.pose.model.query_pos"])
    # and it trains from there
    summary = train(recipe)
    assert summary["steps"] == 2 and summary["nonfinite_steps"] == 0


def test_shared_weights_are_stored_once(joint):
    whole = joint["initial"]
    names = [n for n, _ in whole.named_parameters()]
    assert any(n.startswith("shared.unihcp.layers.") for n in names)
    assert not any(n.startswith("tasks.") and (".encoder." in n or ".shared." in n) for n in names)
    own = {t: sum(p.numel() for n, p in whole.named_parameters() if n.startswith(f"tasks.{t}.")) for t in TASK_NAMES}
    assert own["pose"] == 2 * 17 * 64  # the 17 joint queries (content + position): nothing else is pose's own


def test_groups_on_two_ranks_equals_mix(joint, tmp_path):
    """The paper's form: one group of ranks per task (pose uses the neck, detection does not); the shared ViT and
    decoder averaged over all ranks, each task's queries within its group — the weights one process gets with mix."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "recipes/unihcp/tiny_synthetic.yaml").read_text())
    raw["tasks"] = {k: v for k, v in raw["tasks"].items() if k in ("pose", "detection")}
    for name, entry in raw["tasks"].items():
        entry["share"] = 0.5
        entry["evals"] = []
        entry["data"]["train"] = f"{joint['data']}/{name}/manifest.json"
        entry["data"]["val"] = None
    raw["train"].update(steps=3, log_every=1, clip_grad=0.5)
    raw["output_dir"] = str(tmp_path)
    paths = {}
    for schedule in ("mix", "groups"):
        raw["train"]["schedule"], raw["name"] = schedule, schedule
        paths[schedule] = tmp_path / f"{schedule}.yaml"
        paths[schedule].write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = str(repo / "tests" / "train_driver.py")
    a = subprocess.run([sys.executable, driver, str(paths["mix"])], capture_output=True, text=True, cwd=repo, env=env,
                       timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    b = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", driver, str(paths["groups"])],
                       capture_output=True, text=True, cwd=repo, env=env, timeout=600)
    assert b.returncode == 0, b.stderr[-5000:]
    wa = load_file(str(tmp_path / "mix/checkpoints/step_3/model.safetensors"))
    wb = load_file(str(tmp_path / "groups/checkpoints/step_3/model.safetensors"))
    assert wa.keys() == wb.keys() and any(k.startswith("shared.unihcp.neck.") for k in wa)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), (k, (wa[k] - wb[k]).abs().max())
