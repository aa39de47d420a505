"""Post-training quantization, unit level: AdaRound, QDrop/BRECQ, Outlier Suppression, blocks, schemes.

Tiny models (timm, random weights) and synthetic tensors; every test runs in a second or two on a CPU.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from conftest import REPO
from test_quant_w2 import digits, top1  # noqa: F401 (a fixture: a tiny resnet trained on digits)
from foundation.config import RecipeError
from foundation.quant import METHODS
from foundation.quant.adaround import AdaRound, beta_schedule
from foundation.quant.blocks import find_blocks
from foundation.quant.calibrate import calibrate, predict
from foundation.quant.config import load_quant_config
from foundation.quant.fake_quant import QSpec, compute_qparams, fake_quantize
from foundation.quant.fold import fold_batchnorm
from foundation.quant.modules import Quantizer, quant_layers, quantizers, set_quant_prob, set_quant_state
from foundation.quant.observers import build_observer
from foundation.quant.outlier import collect_token_extremes, migrate_gamma, token_wise_range
from foundation.quant.placement import plan_placement
from foundation.quant.runner import load_quantized, prepare, quantize, save_quantized

TINY_RESNET = dict(num_classes=10, in_chans=1, channels=(8, 16, 16, 32), stem_width=8)
TINY_VIT = dict(num_classes=10, in_chans=1, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
FAST = {"observers.weight": "minmax", "observers.act": "minmax", "batch_size": 16}


def tiny_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", **TINY_RESNET)
    with torch.no_grad():  # non-trivial BN statistics and no zero-initialised residual branches
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
    return m.eval()


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()


# ---- AdaRound ---------------------------------------------------------------------------------


def test_adaround_initial_soft_rounding_reproduces_fp_weights():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    spec = QSpec(bits=4, symmetric=True, per_channel=True)
    scale, zp, qmin, qmax = compute_qparams(w.flatten(1).amin(1), w.flatten(1).amax(1), spec)
    s, z = scale.view(-1, 1, 1, 1), zp.view(-1, 1, 1, 1)
    ada = AdaRound(w, s)
    assert torch.allclose(ada.h(), w / s - torch.floor(w / s), atol=1e-5)
    inside = ((w / s).round() > qmin) & ((w / s).round() < qmax)  # away from the clamp
    assert torch.allclose(ada(w, s, z, qmin, qmax)[inside], w[inside], atol=1e-5)


def test_adaround_final_rounding_is_floor_or_ceil():
    model = tiny_resnet()
    calib = torch.randn(16, 1, 16, 16)
    cfg = load_quant_config(None, {**FAST, "method": "adaround", "wbits": 3, "abits": 8, "calib_images": 16,
                                   "reconstruction.iters": 12, "reconstruction.w_lr": 0.1})
    qmodel, fp, _ = quantize(model, calib, cfg)
    moved = 0
    for name, layer in quant_layers(qmodel):
        w_fp = fp.get_submodule(name).weight
        scale, zp = layer.weight_quant._qparams(w_fp)
        q = layer.weight / scale  # the baked integers (zero point 0: symmetric)
        lo, hi = torch.floor(w_fp / scale), torch.floor(w_fp / scale) + 1
        clamped = (q == layer.weight_quant.qmin) | (q == layer.weight_quant.qmax)
        ok = torch.isclose(q, lo, atol=1e-4) | torch.isclose(q, hi, atol=1e-4) | clamped
        assert bool(ok.all()), name
        assert torch.allclose(q, q.round(), atol=1e-4)
        moved += int((~torch.isclose(q, (w_fp / scale).round(), atol=1e-4) & ~clamped).sum())
    assert moved > 0  # AdaRound changed some rounding decisions away from nearest


def test_beta_schedule():
    assert beta_schedule(0, 100) == 20.0
    assert beta_schedule(19, 100) == 20.0  # 20 % warm-up
    assert beta_schedule(20, 100) == pytest.approx(20.0)
    assert beta_schedule(60, 100) == pytest.approx(11.0)  # linear 20 → 2 over the remaining 80 %
    assert beta_schedule(100, 100) == pytest.approx(2.0)
    assert all(beta_schedule(t, 100) >= beta_schedule(t + 1, 100) for t in range(100))


def test_adaround_regularizer_zero_only_at_hard_rounding():
    ada = AdaRound(torch.tensor([0.3, 1.7]), torch.tensor(1.0))
    assert ada.regularizer(2.0) > 0
    with torch.no_grad():
        ada.V.copy_(torch.tensor([50.0, -50.0]))  # h = 1, 0
    assert float(ada.regularizer(2.0).detach()) == pytest.approx(0.0, abs=1e-6)


# ---- QDrop / BRECQ ----------------------------------------------------------------------------


def test_qdrop_probabilities_at_the_quantizer():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    q = Quantizer(QSpec(bits=4, symmetric=False))
    q.calibrate_tensor(x)
    xq = fake_quantize(x, q.scale, q.zero_point, q.qmin, q.qmax)
    q.quant_prob = 1.0
    assert torch.equal(q(x), xq)
    q.quant_prob = 0.0
    assert torch.equal(q(x), x)
    q.quant_prob = 0.5
    y = q(x)
    is_q, is_fp = (y == xq), (y == x)
    assert bool((is_q | is_fp).all()) and 0.3 < float((is_fp & ~is_q).float().mean()) < 0.7


def test_qdrop_zero_probability_passes_fp_activations():
    model = tiny_resnet()
    calib = torch.randn(8, 1, 16, 16)
    cfg = load_quant_config(None, {**FAST, "wbits": 4, "abits": 4, "calib_images": 8})
    qmodel, fp, _ = prepare(model, calib[:2], cfg)  # not quantize(): that bakes the rounded weights in
    calibrate(qmodel, calib)
    set_quant_state(qmodel, weight=False)
    assert not torch.allclose(predict(qmodel, calib), predict(fp, calib), atol=1e-4)
    set_quant_prob(qmodel, 0.0)
    assert torch.allclose(predict(qmodel, calib), predict(fp, calib), atol=1e-5)


def test_qdrop_with_probability_one_is_brecq_exactly():
    model = tiny_resnet()
    calib = torch.randn(16, 1, 16, 16)
    over = {**FAST, "wbits": 4, "abits": 4, "calib_images": 16, "reconstruction.iters": 4,
            "reconstruction.batch_size": 8}
    brecq, _, rep_b = quantize(model, calib, load_quant_config(None, {**over, "method": "brecq"}))
    qdrop1, _, rep_q = quantize(model, calib, load_quant_config(None, {**over, "method": "qdrop",
                                                                      "reconstruction.quant_prob": 1.0}))
    qdrop5, _, _ = quantize(model, calib, load_quant_config(None, {**over, "method": "qdrop"}))
    units = [u["unit"] for u in rep_b["method"]["units"]]
    assert units[:3] == ["conv1.0", "conv1.3", "conv1.6"] and "layer1.0" in units and units[-1] == "fc"
    sb, s1, s5 = brecq.state_dict(), qdrop1.state_dict(), qdrop5.state_dict()
    assert sb.keys() == s1.keys()
    assert all(torch.equal(sb[k], s1[k]) for k in sb)
    assert not all(torch.equal(sb[k], s5[k]) for k in sb)  # p = 0.5 really drops


# ---- Outlier Suppression ----------------------------------------------------------------------


def test_gamma_migration_keeps_fp_output():
    model = tiny_vit()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.randn_like(m.weight) * 3)  # outlier-sized and negative γ
                m.weight[0] = 40.0
                m.bias.copy_(torch.randn_like(m.bias))
    x = torch.randn(4, 1, 32, 32)
    ref = model(x)
    report = migrate_gamma(model, x)
    assert set(report["migrated"]) == {"blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"}
    assert report["migrated"]["blocks.0.norm1"] == ["blocks.0.attn.qkv"] and report["migrated"]["norm"] == ["head"]
    assert torch.allclose(model(x), ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(model.blocks[0].norm1.weight, torch.ones(32))  # non-scaling LayerNorm


def test_token_wise_clipping_alpha_one_is_min_max():
    torch.manual_seed(0)
    x = torch.randn(4, 17, 32)
    x[1, 3, 5] = 60.0  # one outlier token
    x[2, 7, 9] = -45.0
    lo, hi = token_wise_range(x.amax(-1).flatten(), x.amin(-1).flatten(), 1.0)
    assert float(lo) == float(x.min()) and float(hi) == float(x.max())
    lo9, hi9 = token_wise_range(x.amax(-1).flatten(), x.amin(-1).flatten(), 0.9)
    assert float(hi9) < 10 and float(lo9) > -10  # the outlier tokens are clipped away

    qmodel, _, _ = prepare(tiny_vit(), x.new_zeros(2, 1, 32, 32), load_quant_config(None, FAST))
    images = torch.randn(8, 1, 32, 32)
    calibrate(qmodel, images)
    extremes = collect_token_extremes(qmodel, images, batch_size=8)
    acts = dict(quantizers(qmodel, "act"))
    assert "blocks.0.attn.qkv.input_quant" in extremes and "patch_embed.proj.input_quant" not in extremes
    for name, (tmax, tmin) in extremes.items():
        obs = build_observer("minmax", acts[name].spec)
        set_quant_state(qmodel, act=False)
        acts[name].observer = obs
        predict(qmodel, images, 8)
        acts[name].observer = None
        set_quant_state(qmodel, act=True)
        lo, hi = token_wise_range(tmax, tmin, 1.0)
        assert torch.allclose(torch.stack([lo, hi]), torch.stack(obs.range()))


def test_outlier_suppression_pipeline_runs_at_w4a4():
    model, calib = tiny_vit(), torch.randn(16, 1, 32, 32)
    cfg = load_quant_config(None, {**FAST, "wbits": 4, "abits": 4, "calib_images": 16, "outlier.enabled": True,
                                   "outlier.search_images": 16, "outlier.fine_iters": 3})
    qmodel, fp, report = quantize(model, calib, cfg)
    clip = report["token_clipping"]
    assert clip["quantizers"] > 0 and clip["alpha"] in cfg.outlier.alphas
    assert clip["fine_loss"] <= clip["coarse"][clip["alpha"]]
    assert torch.allclose(predict(fp, calib), predict(model, calib), atol=1e-4)  # migration kept FP output


# ---- structure ---------------------------------------------------------------------------------


def test_block_detection_resnet_mobilenet_vit():
    resnet = find_blocks(timm.create_model("resnet18", num_classes=10))
    assert [n for n, _, _ in resnet] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert {k for _, _, k in resnet} == {"residual"}
    mbv2 = find_blocks(timm.create_model("mobilenetv2_035", num_classes=10))
    kinds = [type(m).__name__ for _, m, _ in mbv2]
    assert kinds[0] == "DepthwiseSeparableConv" and kinds.count("InvertedResidual") == 16
    assert {k for _, _, k in mbv2} == {"inverted_residual"}
    vit = find_blocks(tiny_vit())
    assert [(n, k) for n, _, k in vit] == [("blocks.0", "transformer"), ("blocks.1", "transformer")]


def test_batchnorm_folding_and_placement():
    model = tiny_resnet()
    x = torch.randn(2, 1, 16, 16)
    ref = model(x)
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded, x)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(pairs) == n_bn == 15  # deep stem 3, blocks 4 × 2, avg-down shortcuts 4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert ("layer1.0.downsample.1", "layer1.0.downsample.2") in pairs  # AvgPool → conv → BN
    assert torch.allclose(folded(x), ref, atol=1e-5)
    sites = {s.name: s for s in plan_placement(folded, x, wbits=4, abits=4, first_last_bits=8)}
    assert sites["conv1.0"].input and sites["conv1.0"].wbits == 8 and sites["conv1.0"].abits_in == 8  # first
    assert sites["fc"].wbits == 8 and not sites["fc"].output  # last layer; logits stay float
    assert sites["conv1.0"].act == "conv1.2" and not sites["conv1.0"].output  # conv-BN-ReLU fused
    assert sites["layer1.0.conv2"].output and sites["layer1.0.act2"].output  # residual branch and sum
    assert not sites["layer1.0.conv1"].input  # its input is the quantized max-pool output
    assert sites["maxpool"].tie == "act1"  # max pooling reuses the stem activation's grid
    assert sites["layer2.0.conv2"].wbits == 4


def test_quantized_checkpoint_round_trip(tmp_path):
    model, calib = tiny_resnet(), torch.randn(8, 1, 16, 16)
    qmodel, _, _ = quantize(model, calib, load_quant_config(None, {**FAST, "wbits": 4, "abits": 6, "calib_images": 8}))
    path = save_quantized(qmodel, tmp_path / "q", {"source": "timm", "name": "resnet10t", "kwargs": TINY_RESNET})
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "quant.json"}
    again = load_quantized(path)
    assert torch.equal(predict(again, calib), predict(qmodel, calib))


# ---- schemes, observers, recipes --------------------------------------------------------------


def test_backend_schemes():
    model, x = tiny_resnet(), torch.randn(8, 1, 16, 16)

    def qranges(backend: str) -> tuple[set, set]:
        qmodel, _, _ = quantize(model, x, load_quant_config(None, {**FAST, "backend": backend, "calib_images": 8}))
        acts = {(q.qmin, q.qmax) for _, q in quantizers(qmodel, "act")}
        weights = {(q.qmin, q.qmax, q.spec.per_channel) for _, q in quantizers(qmodel, "weight")}
        return acts, weights

    assert qranges("tensorrt") == ({(-128, 127)}, {(-128, 127, True)})
    assert qranges("snpe") == ({(0, 255)}, {(0, 255, False)})
    acts, _ = qranges("openvino")
    assert acts == {(0, 255), (-128, 127)}  # unsigned after ReLU, signed elsewhere
    qmodel, _, _ = quantize(model, x, load_quant_config(None, {**FAST, "backend": "vitis", "calib_images": 8}))
    scales = torch.cat([q.scale.flatten() for _, q in quantizers(qmodel)])
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)  # powers of two
    with pytest.raises(RecipeError, match="8-bit scheme"):
        load_quant_config(None, {"backend": "tensorrt", "wbits": 4})


def test_observers():
    torch.manual_seed(0)
    x = torch.randn(10000)
    x[0] = 25.0
    spec = QSpec(bits=4, symmetric=False)
    ranges = {}
    for name in ("minmax", "ema_minmax", "mse", "percentile"):
        obs = build_observer(name, spec, percentile=99.9)
        obs.update(x)
        obs.update(x * 0.5)
        ranges[name] = [float(v) for v in obs.range()]
    assert ranges["minmax"] == [float(x.min()), 25.0]
    assert ranges["ema_minmax"][1] == pytest.approx(0.9 * 25.0 + 0.1 * 12.5)
    assert ranges["mse"][1] < 15.0 and ranges["percentile"][1] < 5.0  # both clip the outlier


def test_quant_recipes_validate_and_errors_name_the_key(tmp_path):
    files = sorted((REPO / "recipes" / "quant").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        load_quant_config(f)
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: brecq\nreconstruction:\n  iter: 5\n")
    with pytest.raises(RecipeError, match=r"reconstruction.iter: unknown key \(did you mean 'iters'\?\)"):
        load_quant_config(bad)
    with pytest.raises(RecipeError, match="did you mean 'qdrop'"):
        load_quant_config(None, {"method": "qdorp"})
    assert set(METHODS) == {"rtn", "adaround", "brecq", "qdrop"}


class _MaskedBlock(torch.nn.Module):
    """A residual block called with a mask tensor besides its input, like open_clip's text blocks."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x, mask):
        return x + torch.relu(self.fc(x)) * mask


