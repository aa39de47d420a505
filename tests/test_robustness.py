"""Corruptions, CE/mCE arithmetic, FGSM/PGD, the robustness evaluation and its CLI plumbing (CPU, tiny)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import types

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from evaluation.adversarial import Attack, Normalized, fgsm, pgd, run_attack
from evaluation.corruptions import ALL_CORRUPTIONS, IMAGENET_C, applicable, corrupt, length_scale
from evaluation.robustness import (
    compute_ce,
    eval_crop,
    evaluate_robustness,
    load_reference_errors,
    normalisation,
    parse_eps,
    resolve_corruptions,
    to_input,
)


def scene(size: int, channels: int = 3) -> np.ndarray:
    """A natural-ish picture: muted gradient, soft texture, a few shapes of moderate contrast (uint8)."""
    t = np.linspace(0, 1, size, dtype=np.float32)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    img = np.stack([0.25 + 0.3 * xx, 0.3 + 0.25 * yy, 0.45 - 0.25 * xx * yy], -1)
    rng = np.random.default_rng(7)
    texture = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), max(1.0, size / 32))
    img = img + 0.25 * (texture - texture.mean())[..., None]
    cv2.rectangle(img, (size // 8, size // 5), (size // 2, size // 2), (0.6, 0.35, 0.25), -1)
    cv2.circle(img, (int(size * 0.68), int(size * 0.62)), size // 5, (0.2, 0.3, 0.5), -1)
    cv2.line(img, (0, size - 3), (size - 1, size // 3), (0.75, 0.7, 0.4), max(1, size // 32))
    u8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY) if channels == 1 else u8


def psnr_by_severity(img: np.ndarray, name: str, seeds=range(4)) -> list[float]:
    """PSNR of the mean squared error over a few seeds, for severities 1..5."""
    out = []
    for severity in range(1, 6):
        mse = np.mean([np.mean((corrupt(img, name, severity, s).astype(np.float64) - img) ** 2) for s in seeds])
        out.append(10 * np.log10(255**2 / mse))
    return out


# Severity pairs (a, b) whose PSNR must fall from a to b. Most corruptions: every consecutive pair. A few
# published constant tables are not ordered by pixel error, by construction (checked at 224 px too):
#   elastic_transform  severities 1-2 are large affine + smooth warps, 3-5 a small affine + local jitter
#                      (so severity 5 is even closer to the clean image than severity 1);
#   saturate           1-2 desaturate (x0.3, x0.1), 3-5 oversaturate (x2, x5+0.1, x20+0.2);
#   frost              3 -> 4 keeps the frost weight (0.7) and lowers the image weight (0.7 -> 0.65), which
#                      moves a brighter-than-image texture blend *towards* the clean image;
#   spatter            1-3 add water (light), 4-5 paste mud (dark): the switch is image-dependent.
ALL_PAIRS = [(1, 2), (2, 3), (3, 4), (4, 5)]
UNORDERED_ENDS = {"elastic_transform"}  # the rest: severity 5 is always further from the image than 1
ORDERED_PAIRS = {
    "elastic_transform": [(1, 2), (3, 4), (4, 5)],
    "saturate": [(1, 2), (3, 4), (4, 5)],
    "frost": [(1, 2), (2, 3), (4, 5)],
    "spatter": [(1, 2), (2, 3), (4, 5)],
}


@pytest.mark.parametrize("channels", [3, 1])
def test_each_corruption_changes_image_keeps_shape_dtype_and_is_deterministic(channels):
    img = scene(32, channels)
    for name in ALL_CORRUPTIONS:
        if not applicable(name, channels):
            assert np.array_equal(corrupt(img, name, 5, 0), img), f"{name} should be the identity on grey"
            continue
        for severity in range(1, 6):
            out = corrupt(img, name, severity, seed=3)
            assert out.shape == img.shape and out.dtype == np.uint8, name
            assert (out != img).any(), f"{name} severity {severity} left the image unchanged"
            assert np.array_equal(out, corrupt(img, name, severity, seed=3)), f"{name} is not deterministic"
    # random corruptions do depend on the seed
    for name in ("gaussian_noise", "glass_blur", "snow", "frost", "fog", "spatter", "elastic_transform"):
        assert not np.array_equal(corrupt(img, name, 3, seed=0), corrupt(img, name, 3, seed=1)), name


def test_corrupt_accepts_hw_hw1_and_sizes_from_28_px():
    for shape in [(28, 28), (28, 28, 1), (28, 28, 3), (40, 56, 3), (57, 31)]:
        img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        for name in ALL_CORRUPTIONS:
            assert corrupt(img, name, 5, 0).shape == img.shape, (name, shape)
    with pytest.raises(TypeError):
        corrupt(np.zeros((32, 32, 3), np.float32), "fog", 1)
    with pytest.raises(ValueError, match="did you mean|unknown corruption"):
        corrupt(np.zeros((32, 32, 3), np.uint8), "gaussian_nosie", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(np.zeros((32, 32, 3), np.uint8), "fog", 6)


def test_length_scale_is_exact_at_224_linear_above_sqrt_below():
    assert length_scale(224) == 1.0
    assert length_scale(448) == pytest.approx(2.0)
    assert length_scale(56) == pytest.approx(0.5)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [3, 1])
def test_psnr_falls_with_severity(size, channels):
    img = scene(size, channels)
    failures = []
    for name in ALL_CORRUPTIONS:
        if not applicable(name, channels):
            continue
        p = psnr_by_severity(img, name)
        pairs = ORDERED_PAIRS.get(name, ALL_PAIRS)
        if name == "spatter" and (channels == 1 or size < 64):
            pairs = [(1, 2), (2, 3), (4, 5)]
        bad = [(a, b) for a, b in pairs if not p[a - 1] > p[b - 1]]
        if bad or not (p[4] < p[0] or name in UNORDERED_ENDS):
            failures.append(f"{name}: PSNR {np.round(p, 2).tolist()} not falling at {bad}")
    assert not failures, "\n".join(failures)


def test_psnr_at_28_px_and_the_pixelate_grid_exception():
    """At 28 px every corruption still gets stronger with severity, except pixelate's first three
    severities: 28 x (0.6, 0.5, 0.4) -> 16, 14, 11 px, and 14 = 28 / 2 is an exact 2x2 block grid that
    loses less than the misaligned 16-px grid. By construction of the published ratios, not a bug."""
    img = scene(28, 3)
    for name in ALL_CORRUPTIONS:
        p = psnr_by_severity(img, name)
        pairs = ORDERED_PAIRS.get(name, ALL_PAIRS)
        if name == "pixelate":
            # severity 2 at 28 px is the exact 2x2 block grid (14 px): each block holds its mean, as PIL's
            # separable BOX filter computes it (pairs along x averaged and rounded half up, then along y)
            pairs_x = np.floor(img.reshape(28, 14, 2, 3).astype(np.float64).mean(axis=2) + 0.5)
            blocks = np.floor(pairs_x.reshape(14, 2, 14, 3).mean(axis=1) + 0.5)
            grid = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
            assert np.array_equal(corrupt(img, "pixelate", 2), grid.astype(np.uint8))
            pairs = [(3, 4), (4, 5)]
        if name == "spatter":
            pairs = [(1, 2), (2, 3), (4, 5)]
        for a, b in pairs:
            assert p[a - 1] > p[b - 1], f"{name} at 28 px: PSNR {np.round(p, 2).tolist()} not falling {a}->{b}"
        assert p[4] < p[0] or name in UNORDERED_ENDS, name


def test_deterministic_corruptions_equal_the_imagenet_c_formulas_at_fixed_pixels():
    """Reference values computed here, in float64, from the ImageNet-C definitions (Hendrycks & Dietterich's
    ``make_imagenet_c.py``) and its severity constants, not from the implementation under test."""
    # brightness on grey: x + c, c = 0.2 at severity 2 (60 + 0.2 * 255 = 111 exactly)
    grey = np.full((32, 32), 60, np.uint8)
    assert (corrupt(grey, "brightness", 2) == 111).all()
    assert (corrupt(np.full((32, 32), 240, np.uint8), "brightness", 1) == 255).all()  # clipped
    # brightness on colour: V of HSV + c, H and S kept, so RGB scales by (V + c) / V
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:16], rgb[16:] = (200, 120, 40), (90, 60, 30)
    for severity, c in ((2, 0.2), (4, 0.4)):
        out = corrupt(rgb, "brightness", severity).astype(np.float64)
        for row, pixel in ((0, np.array([200, 120, 40.0])), (31, np.array([90, 60, 30.0]))):
            v = pixel.max() / 255
            expected = pixel * min(v + c, 1.0) / v
            assert np.abs(out[row, 5] - expected).max() <= 0.51, (severity, pixel, out[row, 5], expected)
    assert corrupt(rgb, "brightness", 2)[0, 0].tolist() == [251, 151, 50]
    # contrast: (x - mean) * c + mean over the image, c = 0.4 at severity 1, 0.05 at 5
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 0, 8, ..., 248 per row
    mean = ramp.astype(np.float64).mean() / 255
    for severity, c in ((1, 0.4), (5, 0.05)):
        expected = ((ramp / 255 - mean) * c + mean) * 255
        assert np.abs(corrupt(ramp, "contrast", severity) - expected).max() <= 0.51
    assert corrupt(ramp, "contrast", 1)[0, [0, 31]].tolist() == [74, 174]  # 124 -/+ 0.4 * 124
    # pixelate at 32 px: severity 2 (c = 0.5) and 5 (0.25) are exact 2x2 and 4x4 block grids; the ramp
    # 4i + 8j has integer block means, so BOX down and up gives them exactly
    i, j = np.mgrid[0:32, 0:32]
    ramp2 = (4 * i + 2 * j).astype(np.uint8)
    for severity, block in ((2, 2), (5, 4)):
        means = ramp2.reshape(32 // block, block, 32 // block, block).mean(axis=(1, 3))
        expected = np.repeat(np.repeat(means, block, 0), block, 1)
        assert np.array_equal(corrupt(ramp2, "pixelate", severity), expected.astype(np.uint8)), severity
    # jpeg: PIL at quality 25 (severity 1) and 7 (severity 5)
    from PIL import Image

    for severity, quality in ((1, 25), (5, 7)):
        buf = io.BytesIO()
        Image.fromarray(ramp2).save(buf, format="JPEG", quality=quality)
        expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        assert np.array_equal(corrupt(ramp2, "jpeg_compression", severity), expected), severity
    # gaussian noise, seed 3: x + N(0, c^2) from numpy's default_rng(seed), c = 0.08 / 0.38
    flat = np.full((16, 16, 3), 128, np.uint8)
    for severity, c in ((1, 0.08), (5, 0.38)):
        noise = np.random.default_rng(3).normal(size=(16, 16, 3))
        expected = np.clip(np.rint((128 / 255 + c * noise) * 255), 0, 255)
        out = corrupt(flat, "gaussian_noise", severity, seed=3).astype(np.float64)
        assert np.abs(out - expected).max() <= 1 and (out == expected).mean() > 0.95, severity
    assert not np.array_equal(corrupt(flat, "gaussian_noise", 1, seed=3), corrupt(flat, "gaussian_noise", 1, seed=4))


# --------------------------------------------------------------------------------------------------
# CE / mCE


def test_mce_hand_worked_example():
    # model errors (%), two severities; reference errors
    errors = {"gaussian_noise": [20.0, 40.0], "fog": [10.0, 30.0], "speckle_noise": [50.0, 50.0]}
    ref = {"gaussian_noise": [40.0, 60.0], "fog": [20.0, 40.0], "speckle_noise": [25.0, 25.0]}
    out = compute_ce(errors, clean_error=5.0, reference_errors=ref, reference_clean_error=10.0, severities=[1, 2])
    # CE = sum(model) / sum(ref): 60/100 and 40/60; speckle is an extra corruption: CE but not in the mean
    assert out["ce"]["gaussian_noise"] == pytest.approx(60.0)
    assert out["ce"]["fog"] == pytest.approx(200 / 3)
    assert out["ce"]["speckle_noise"] == pytest.approx(200.0)
    assert out["mce"] == pytest.approx((60.0 + 200 / 3) / 2)
    # relative CE = sum(model - clean) / sum(ref - ref clean): (15+35)/(30+50), (5+25)/(10+30)
    assert out["relative_ce"]["gaussian_noise"] == pytest.approx(62.5)
    assert out["relative_ce"]["fog"] == pytest.approx(75.0)
    assert out["relative_mce"] == pytest.approx(68.75)
    assert out["mce_corruptions"] == ["gaussian_noise", "fog"]
    # a reference that loses nothing to fog: fog's relative CE is undefined and left out of the mean
    ref["fog"] = [10.0, 10.0]
    out = compute_ce(errors, clean_error=5.0, reference_errors=ref, reference_clean_error=10.0, severities=[1, 2])
    assert out["relative_ce"]["fog"] is None and out["relative_mce"] == pytest.approx(62.5)
    assert out["relative_mce_corruptions"] == ["gaussian_noise"]
    # nor one that loses under 1 point per severity: 0.5 + 1.0 over two severities stays undefined
    ref["fog"] = [10.5, 11.0]
    out = compute_ce(errors, clean_error=5.0, reference_errors=ref, reference_clean_error=10.0, severities=[1, 2])
    assert out["relative_ce"]["fog"] is None
    ref["fog"] = [11.0, 11.0]  # exactly 1 point per severity: defined, (5 + 25) / 2
    out = compute_ce(errors, clean_error=5.0, reference_errors=ref, reference_clean_error=10.0, severities=[1, 2])
    assert out["relative_ce"]["fog"] == pytest.approx(1500.0)


def test_reference_given_as_mean_over_severities_equals_per_severity_lists(tmp_path):
    errors = {"contrast": [10.0, 20.0, 30.0, 40.0, 50.0]}
    as_list = compute_ce(errors, 5.0, {"contrast": [20.0, 30.0, 40.0, 50.0, 60.0]}, 10.0)
    as_mean = compute_ce(errors, 5.0, {"contrast": 40.0}, 10.0)
    assert as_list["mce"] == pytest.approx(as_mean["mce"]) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="all 5 severities"):
        compute_ce({"contrast": [10.0]}, 5.0, {"contrast": 40.0}, 10.0, severities=[1])
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"clean_error": 0.2, "errors": {"contrast": [0.2, 0.3]}}))
    with pytest.raises(ValueError, match="percent"):
        load_reference_errors(path)


def test_resolve_corruptions_groups_and_typos():
    assert resolve_corruptions(["imagenet-c"]) == list(IMAGENET_C)
    assert len(resolve_corruptions(["all"])) == 19
    assert resolve_corruptions(["fog", "extra", "fog"])[:2] == ["fog", "speckle_noise"]
    with pytest.raises(ValueError, match="'fog'"):
        resolve_corruptions(["fgo"])
    assert parse_eps("4/255") == pytest.approx(4 / 255)


# --------------------------------------------------------------------------------------------------
# attacks on a tiny trained model


def quadrant_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32-px grey images in [0, 1]: a bright blob in one of four quadrants (the class) on noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, 1, 32, 32, generator=g) * 0.3
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, 4 + 16 * r : 12 + 16 * r, 4 + 16 * col : 12 + 16 * col] += 0.6
    return x.clamp(0, 1), labels


MEAN, STD = (0.3,), (0.25,)


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 4),
    )
    wrapped = Normalized(model, MEAN, STD)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = quadrant_data(512, seed=0)
    for step in range(40):
        idx = torch.arange(step * 64, step * 64 + 64) % 512
        loss = nn.functional.cross_entropy(wrapped(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def weak_model(tiny_model) -> nn.Module:
    """A worse classifier of the same data (the tiny model's weights plus noise): a reference for CE/mCE
    that is not the model itself, so mCE is not 100 by construction."""
    import copy

    weak = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in weak.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 1.5)
    return weak.eval()


def hand_mce(errors: dict, reference: dict) -> float:
    """mCE of Hendrycks & Dietterich: per ImageNet-C corruption, 100 x the model's summed errors over the
    reference's, averaged."""
    return float(np.mean([100 * sum(errors[c]) / sum(reference[c]) for c in errors if c in IMAGENET_C]))


def test_tiny_model_learned(tiny_model):
    x, y = quadrant_data(128, seed=1)
    with torch.no_grad():
        acc = (Normalized(tiny_model, MEAN, STD)(x).argmax(1) == y).float().mean()
    assert acc > 0.95


def test_pgd_with_eps_zero_changes_nothing(tiny_model):
    x, y = quadrant_data(16, seed=2)
    f = Normalized(tiny_model, MEAN, STD)
    for norm in ("linf", "l2"):
        assert torch.equal(pgd(f, x, y, 0.0, norm), x)
        assert torch.equal(fgsm(f, x, y, 0.0, norm), x)


def test_attacks_stay_in_the_eps_ball_and_pixel_range(tiny_model):
    x, y = quadrant_data(32, seed=3)
    f = Normalized(tiny_model, MEAN, STD)
    for attack in [Attack("pgd", "linf", 8 / 255), Attack("fgsm", "linf", 8 / 255),
                   Attack("pgd", "l2", 0.5), Attack("fgsm", "l2", 0.5)]:
        adv = run_attack(f, x, y, attack, torch.Generator().manual_seed(0))
        assert adv.min() >= 0 and adv.max() <= 1
        d = (adv - x).flatten(1)
        size = d.abs().max(1).values if attack.norm == "linf" else d.norm(dim=1)
        assert (size <= attack.eps + 1e-5).all(), attack


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 4.0)])
def test_pgd_is_at_least_as_strong_as_fgsm(tiny_model, norm, eps):
    x, y = quadrant_data(128, seed=4)
    f = Normalized(tiny_model, MEAN, STD)
    with torch.no_grad():
        clean_ok = f(x).argmax(1) == y
        fgsm_ok = f(fgsm(f, x, y, eps, norm)).argmax(1) == y
        pgd_ok = f(pgd(f, x, y, eps, norm, steps=10, generator=torch.Generator().manual_seed(0))).argmax(1) == y
    fgsm_robust = (fgsm_ok & clean_ok).sum().item()
    pgd_robust = (pgd_ok & clean_ok).sum().item()
    assert fgsm_robust < clean_ok.sum().item(), "eps too small: FGSM fools nothing, the comparison is empty"
    assert pgd_robust <= fgsm_robust
    assert pgd_robust < fgsm_robust or pgd_robust == 0


