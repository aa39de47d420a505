"""UniHCP deployment: the tensor seam (UniHCPDeploy) computes what the network computes; FP32 ONNX in
onnxruntime equals PyTorch; PTQ reconstructs encoder blocks and decoder layers; the INT8 QDQ graph agrees
with the quantized PyTorch model; a scene's people are predicted top-down and mapped back to their boxes;
robustness / SysNoise / quantize CLIs score a UniHCP task with its own metric (slow tier)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from foundation.models.unihcp import UniHCPNet, UniHCPShared
from foundation.models.unihcp_export import OUTPUTS, UniHCPDeploy

KINDS = {"pose": 17, "parsing": 5, "attributes": 7, "reid": 3, "detection": 8}
ONNX_TOL = 1e-4  # FP32 onnxruntime vs PyTorch, absolute, on outputs of magnitude ~1


def _net(kind: str, seed: int = 0) -> UniHCPNet:
    torch.manual_seed(seed)
    enc = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=32, depth=2, num_heads=2, dynamic_img_size=True)
    shared = UniHCPShared(32, width=32, layers=2, heads=2, ffn=64, neck_norm="groupnorm")
    return UniHCPNet(kind, enc, shared, KINDS[kind], num_ids=5, det_patterns=2).eval()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_deploy_computes_what_the_network_computes(kind):
    net = _net(kind)
    net.reid_feature_norm = kind == "reid"  # the normed ReID feature path too
    x = torch.randn(2, 3, 32, 48)  # rectangular: the position grid is the input's, not a square's
    deploy = UniHCPDeploy(net, (32, 48))
    with torch.no_grad():
        ref = net(x)[-1]
        outs = deploy(x)
        deploy.packed = True
        flat = deploy(x)
    assert len(outs) == len(OUTPUTS[kind])
    for name, out in zip(OUTPUTS[kind], outs):
        torch.testing.assert_close(out, ref[name], atol=1e-5, rtol=1e-5)
    assert flat.ndim == 2
    for a, b in zip(deploy.unpack(flat), outs):
        assert torch.equal(a, b)
    # the attention projections are modules a hook-placed quantizer sees (nn.MultiheadAttention's are not)
    names = [n for n, m in deploy.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "blocks.0.cross.q" in names and "blocks.1.self_attn.out" in names


def test_onnx_fp32_equals_pytorch(tmp_path):
    from foundation.models.unihcp_export import OrtTask, export_onnx

    net = _net("parsing")
    deploy = UniHCPDeploy(net, 32)
    path = export_onnx(deploy, tmp_path / "parsing.onnx")
    x = torch.randn(3, 3, 32, 32)  # batch 3 through a graph exported at batch 1: the batch axis is dynamic
    with torch.no_grad():
        ref = net(x)[-1]
    outs = OrtTask(path)(x)
    for name, out in zip(OUTPUTS["parsing"], outs):
        assert (out - ref[name]).abs().max() < ONNX_TOL, name


def test_is_scene_tells_a_scene_from_a_single_person():
    from foundation.predict import is_scene

    img = Image.new("RGB", (100, 100))
    assert not is_scene([[0, 0, 90, 95]], img)  # one person filling the picture: today's single path
    assert is_scene([[0, 0, 30, 40]], img) and is_scene([[0, 0, 90, 95], [5, 5, 20, 20]], img)
    assert not is_scene([], img)


def _fake_tasks():
    """A pose and an attributes task on random tiny networks (no shards needed)."""
    from foundation.config import DataConfig, UniHCPConfig
    from foundation.data.humans import COCO_KEYPOINTS
    from foundation.tasks.unihcp import UniHCPAttributes, UniHCPPose

    data = DataConfig(human=True, image_size=32)
    pose = UniHCPPose(_net("pose"), UniHCPConfig(), {"kind": "pose", "keypoint_names": list(COCO_KEYPOINTS)})
    attrs = UniHCPAttributes(_net("attributes"), UniHCPConfig(), {"kind": "attributes",
                                                                  "attribute_names": [f"a{i}" for i in range(7)]})
    return {"pose": (pose.eval(), data), "attributes": (attrs.eval(), data)}


def test_scene_people_are_predicted_in_their_own_crops():
    from foundation.predict import draw_scene, predict_scene

    scene = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8))
    boxes = [[10, 20, 50, 90], [130, 10, 180, 80]]  # two people far apart
    people = predict_scene(_fake_tasks(), scene, boxes, [0.9, 0.8])
    assert len(people) == 2
    for person, box in zip(people, boxes):
        assert set(person["crops"]) == {"pose", "attributes"}
        x0, y0, x1, y1 = person["crops"]["pose"]  # the box at the pose input's aspect (1:1 here), x1.25
        assert x0 <= box[0] and x1 >= box[2] and y0 <= box[1] and y1 >= box[3]
        assert x1 - x0 == pytest.approx(y1 - y0) == pytest.approx(1.25 * max(box[2] - box[0], box[3] - box[1]))
        kps = np.asarray(person["tasks"]["pose"]["keypoints"])
        assert kps.shape == (17, 3)
        # each skeleton lies in its own person's crop (give or take a heatmap cell), mapped back to the scene; the
        # crops are disjoint
        cell = (x1 - x0) / 8
        assert (kps[:, 0] >= x0 - cell).all() and (kps[:, 0] <= x1 + cell).all()
        assert (kps[:, 1] >= y0 - cell).all() and (kps[:, 1] <= y1 + cell).all()
        assert set(person["tasks"]["attributes"]["attributes"]) == {f"a{i}" for i in range(7)}
    drawn = draw_scene(scene, people)
    assert drawn.height > scene.height  # attribute lines, one per person


# --------------------------------------------------------------------------------------------------
# slow: PTQ, INT8 ONNX, and the CLIs on a trained tiny model


@pytest.mark.slow
def test_block_reconstruction_covers_encoder_blocks_and_decoder_layers():
    from foundation.quant.config import load_quant_config
    from foundation.quant.unihcp import quantize_task, relative_error

    deploy = UniHCPDeploy(_net("pose"), 32)
    calib = torch.randn(32, 3, 32, 32)
    errors = {}
    for method in ("rtn", "brecq"):
        cfg = load_quant_config(None, {"method": method, "wbits": 4, "abits": 8, "calib_images": 32, "batch_size": 16,
                                       "reconstruction.iters": 60})
        q, packed, report = quantize_task(deploy, calib, cfg)
        errors[method] = relative_error(packed, q, calib)
        if method == "brecq":
            units = [u["unit"] for u in report["method"]["units"] if u["kind"] == "block"]
            assert units == ["encoder.blocks.0", "encoder.blocks.1", "blocks.0", "blocks.1"]
    assert errors["brecq"] < errors["rtn"]


@pytest.mark.slow
def test_int8_qdq_onnx_agrees_with_quantized_pytorch(tmp_path):
    from foundation.models.unihcp_export import OrtTask
    from foundation.quant.config import load_quant_config
    from foundation.quant.onnx_export import export_onnx
    from foundation.quant.unihcp import quantize_task

    deploy = UniHCPDeploy(_net("detection"), 32)
    calib = torch.randn(16, 3, 32, 32)
    cfg = load_quant_config(None, {"method": "rtn", "wbits": 8, "abits": 8, "calib_images": 16, "batch_size": 8})
    q, packed, _ = quantize_task(deploy, calib, cfg)
    info = export_onnx(q, calib[:1], tmp_path / "int8.onnx")
    assert info["deployment"] == "int8-qdq"
    ort = OrtTask(info["path"], unpack=deploy.unpack)
    with torch.no_grad():
        sim, fp = deploy.unpack(q(calib)), deploy(calib)
    got = ort(calib)
    for a, b, f in zip(got, sim, fp):
        assert (a - b).abs().mean() < 0.05 * (b - f).abs().mean() + 1e-3  # far closer to the simulation than FP is


@pytest.fixture(scope="module")
def attributes_run(tmp_path_factory):
    from foundation.config import load_recipe
    from foundation.data.synthetic_humans import generate
    from foundation.train import seed_everything, train

    root = tmp_path_factory.mktemp("unihcp_deploy")
    data = root / "humans"
    generate(data, n=20, seed=0, views=3, size=64)
    m = f"{data}/attributes/manifest.json"
    recipe = load_recipe("recipes/unihcp/tiny_single.yaml", [
        f"output_dir={root / 'runs'}", "name=attr", "task.name=unihcp_attributes", f"data.train={m}", f"data.val={m}",
        "train.steps=120", "train.evals=[]"])
    seed_everything(recipe.seed)
    train(recipe)
    return {"data": data, "run": recipe.run_dir}


@pytest.mark.slow
def test_robustness_cli_scores_the_task_metric(attributes_run, tmp_path, capsys):
    from foundation.cli import main as cli

    data = attributes_run["data"] / "attributes"
    out = tmp_path / "rob"
    assert cli(["eval", "robustness", "--checkpoint", str(attributes_run["run"]), "--data", str(data),
                "--corruptions", "fog", "--severities", "1", "5", "--attacks", "pgd", "--eps", "0.0157",
                "--pgd-steps", "3", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "robustness.json").read_text())
    assert res["metric"] == "mA" and res["kind"] == "attributes"
    clean = res["clean"]["mA"]
    assert res["corruptions"]["fog"]["5"]["mA"] < clean  # severity 5 hurts a trained model
    assert res["adversarial"][0]["mA"] < clean  # so does PGD up the task loss
    assert cli(["eval", "robustness", "--checkpoint", str(attributes_run["run"]), "--task", "nope",
                "--data", str(data)]) == 2


@pytest.mark.slow
def test_sysnoise_and_quantize_clis_on_a_unihcp_task(attributes_run, tmp_path):
    from foundation.cli import main as cli

    data = attributes_run["data"] / "attributes"
    assert cli(["eval", "sysnoise", "--checkpoint", str(attributes_run["run"]), "--data", str(data),
                "--axes", "colour", "precision", "--out", str(tmp_path / "sn"), "--quiet"]) == 0
    rows = json.loads((tmp_path / "sn" / "sysnoise.json").read_text())["rows"]
    by = {r["variant"]: r for r in rows}
    assert {"bgr", "yuv444", "yuv420", "bf16", "fp16"} <= set(by)
    assert all("delta" in r for r in rows if r["status"] == "ok")
    assert cli(["quantize", "--checkpoint", str(attributes_run["run"]), "--data", str(data), "--method", "rtn",
                "--wbits", "8", "--abits", "8", "--calib-images", "32", "--out", str(tmp_path / "q")]) == 0
    res = json.loads((tmp_path / "q" / "results.json").read_text())
    fp, q = res[0], res[1]
    assert fp["method"] == "fp32" and q["metric"] == "mA"
    assert abs(q["value"] - fp["value"]) < 0.05 and q["output_rel_error"] < 0.05  # W8A8 stays close


def test_report_has_a_row_per_unihcp_task(tmp_path):
    from evaluation.readiness import collect, write_report

    run = tmp_path / "runs" / "joint"
    (run / "eval" / "robustness_pose").mkdir(parents=True)
    (run / "recipe.yaml").write_text("tasks:\n  pose: {task: {name: unihcp_pose}}\n  reid: {task: {name: unihcp_reid}}\n")
    (run / "eval" / "pose.json").write_text(json.dumps({"AP": 0.5, "OKS": 0.7}))
    (run / "eval" / "robustness_pose" / "robustness.json").write_text(json.dumps(
        {"clean": {"AP": 0.5}, "mean_corrupted": 0.3,
         "adversarial": [{"attack": "pgd", "eps": 0.004, "AP": 0.4}, {"attack": "pgd", "eps": 0.016, "AP": 0.1}]}))
    q = tmp_path / "runs" / "quant" / "joint_pose"
    q.mkdir(parents=True)
    q.joinpath("results.json").write_text(json.dumps([
        {"method": "fp32", "bits": "FP32", "value": 0.5},
        {"method": "rtn", "bits": "W8A8", "value": 0.45, "delta": -0.05},
        {"method": "brecq", "bits": "W8A8", "value": 0.49, "delta": -0.01}]))
    res = collect(run)
    assert res["kind"] == "unihcp"
    rows = {r["task"]: r for r in res["unihcp"]}
    assert rows["pose"]["clean"] == 0.5 and rows["pose"]["mean_corrupted"] == 0.3
    assert rows["pose"]["pgd"] == 0.1  # the largest eps
    assert rows["pose"]["int8_method"] == "brecq" and rows["pose"]["int8_delta"] == -0.01
    assert rows["reid"]["metric"] == "mAP" and "clean" not in rows["reid"]
    missing = dict(res["missing"])
    assert "reid: robustness" in missing and "--task reid" in missing["reid: robustness"]
    assert "pose: robustness" not in missing and "pose: sysnoise" in missing
    md = write_report(res, tmp_path / "report")["md"].read_text()
    assert "UniHCP tasks" in md and "brecq" in md


def test_task_outputs_stay_in_eval_mode():
    from foundation.models.unihcp_export import TaskOutputs

    deploy = UniHCPDeploy(_net("reid"), 32)
    wrapped = TaskOutputs(deploy, "reid", module=deploy)
    wrapped.train()  # what an evaluation does on its way out when it found the module in training mode
    assert not deploy.training and not deploy.bn.training


def test_a_checkpoints_pipe_data_val_is_not_run(monkeypatch, capsys):
    """Without --data the UniHCP CLIs read the task's data.val from the checkpoint: a ``pipe:`` or URL there is
    refused in one line (webdataset would run or fetch it); a local path is taken; --data always wins."""
    import argparse
    import types

    import evaluation.unihcp_robustness as ur

    val = {"v": "pipe:curl -s http://example.invalid/x.tar"}
    monkeypatch.setattr(ur, "task_network", lambda ckpt, task, device, data=None: (
        "pose", None, types.SimpleNamespace(val=val["v"]), None, None))
    args = argparse.Namespace(checkpoint="ckpt", task="pose", data=None)
    assert ur._open_task(args, "cpu") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the checkpoint's tasks.pose.data.val is 'pipe:curl"), err
    assert ur._open_task(argparse.Namespace(checkpoint="c", task="pose", data="/mine/val"), "cpu")[2] == "/mine/val"
    val["v"] = "/data/humans/val"
    assert ur._open_task(args, "cpu")[2] == "/data/humans/val"