class _MaskedNet(torch.nn.Module):
    def __init__(self, per_call_mask: bool):
        super().__init__()
        self.inp, self.block, self.head = torch.nn.Linear(8, 8), _MaskedBlock(), torch.nn.Linear(8, 3)
        self.per_call_mask = per_call_mask
        self.register_buffer("mask", torch.ones(8))

    def forward(self, x):
        mask = self.mask.clone() if self.per_call_mask else self.mask  # a new tensor each call, or a constant
        return self.head(self.block(self.inp(x), mask))


def test_block_reconstruction_takes_constant_tensor_arguments_and_refuses_changing_ones():
    torch.manual_seed(0)
    calib = torch.randn(64, 8)
    cfg = load_quant_config(None, {"method": "brecq", "wbits": 4, "abits": 8, "calib_images": 64, "batch_size": 16,
                                   "reconstruction.iters": 2})
    qmodel, _, report = quantize(_MaskedNet(per_call_mask=False).eval(), calib, cfg)
    assert [u["unit"] for u in report["method"]["units"]] == ["inp", "block", "head"]
    with pytest.raises(NotImplementedError, match="change between calls"):
        quantize(_MaskedNet(per_call_mask=True).eval(), calib, cfg)



# ---- reconstruction beats round-to-nearest ----------------------------------------------------------