# --------------------------------------------------------------------------------------------------
# the evaluation and its report


def quadrant_samples(n: int, seed: int) -> list[tuple[np.ndarray, int]]:
    x, y = quadrant_data(n, seed)
    return [((x[i, 0].numpy() * 255).round().astype(np.uint8), int(y[i])) for i in range(n)]


def test_evaluate_robustness_end_to_end_and_report(tiny_model, weak_model, tmp_path):
    from evaluation.report import write_robustness_report

    samples = quadrant_samples(24, seed=5)
    kwargs = dict(image_size=32, in_chans=1, mean=MEAN, std=STD, corruptions=["contrast", "fog", "saturate"],
                  severities=[1, 3, 5], batch_size=10, seed=0)
    attacks = [Attack("fgsm", "linf", 0.1), Attack("pgd", "linf", 0.1, steps=5)]
    ref = evaluate_robustness(weak_model, samples, **kwargs)
    res = evaluate_robustness(tiny_model, samples, attacks=attacks, adv_max_samples=16,
                              reference_errors=ref["corruptions"]["error"],
                              reference_clean_error=ref["clean_error"], **kwargs)
    assert res["samples"] == 24 and res["clean_accuracy"] > 90
    assert res["corruptions"]["not_applicable"] == ["saturate"]  # grey model
    assert set(res["corruptions"]["error"]) == {"contrast", "fog"}
    again = evaluate_robustness(tiny_model, samples, **kwargs)
    assert res["corruptions"]["error"] == again["corruptions"]["error"]  # deterministic for a seed
    # an error by hand: sample i corrupted with seed (seed, i, index of the corruption), then predicted
    x = [corrupt(img, "fog", 5, seed=(0, i, ALL_CORRUPTIONS.index("fog"))) for i, (img, _) in enumerate(samples)]
    with torch.no_grad():
        pred = Normalized(tiny_model, MEAN, STD)(torch.tensor(np.stack(x))[:, None].float() / 255).argmax(1)
    wrong = (pred != torch.tensor([y for _, y in samples])).float().mean().item() * 100
    assert res["corruptions"]["error"]["fog"][-1] == pytest.approx(wrong)
    assert ref["corruptions"]["error"] != res["corruptions"]["error"]
    assert res["mce"]["mce"] == pytest.approx(hand_mce(res["corruptions"]["error"], ref["corruptions"]["error"]))
    assert res["mce"]["mce"] < 90  # the trained model loses less to the corruptions than the perturbed one
    assert res["corruptions"]["error"]["fog"][-1] > res["corruptions"]["error"]["fog"][0]
    adv = res["adversarial"]
    assert adv["samples"] == 16 and len(adv["attacks"]) == 2
    assert adv["attacks"][1]["robustness"] <= adv["attacks"][0]["robustness"]
    json.dumps(res)  # JSON-able

    files = write_robustness_report(res, tmp_path)
    for key in ("json", "html", "md", "corruptions_png", "adversarial_png"):
        assert files[key].exists() and files[key].stat().st_size > 0, key
    assert "contrast" in files["html"].read_text()
    assert json.loads(files["json"].read_text())["samples"] == 24


