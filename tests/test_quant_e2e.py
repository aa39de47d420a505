"""Post-training quantization end to end: a tiny trained ResNet at W8A8, ONNX QDQ in onnxruntime, the CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import tiny_recipe
from foundation.quant.calibrate import predict
from foundation.quant.config import load_quant_config
from foundation.quant.onnx_export import (export_fp32_onnx, export_onnx, fused_op_counts, ort_predict,
                                          ort_quantize_static, ort_session)
from foundation.quant.runner import load_quantized, quantize

SMALL_RESNET = dict(num_classes=10, in_chans=1, channels=(16, 32, 64, 128), stem_width=16)


@pytest.fixture(scope="module")
def digits_model():
    """timm resnet10t (narrow) trained on scikit-learn digits at 16 px: (model, calibration images, test set)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, size=16, mode="bilinear",
                      align_corners=False)
    x, y = (x - 0.3) / 0.35, torch.tensor(d.target)
    order = torch.randperm(len(y))
    x, y = x[order], y[order]
    model = timm.create_model("resnet10t", **SMALL_RESNET)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        idx = torch.randint(0, 1400, (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x[:1400], x[1400:], y[1400:]


def test_w8a8_within_one_point_and_onnx_qdq_agrees(digits_model, tmp_path):
    model, train_x, test_x, test_y = digits_model
    fp_acc = float((predict(model, test_x).argmax(1) == test_y).float().mean())
    assert fp_acc > 0.85  # the model really learned something

    cfg = load_quant_config(None, {"method": "rtn", "calib_images": 256})
    qmodel, _, report = quantize(model, train_x, cfg)
    sim = predict(qmodel, test_x)
    q_acc = float((sim.argmax(1) == test_y).float().mean())
    assert q_acc >= fp_acc - 0.01, (fp_acc, q_acc)
    assert report["calib_images"] == 256 and len(report["folded_bn"]) == 15

    info = export_onnx(qmodel, test_x[:1], tmp_path / "w8a8.onnx")
    assert info["deployment"] == "int8-qdq" and info["float_fake_quantizers"] == 0
    graph = onnx.load(info["path"]).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "Round" not in ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)  # integer weights
    fused = fused_op_counts(info["path"])  # what onnxruntime runs: every conv and residual add on int8 kernels
    assert fused.get("QLinearConv", 0) == 15 and fused.get("QLinearAdd", 0) == 4, fused
    assert not {"Conv", "FusedConv", "Add"} & set(fused), fused
    deployed = ort_predict(ort_session(info["path"], threads=1), test_x)
    agree = float((deployed.argmax(1) == sim.argmax(1).numpy()).mean())
    assert agree >= 0.99, agree

    fp32 = export_fp32_onnx(model, test_x[:1], tmp_path / "fp32.onnx")
    assert np.allclose(ort_predict(ort_session(fp32), test_x[:8]), predict(model, test_x[:8]).numpy(), atol=1e-4)
    baseline = ort_quantize_static(fp32, train_x[:64], tmp_path / "ort_int8.onnx")
    base_acc = float((ort_predict(ort_session(baseline), test_x).argmax(1) == test_y.numpy()).mean())
    assert base_acc > 0.8


def test_low_bits_export_as_fake_quantized_float_graph(digits_model, tmp_path):
    model, train_x, test_x, _ = digits_model
    cfg = load_quant_config(None, {"method": "rtn", "wbits": 4, "abits": 4, "first_last_bits": None,
                                   "calib_images": 128, "observers.weight": "minmax"})
    qmodel, _, _ = quantize(model, train_x, cfg)
    info = export_onnx(qmodel, test_x[:1], tmp_path / "w4a4.onnx")
    assert info["deployment"] == "fake-quant float graph" and info["qdq_quantizers"] == 0
    ops = {n.op_type for n in onnx.load(info["path"]).graph.node}
    assert "QuantizeLinear" not in ops and {"Round", "Clip"} <= ops
    sim = predict(qmodel, test_x).argmax(1).numpy()
    deployed = ort_predict(ort_session(info["path"], threads=1), test_x).argmax(1)
    assert float((deployed == sim).mean()) >= 0.99


def test_vit_w8a8_onnx_matches_simulation(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(32, 1, 32, 32)
    qmodel, _, _ = quantize(model, x, load_quant_config(None, {"calib_images": 32, "outlier.enabled": True,
                                                              "outlier.fine_iters": 0}))
    info = export_onnx(qmodel, x[:1], tmp_path / "vit.onnx")
    assert info["deployment"] == "int8-qdq"
    sim = predict(qmodel, x).numpy()
    deployed = ort_predict(ort_session(info["path"], threads=1), x)
    assert np.abs(deployed - sim).max() <= 0.05 * np.abs(sim).max()


@pytest.mark.slow
def test_quantize_cli_end_to_end(digits_shards, tmp_path, monkeypatch):
    from foundation.cli import main
    from foundation.config import validate
    from foundation.train import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # never reach the network, even with a netrc
    recipe = validate(tiny_recipe(digits_shards, tmp_path / "runs", train={"steps": 80, "eval_batches": 1}))
    train(recipe)
    out = tmp_path / "quant"
    code = main(["quantize", "--checkpoint", str(recipe.run_dir), "--data", str(digits_shards), "--val",
                 str(digits_shards), "--method", "rtn,qdrop", "--wbits", "8,4", "--abits", "8,4", "--iters", "3",
                 "--calib-images", "64", "--onnx", "--out", str(out), "--wandb"])
    assert code == 0
    rows = {(r["method"], r["bits"]): r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {("fp32", "FP32"), ("ort_quantize_static", "W8A8"), ("rtn", "W8A8"), ("rtn", "W4A4"),
                         ("qdrop", "W8A8"), ("qdrop", "W4A4")}
    w8 = rows[("rtn", "W8A8")]
    assert w8["onnx"]["deployment"] == "int8-qdq" and w8["onnx"]["agreement_sim"] >= 0.99
    assert w8["eval_images"] == 297 and abs(w8["top1"] - w8["top1_fp"]) <= 0.02
    assert rows[("qdrop", "W4A4")]["onnx"]["deployment"].startswith("mixed")  # first/last layer at 8 bits
    assert "| qdrop | W4A4 |" in (out / "results.md").read_text()
    again = load_quantized(out / "rtn_w8a8_academic")
    assert not again.training and (out / "rtn_w8a8_academic" / "model.onnx").is_file()

    runs = list((out / "wandb").glob("offline-run-*"))  # no credentials: an offline W&B run beside the results
    assert len(runs) == 1
    record_file = next(runs[0].glob("*.wandb"))
    for _ in range(120):  # the W&B service flushes its record file shortly after finish() returns
        record = record_file.read_bytes()
        if b"quantize/results" in record:
            break
        time.sleep(0.25)
    assert b"quantize/results" in record and b"quantize/qdrop_w4a4/top1" in record

    bad = main(["quantize", "--checkpoint", str(recipe.run_dir), "--data", str(digits_shards), "--method", "brecc"])
    assert bad == 2