W3A3_ITERS = 60


def w3a3_top1(digits, method: str) -> float:  # noqa: F811 (fixture imported from test_quant_w2)
    model, calib, x, y = digits
    cfg = load_quant_config(None, {"method": method, "wbits": 3, "abits": 3, "calib_images": calib.shape[0],
                                   "batch_size": 64, "reconstruction.iters": W3A3_ITERS})
    return top1(quantize(model, calib, cfg)[0], x, y)


@pytest.fixture(scope="module")
def rtn_w3a3(digits) -> float:  # noqa: F811
    return w3a3_top1(digits, "rtn")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_reconstruction_beats_rtn_at_w3a3(digits, rtn_w3a3, method):  # noqa: F811
    """W3A3 (first/last layer at 8 bits) on the tiny resnet10t trained on digits (FP ~96% top-1, 397
    held-out digits). Measured at 60 iterations per unit: RTN 35.3%, AdaRound 87.2%, BRECQ 89.4%,
    QDrop 90.9%. Each method must beat RTN by 30 points (~6-8 s each on a 2-core CPU)."""
    assert rtn_w3a3 < 60.0, rtn_w3a3  # W3A3 round-to-nearest really is broken here: the margin means something
    assert w3a3_top1(digits, method) >= rtn_w3a3 + 30.0, (method, rtn_w3a3)


def test_the_recipe_schema_names_every_method():
    """quant/config.py checks method names without importing the methods (no import circle): the two lists agree."""
    from foundation.quant import METHODS
    from foundation.quant.config import METHOD_NAMES

    assert tuple(METHODS) == METHOD_NAMES