def test_pipeline_matches_timm_eval_transform():
    """The crop + to_input split reproduces timm's eval transform exactly (resize, centre crop, normalise)."""
    from PIL import Image
    from timm.data import create_transform

    img = Image.fromarray(scene(64, 3)).crop((0, 5, 64, 50))  # non-square
    for crop_pct, interp in [(1.0, "bicubic"), (0.875, "bilinear")]:
        mean, std = normalisation(3)
        ref = create_transform(32, is_training=False, interpolation=interp, crop_pct=crop_pct, mean=mean, std=std)
        ours = to_input([eval_crop(img, 32, crop_pct, interp)], mean, std)[0]
        assert torch.equal(ref(img), ours)
    assert normalisation(1) == ((pytest.approx(0.449),), (pytest.approx(0.226),))


# --------------------------------------------------------------------------------------------------
# CLI plumbing, against stand-ins for the checkpoint loader and the shard reader


@pytest.fixture
def fake_platform(monkeypatch, tiny_model, weak_model, tmp_path):
    """``load_model`` and ``iter_raw_samples`` stand-ins: the tiny model (the weak one for a checkpoint under
    ``runs/reference/``) and PNG samples in memory."""
    from PIL import Image

    from evaluation.robustness import pil_decode

    recipe = types.SimpleNamespace(
        name="tiny", run_dir=tmp_path / "runs" / "tiny",
        data=types.SimpleNamespace(image_size=32, in_chans=1, mean=MEAN, std=STD, val="fake-shards",
                                   image_key="jpg;jpeg;png;webp", label_key="cls",
                                   augment=types.SimpleNamespace(crop_pct=1.0, interpolation="bilinear")),
        logging=types.SimpleNamespace(wandb="disabled", project="foundation", entity=None),
    )

    def iter_raw_samples(spec, split="val"):
        for i, (img, label) in enumerate(quadrant_samples(12, seed=6)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            yield {"__key__": f"s{i}", "__url__": spec, "png": buf.getvalue(), "cls": str(label).encode()}
        yield {"__key__": "broken", "__url__": spec, "png": b"not an image", "cls": b"1"}

    def build_eval_transform(cfg):
        def transform(img):
            return to_input([eval_crop(img, cfg.image_size, cfg.augment.crop_pct, cfg.augment.interpolation)],
                            normalisation(cfg.in_chans, cfg.mean, cfg.std)[0],
                            normalisation(cfg.in_chans, cfg.mean, cfg.std)[1])[0]
        return transform

    modules = {
        "foundation.engine.checkpoint": types.SimpleNamespace(
            load_model=lambda ckpt, device="cpu", **_: (weak_model if "reference" in str(ckpt) else tiny_model, recipe)),
        "foundation.data.shards": types.SimpleNamespace(iter_raw_samples=iter_raw_samples),
        "foundation.data.transforms": types.SimpleNamespace(
            decode_image=pil_decode, build_eval_transform=build_eval_transform,
            normalization=lambda cfg: normalisation(cfg.in_chans, cfg.mean, cfg.std)),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "step_40"
    ckpt.mkdir(parents=True)
    (tmp_path / "runs" / "reference" / "checkpoints" / "step_4").mkdir(parents=True)
    return ckpt


def parse(argv: list[str]) -> argparse.Namespace:
    from evaluation.robustness import add_cli as add_robustness
    from evaluation.sysnoise import add_cli as add_sysnoise

    parser = argparse.ArgumentParser(prog="foundation eval")
    sub = parser.add_subparsers(dest="eval")
    add_robustness(sub)
    add_sysnoise(sub)
    return parser.parse_args(argv)


def test_robustness_cli_writes_report_next_to_the_run(fake_platform, capsys):
    args = parse(["robustness", "--checkpoint", str(fake_platform), "--corruptions", "contrast", "fog",
                  "--severities", "1", "5", "--eps", "2/255", "--pgd-steps", "3", "--batch-size", "5", "--quiet",
                  "--reference", str(fake_platform.parents[2] / "reference" / "checkpoints" / "step_4")])
    assert args.func(args) == 0
    out = fake_platform.parent.parent / "eval" / "robustness"
    result = json.loads((out / "robustness.json").read_text())
    assert result["samples"] == 12
    assert result["skipped_samples"]["count"] == 1  # the broken image is skipped and counted
    assert result["pipeline_matches_training"] is True
    reference = json.loads((out / "reference_robustness.json").read_text())
    assert reference["checkpoint"].endswith("reference/checkpoints/step_4")
    assert reference["corruptions"]["error"] != result["corruptions"]["error"]
    assert result["mce"]["mce"] == pytest.approx(hand_mce(result["corruptions"]["error"],
                                                          reference["corruptions"]["error"]))
    assert result["mce"]["mce"] < 100
    assert {r["attack"] for r in result["adversarial"]["attacks"]} == {"fgsm", "pgd"}
    assert (out / "report.html").exists() and (out / "corruption_accuracy.png").exists()
    assert "mCE" in capsys.readouterr().out


def test_robustness_cli_rejects_unknown_corruption(fake_platform, capsys):
    args = parse(["robustness", "--checkpoint", str(fake_platform), "--corruptions", "fgo", "--quiet"])
    assert args.func(args) == 2
    assert "did you mean 'fog'" in capsys.readouterr().err
