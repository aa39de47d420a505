"""2-bit weights, 4-bit activations on a tiny trained ResNet: block reconstruction (BRECQ) is at least as
good as layer-wise AdaRound, and both far above round-to-nearest, with a CPU-sized iteration budget.

What this guards: the papers' learning rates (rounding 1e-3, LSQ steps 4e-5) are set for 20,000
iterations. Used unchanged with a few hundred, the rounding variables hardly move, the rounding is still
undecided when it is made hard (h ≈ the fractional part, so hard rounding = round to nearest), and
AdaRound/BRECQ land near or below RTN with BRECQ below AdaRound. Both rates are therefore scaled by
``lr_reference_iters / iters`` (docs/quantization.md has the measurements). Issue 24 suspected the scaled LSQ
rate of BRECQ's W3A3 collapse on a ResNet-18; over 3 seeds on a digits ResNet-18 the scaled rate was the
better one (docs/quantization.md, *Activation step sizes at 3 bits*), so it is kept."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from foundation.quant.brecq import lr_scale
from foundation.quant.calibrate import predict
from foundation.quant.config import QuantConfig, ReconstructionConfig
from foundation.quant.runner import quantize

ITERS = 100


@pytest.fixture(scope="module")
def digits():
    """A narrow timm resnet10t trained on scikit-learn's digits at 16 px (~96% top-1): model, calibration
    images, held-out images and labels."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, size=16, mode="bilinear",
                      align_corners=False)
    x, y = (x - 0.3) / 0.35, torch.tensor(d.target)
    order = torch.randperm(len(y))
    x, y = x[order], y[order]
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=(16, 32, 64, 128), stem_width=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        idx = torch.randint(0, 1400, (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x[:128], x[1400:], y[1400:]


def w2a4(model, calib, method: str, wbits: int = 2, abits: int = 4, **reconstruction) -> tuple[torch.nn.Module, dict]:
    cfg = QuantConfig(method=method, wbits=wbits, abits=abits, calib_images=calib.shape[0], batch_size=64,
                      reconstruction={"iters": ITERS, **reconstruction})
    qmodel, _, report = quantize(model, calib, cfg)
    return qmodel, report


def top1(model, x, y) -> float:
    return 100.0 * (predict(model, x, 128).argmax(1) == y).float().mean().item()


def test_lr_scale():
    assert lr_scale(ReconstructionConfig(iters=20000)) == 1.0
    assert lr_scale(ReconstructionConfig(iters=40000)) == 1.0  # never slower than the papers
    assert lr_scale(ReconstructionConfig(iters=400)) == 50.0
    assert lr_scale(ReconstructionConfig(iters=3)) == 100.0  # capped
    assert lr_scale(ReconstructionConfig(iters=400, lr_reference_iters=None)) == 1.0


@pytest.mark.slow
def test_brecq_at_least_adaround_at_w2a4(digits):
    model, calib, x, y = digits
    fp = top1(model, x, y)
    assert fp > 90.0
    rtn = top1(w2a4(model, calib, "rtn")[0], x, y)
    q_ada, rep_ada = w2a4(model, calib, "adaround")
    q_brecq, rep_brecq = w2a4(model, calib, "brecq")
    ada, brecq = top1(q_ada, x, y), top1(q_brecq, x, y)
    print(f"W2A4 top-1: FP {fp:.2f}, RTN {rtn:.2f}, AdaRound {ada:.2f}, BRECQ {brecq:.2f}")
    assert brecq >= ada, (rtn, ada, brecq)
    assert ada >= rtn + 30.0 and brecq >= fp - 15.0, (fp, rtn, ada, brecq)
    # the rounding was decided while it was learned, not by the final hard rounding
    # (with the papers' rates unscaled ~90% of h stay strictly between 0.01 and 0.99)
    for report in (rep_ada, rep_brecq):
        undecided = [u["undecided_rounding"] for u in report["method"]["units"]]
        assert sum(undecided) / len(undecided) < 0.3, undecided


def test_activation_step_sizes_follow_the_scaled_learning_rate(digits):
    """The LSQ step sizes' rate is scaled to the iteration budget like the rounding's. Adam moves a parameter
    by at most about its rate per step, so after ``iters`` steps no activation step size is more than
    ``iters * a_lr * lr_scale`` from its calibrated value; and some moved more than ``iters * a_lr``, which
    the unscaled rate cannot do (with ``a_lr`` absolute every step size stayed within it)."""
    from foundation.quant import METHODS
    from foundation.quant.calibrate import calibrate
    from foundation.quant.modules import quantizers
    from foundation.quant.runner import prepare

    model, calib, _, _ = digits
    iters = 12
    cfg = QuantConfig(method="brecq", wbits=3, abits=3, calib_images=64, batch_size=64,
                      reconstruction={"iters": iters, "batch_size": 32})
    scale = lr_scale(cfg.reconstruction)
    assert scale == 100.0
    qmodel, fp, _ = prepare(model, calib[:2], cfg)
    calibrate(qmodel, calib[:64], 64)
    acts = {n: q for n, q in quantizers(qmodel) if q.role == "act" and q.enabled and q.ready}
    before = {n: q.scale.detach().clone() for n, q in acts.items()}
    METHODS["brecq"](qmodel, fp, calib[:64], cfg)
    moved = {n: (q.scale.detach() - before[n]).abs().max().item() for n, q in acts.items()}
    unscaled = iters * cfg.reconstruction.a_lr
    assert max(moved.values()) > 2.0 * unscaled, moved  # the scaled rate reached the step sizes...
    bound = 1.05 * unscaled * scale  # ...and nothing moved faster than it allows
    assert max(moved.values()) <= bound, {n: m for n, m in moved.items() if m > bound}


@pytest.mark.slow
def test_brecq_close_to_adaround_at_w3a3(digits):
    """W3A3 (first/last layer 8 bit) at the CPU budget: BRECQ within 2 points of AdaRound (or above), both far
    above RTN. Measured on this model at 100 iterations, a_lr scaled: FP 95.97, RTN 35.26, AdaRound 86.65,
    BRECQ 90.93 (~6 s per method)."""
    model, calib, x, y = digits
    rtn = top1(w2a4(model, calib, "rtn", 3, 3)[0], x, y)
    ada = top1(w2a4(model, calib, "adaround", 3, 3)[0], x, y)
    brecq = top1(w2a4(model, calib, "brecq", 3, 3)[0], x, y)
    print(f"W3A3 top-1: RTN {rtn:.2f}, AdaRound {ada:.2f}, BRECQ {brecq:.2f}")
    assert rtn < 60.0 and ada >= rtn + 30.0, (rtn, ada)
    assert brecq >= ada - 2.0, (ada, brecq)
