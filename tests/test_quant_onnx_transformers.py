"""Transformers deployed to onnxruntime as INT8 QDQ graphs: ViT and CeiT classifiers and both towers of a CLIP
dual encoder (the open_clip text transformer takes integer token ids) export with the quantized scales, fuse
into onnxruntime's integer kernels, and agree with the PyTorch quantized model (outputs within a few 8-bit
steps, top-1 / zero-shot predictions on >= 95% of inputs of an untrained model whose logits are close together;
the trained-checkpoint CLI test in test_clip.py asks 99%)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from foundation.quant.calibrate import predict
from foundation.quant.config import load_quant_config
from foundation.quant.onnx_export import (OnnxRuntimeModel, export_fp32_onnx, export_onnx, fused_op_counts, ort_predict,
                                          ort_quantize_static, ort_session)
from foundation.quant.runner import quantize
from test_clip import declip_run, shards  # noqa: F401 (fixtures: a tiny DeCLIP run on grey-level captions)

W8A8 = {"calib_images": 32, "batch_size": 32, "observers.weight": "minmax", "observers.act": "minmax"}


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit", "ceit"])
def test_vit_and_ceit_classifiers_deploy_as_int8_and_agree(arch, tmp_path):
    import foundation.models.ceit  # noqa: F401 (registers ceit_* with timm)

    torch.manual_seed(0)
    if arch == "vit":
        model = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32, patch_size=8,
                                  embed_dim=32, depth=2, num_heads=2)
    else:
        model = timm.create_model("ceit_test", num_classes=10, in_chans=1, img_size=32)
    model.eval()
    x = torch.randn(64, 1, 32, 32)
    qmodel, _, _ = quantize(model, x[:32], load_quant_config(None, W8A8))
    info = export_onnx(qmodel, x[:1], tmp_path / "model.onnx")
    assert info["deployment"] == "int8-qdq" and info["int_weights"] > 0
    ops = fused_op_counts(info["path"])
    assert ops.get("QLinearMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) + ops.get("QGemm", 0) > 0, ops
    sim = predict(qmodel, x).numpy()
    deployed = ort_predict(ort_session(info["path"], threads=1), x)
    assert np.abs(deployed - sim).max() <= 0.05 * np.abs(sim).max()
    assert _agree(deployed, sim) >= 0.95


@pytest.mark.slow
def test_clip_towers_deploy_as_int8_and_zero_shot_agrees(tmp_path):
    """Image tower (ViT + projection) and text tower (open_clip transformer, token ids in) quantized W8A8,
    exported, run by onnxruntime; the zero-shot predictions of the deployed pair match the simulated pair."""
    from foundation.config import ModelConfig
    from foundation.models.dual_encoder import ImageTower, TextTower, build_dual_encoder

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8,
                      kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
                      dual_encoder={"embed_dim": 16, "text": {"context_length": 12, "width": 32, "heads": 2, "layers": 2}})
    dual = build_dual_encoder(cfg, in_chans=1).eval()
    images = torch.randn(64, 1, 32, 32)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    prompts = dual.tokenize([f"a photo of the number {n}." for n in names])
    calib_tokens = dual.tokenize([f"a {a} picture of a {n}" for a in ("small", "blurry", "big") for n in names])
    assert not prompts.is_floating_point()
    q_image, _, _ = quantize(ImageTower(dual).eval(), images[:32], load_quant_config(None, W8A8))
    q_text, _, _ = quantize(TextTower(dual).eval(), calib_tokens, load_quant_config(None, W8A8))
    image_info = export_onnx(q_image, images[:1], tmp_path / "image.onnx")
    text_info = export_onnx(q_text, calib_tokens[:1], tmp_path / "text.onnx")
    assert image_info["deployment"] == text_info["deployment"] == "int8-qdq"
    ort_image, ort_text = OnnxRuntimeModel(image_info["path"], threads=1), OnnxRuntimeModel(text_info["path"], threads=1)
    assert ort_text.session.get_inputs()[0].name == "tokens"

    def zero_shot(image_tower, text_tower) -> np.ndarray:
        with torch.no_grad():
            w = F.normalize(text_tower(prompts), dim=-1)
            return (F.normalize(image_tower(images), dim=-1) @ w.T).numpy()

    with torch.no_grad():
        assert torch.allclose(ort_text(prompts), q_text(prompts), atol=1e-3 * q_text(prompts).abs().max().item() + 1e-5)
    sim, deployed = zero_shot(q_image, q_text), zero_shot(ort_image, ort_text)
    assert np.abs(deployed - sim).max() <= 0.05
    assert _agree(deployed, sim) >= 0.95

    # onnxruntime's own quantize_static takes the token ids as calibration input too
    fp32 = export_fp32_onnx(TextTower(dual).eval(), calib_tokens[:1], tmp_path / "fp32_text.onnx")
    base = ort_quantize_static(fp32, calib_tokens, tmp_path / "ort_text.onnx")
    cos = F.cosine_similarity(OnnxRuntimeModel(base, threads=1)(prompts), TextTower(dual).eval()(prompts).detach())
    assert cos.min() > 0.95


@pytest.mark.slow
def test_quantize_cli_deploys_both_towers_of_a_declip_checkpoint(declip_run, shards, tmp_path):  # noqa: F811
    """`foundation quantize --onnx` on a DeCLIP checkpoint: both towers exported and run by onnxruntime, zero-shot
    computed end to end from the deployed towers; onnxruntime's quantize_static of both towers as the baseline."""
    from foundation.cli import main

    _, run_dir = declip_run
    out = tmp_path / "quant"
    assert main(["quantize", "--checkpoint", str(run_dir), "--data", str(shards), "--val", str(shards), "--method", "rtn",
                 "--wbits", "8", "--abits", "8", "--calib-images", "32", "--batch-size", "16", "--onnx",
                 "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"fp32", "ort_quantize_static", "rtn"}
    row = rows["rtn"]
    assert row["onnx"]["deployment"] == "int8-qdq" and set(row["onnx"]["towers"]) == {"image", "text"}
    assert row["onnx"]["agreement_sim"] >= 0.99 and row["onnx"]["top1"] >= rows["fp32"]["top1"] - 0.05
    assert rows["ort_quantize_static"]["top1"] >= rows["fp32"]["top1"] - 0.05
    assert (out / "rtn_w8a8_academic" / "text" / "model.onnx").is_file()


def test_multihead_attention_projections_are_split_out_and_quantized(tmp_path, monkeypatch):
    """nn.MultiheadAttention (open_clip's towers) applies its projections functionally; PTQ swaps it for an
    equal module with called Linear projections, so they are quantized, and a saved model reloads the same."""
    from foundation.quant.attention import LinearAttention, split_attention
    from foundation.quant.modules import QuantLinear
    from foundation.quant.runner import load_quantized, save_quantized

    class Block(torch.nn.Module):
        def __init__(self, batch_first: bool):
            super().__init__()
            self.batch_first = batch_first
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first)
            self.head = torch.nn.Linear(16, 4)
            self.register_buffer("mask", torch.full((6, 6), float("-inf")).triu(1))

        def forward(self, x):
            y = x if self.batch_first else x.transpose(0, 1)
            y = self.attn(y, y, y, need_weights=False, attn_mask=self.mask)[0]
            return self.head((y if self.batch_first else y.transpose(0, 1)).mean(1))

    torch.manual_seed(0)
    x = torch.randn(8, 6, 16)
    for batch_first in (True, False):
        model = Block(batch_first).eval()
        ref = model(x)
        assert split_attention(model, x) == ["attn"] and isinstance(model.attn, LinearAttention)
        assert torch.allclose(model(x), ref, atol=1e-6)

    model = Block(True).eval()
    qmodel, _, report = quantize(model, x, load_quant_config(None, {**W8A8, "calib_images": 8}))
    assert report["linear_attention"] == ["attn"]
    assert isinstance(qmodel.attn.in_proj, QuantLinear) and isinstance(qmodel.attn.out_proj, QuantLinear)
    import foundation.quant.config as qconfig
    import foundation.quant.runner as runner

    monkeypatch.setattr(qconfig, "check_arch", lambda arch, root: arch)  # a test module, not a registered model
    monkeypatch.setattr(runner, "build_architecture", lambda arch: Block(True))
    again = load_quantized(save_quantized(qmodel, tmp_path / "q", {"source": "test"}))
    assert torch.equal(again(x), qmodel(x))
