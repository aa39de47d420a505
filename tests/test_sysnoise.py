"""SysNoise: every input variant really changes pixels, model variants really change the model, and the
evaluation, report and CLI run end to end (CPU, tiny)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluation.robustness import eval_crop, normalisation, pil_decode
from evaluation.sysnoise import (
    COLOURS,
    DECODERS,
    NotApplicable,
    Unavailable,
    convert_colour,
    decode,
    eval_crop_with,
    evaluate_sysnoise,
    flip_ceil_mode,
    flipped_align_corners,
    resize_name,
    resize_variants,
    to_jpeg,
)
from test_robustness import (  # noqa: F401 (fixtures)
    fake_platform, parse, quadrant_samples, scene, tiny_model, weak_model)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def pixels_differ(decoder: str, data: bytes, channels: int) -> bool:
    return not np.array_equal(decode(data, channels, decoder), decode(data, channels, "pil"))


def test_decoder_variants_produce_different_pixels_from_pil():
    """Same JPEG bytes, different decoders. Pillow, OpenCV and torchvision.io all wrap libjpeg-turbo with the
    same defaults here, so on a plain JPEG they agree bit for bit (the report then shows 0 pixels changed);
    what makes deployed decoders differ is reproduced and checked: Pillow's own YCbCr->RGB matrix, the fast
    integer IDCT, plain chroma upsampling, nvJPEG on CUDA, and OpenCV applying EXIF orientation."""
    rgb = to_jpeg(png_bytes(scene(48, 3)), 3, quality=90)
    grey = to_jpeg(png_bytes(scene(48, 1)), 1, quality=90)
    assert rgb[:3] == grey[:3] == b"\xff\xd8\xff"
    assert pixels_differ("pil_ycbcr", rgb, 3)
    for name in ("torchvision", "opencv"):
        out = decode(rgb, 3, name)
        assert out.shape == (48, 48, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - decode(rgb, 3, "pil")).max() <= 2  # a real decode of the same picture
    with pytest.raises(NotApplicable):
        decode(grey, 1, "pil_ycbcr")
    if torch.cuda.is_available():
        assert decode(rgb, 3, "torchvision_cuda").shape == (48, 48, 3)
    else:
        with pytest.raises(Unavailable):
            decode(rgb, 3, "torchvision_cuda")

    # a phone photo stored sideways with an EXIF orientation tag: OpenCV rotates it, PIL does not
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(scene(48, 3)[:, :40]).save(buf, format="JPEG", quality=90, exif=exif)
    assert decode(buf.getvalue(), 3, "pil").shape == (48, 40, 3)
    assert decode(buf.getvalue(), 3, "opencv").shape == (40, 48, 3)
    assert decode(buf.getvalue(), 3, "torchvision").shape == (48, 40, 3)


def test_libjpeg_turbo_option_variants_produce_different_pixels():
    import simplejpeg  # noqa: F401  (a dependency: the libjpeg-turbo option variants need it)
    rgb = to_jpeg(png_bytes(scene(48, 3)), 3, quality=90)
    grey = to_jpeg(png_bytes(scene(48, 1)), 1, quality=90)
    assert pixels_differ("turbo_fastdct", rgb, 3)
    assert pixels_differ("turbo_fastupsample", rgb, 3)
    assert pixels_differ("turbo_fastdct", grey, 1)
    with pytest.raises(NotApplicable):
        decode(grey, 1, "turbo_fastupsample")


@pytest.mark.parametrize("source,crop_pct", [((64, 56, 3), 0.875), ((28, 28, 1), 1.0), ((28, 28, 3), 1.0)])
@pytest.mark.parametrize("reference", ["bicubic", "bilinear"])
def test_each_resize_variant_produces_different_pixels_from_the_reference(source, crop_pct, reference):
    """Downscaling a non-square image with a crop, and Fashion-MNIST's 28 -> 32 px upscaling."""
    h, w, c = source
    img = scene(max(h, w), c)[:h, :w]
    img = img[..., None] if img.ndim == 2 else img
    ref = eval_crop_with(img, 32, crop_pct, "pil", reference)
    # the reference is the training pipeline's crop (torchvision's Resize + CenterCrop on a PIL image)
    assert np.array_equal(ref, eval_crop(Image.fromarray(img.squeeze(-1) if c == 1 else img), 32, crop_pct, reference))
    variants = [v for v in resize_variants() if (v[0], v[1]) != ("pil", reference)]
    assert len(variants) == 15
    for v in variants:
        out = eval_crop_with(img, 32, crop_pct, *v)
        assert out.shape == ref.shape and out.dtype == np.uint8
        assert not np.array_equal(out, ref), f"{resize_name(*v)} gives the reference's pixels"


def test_colour_variants_change_colour_images_and_do_not_apply_to_grey():
    img = scene(31, 3)  # odd sides: I420 needs padding
    for variant in COLOURS:
        out = convert_colour(img, variant)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert not np.array_equal(out, img), variant
    assert np.array_equal(convert_colour(img, "bgr")[..., 0], img[..., 2])
    with pytest.raises(NotApplicable):
        convert_colour(scene(31, 1)[..., None], "bgr")


class PoolUp(nn.Module):
    """Conv -> MaxPool(2) -> AvgPool(3, 2) -> bilinear Upsample -> adaptive 2x2 pool -> linear."""

    def __init__(self, in_chans: int = 1, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AvgPool2d(3, stride=2), nn.Upsample(scale_factor=2, mode="bilinear"),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4, classes))

    def forward(self, x):
        return self.head(self.features(x))


def test_ceil_mode_flip_changes_output_shape_for_odd_input_sizes():
    model = PoolUp().eval()
    flipped, n = flip_ceil_mode(model)
    assert n == 2 and not model.features[2].ceil_mode and flipped.features[2].ceil_mode
    for size in (31, 33, 29):
        x = torch.randn(1, 1, size, size)
        pooled = model.features[:3](x).shape[-1]  # floor(size / 2)
        pooled_flipped = flipped.features[:3](x).shape[-1]  # ceil(size / 2)
        assert (pooled, pooled_flipped) == (size // 2, size // 2 + 1)
        assert model(x).shape == flipped(x).shape == (1, 4)
    x = torch.randn(1, 1, 32, 32)
    assert model.features[:3](x).shape == flipped.features[:3](x).shape  # even: the same
    assert flip_ceil_mode(nn.Sequential(nn.Conv2d(1, 2, 3)))[1] == 0


def test_align_corners_flip_changes_upsampling_and_counts_calls():
    model = PoolUp().eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        plain = model.features(x)
        with flipped_align_corners() as calls:
            flipped = model.features(x)
            torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")  # no align_corners: not counted
    assert calls[0] == 1
    assert plain.shape == flipped.shape and not torch.allclose(plain, flipped)
    assert torch.nn.functional.interpolate.__name__ == "interpolate" and calls[0] == 1  # restored afterwards
    with torch.no_grad():
        assert torch.equal(model.features(x), plain)


def train_poolup(in_chans: int = 1) -> nn.Module:
    from evaluation.adversarial import Normalized
    from test_robustness import MEAN, STD, quadrant_data

    torch.manual_seed(0)
    model = PoolUp(in_chans)
    f = Normalized(model, MEAN * in_chans, STD * in_chans)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = quadrant_data(256, seed=0)
    x = x.repeat(1, in_chans, 1, 1)
    for step in range(30):
        idx = torch.arange(step * 64, step * 64 + 64) % 256
        loss = nn.functional.cross_entropy(f(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_evaluate_sysnoise_end_to_end_and_report(tmp_path):
    from evaluation.report import write_sysnoise_report
    from test_robustness import MEAN, STD

    model = train_poolup(3)
    samples = []
    for img, label in quadrant_samples(12, seed=7):
        rgb = np.stack([img, img, (img * 0.8).astype(np.uint8)], -1)
        rgb = np.array(Image.fromarray(rgb).resize((36, 36), Image.BILINEAR))
        samples.append((png_bytes(rgb), label))
    extra = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))  # stands in for an INT8 model
    res = evaluate_sysnoise(model, samples, image_size=32, in_chans=3, mean=MEAN * 3, std=STD * 3,
                            interpolation="bilinear", batch_size=5, extra_models={"int8": extra})
    rows = {(r["axis"], r["name"]): r for r in res["variants"]}
    assert res["samples"] == 12 and res["decoder_reference"]["reencoded_as_jpeg"] == 12
    labels = torch.tensor([y for _, y in samples])
    with torch.no_grad():
        ref_x = torch.cat([_input(d, MEAN * 3, STD * 3) for d, _ in samples])
        ref_pred, int8_pred = model(ref_x).argmax(1), extra(ref_x).argmax(1)
    assert res["reference"]["top1"] == pytest.approx((ref_pred == labels).float().mean().item() * 100)
    # the stand-in INT8 model (untrained) sees the reference inputs: its row is computable by hand
    int8 = rows[("precision", "int8")]
    assert int8["flip_rate"] == pytest.approx((int8_pred != ref_pred).float().mean().item() * 100)
    assert int8["top1"] == pytest.approx((int8_pred == labels).float().mean().item() * 100)
    assert int8["flip_rate"] > 0
    for name in ("pil_ycbcr", "turbo_fastdct", "turbo_fastupsample"):
        if rows[("decoder", name)]["status"] == "ok":
            assert rows[("decoder", name)]["pixel_changed"] > 0
    assert rows[("decoder", "opencv")]["status"] == "ok"
    assert rows[("decoder", "torchvision_cuda")]["status"] == ("ok" if torch.cuda.is_available() else "unavailable")
    assert len([r for r in res["variants"] if r["axis"] == "resize"]) == 15
    assert all(rows[("resize", resize_name(*v))]["pixel_changed"] > 0
               for v in resize_variants() if (v[0], v[1]) != ("pil", "bilinear"))
    assert rows[("colour", "bgr")]["pixel_changed"] > 0
    for key in [("precision", "fp16"), ("precision", "bf16"), ("precision", "int8"),
                ("architecture", "ceil_mode"), ("architecture", "align_corners")]:
        row = rows[key]
        assert row["status"] == "ok", (key, row)
        assert row["flip_rate"] >= abs(row["delta_top1"]) - 1e-9  # a sample changes correctness only by flipping
        assert row["delta_top1"] == pytest.approx(row["top1"] - res["reference"]["top1"])
    assert rows[("architecture", "ceil_mode")]["mode"] == "2 pooling layers flipped"
    json.dumps(res)

    files = write_sysnoise_report(res, tmp_path)
    assert files["sysnoise_png"].stat().st_size > 0 and "ceil_mode" in files["html"].read_text()


def _input(data: bytes, mean, std) -> torch.Tensor:
    from evaluation.robustness import to_input

    return to_input([eval_crop(pil_decode(data, 3), 32, 1.0, "bilinear")], mean, std)


def test_model_without_pooling_or_upsampling_reports_not_applicable():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)).eval()
    samples = [(png_bytes(img), y) for img, y in quadrant_samples(4, seed=8)]
    res = evaluate_sysnoise(model, samples, image_size=32, in_chans=1, mean=(0.5,), std=(0.5,),
                            axes=["architecture", "colour", "decoder"])
    status = {r["name"]: r["status"] for r in res["variants"]}
    assert status["ceil_mode"] == status["align_corners"] == "not_applicable"
    assert status["bgr"] == status["yuv420"] == "not_applicable"  # grey model
    assert status["pil_ycbcr"] == "not_applicable" and status["opencv"] == "ok"
    with pytest.raises(ValueError, match="axis"):
        evaluate_sysnoise(model, samples, image_size=32, in_chans=1, mean=(0.5,), std=(0.5,), axes=["decoders"])


def test_a_model_that_breaks_under_the_ceil_mode_flip_is_reported_and_the_rest_still_runs():
    """Like CeiT, whose stem pooling then yields more tokens than it has position embeddings: at 31 px
    the pool gives 14x14 and, flipped, 15x15 features for a Linear sized for 14x14."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 14 * 14, 4)).eval()
    samples = [(png_bytes(img), y) for img, y in quadrant_samples(4, seed=9)]
    res = evaluate_sysnoise(model, samples, image_size=31, in_chans=1, mean=(0.5,), std=(0.5,),
                            axes=["architecture", "precision"])
    rows = {r["name"]: r for r in res["variants"]}
    assert rows["ceil_mode"]["status"] == "error"
    assert "does not run with ceil_mode flipped" in rows["ceil_mode"]["note"]
    assert rows["fp16"]["status"] == "ok" and res["samples"] == 4


def test_sysnoise_cli_writes_report_next_to_the_run(fake_platform, monkeypatch, capsys):  # noqa: F811
    import sys

    poolup = train_poolup(1)
    loader = sys.modules["foundation.engine.checkpoint"]
    recipe = loader.load_model("x")[1]
    monkeypatch.setattr(loader, "load_model", lambda ckpt, device="cpu", **_: (poolup, recipe))
    args = parse(["sysnoise", "--checkpoint", str(fake_platform), "--batch-size", "4", "--quiet"])
    assert args.func(args) == 0
    out = fake_platform.parent.parent / "eval" / "sysnoise"
    result = json.loads((out / "sysnoise.json").read_text())
    assert result["samples"] == 12 and result["skipped_samples"]["count"] == 1
    assert result["pipeline_matches_training"] is True
    assert {r["axis"] for r in result["variants"]} == {"decoder", "resize", "colour", "precision", "architecture"}
    assert (out / "report.md").read_text().count("|") > 20
    assert "Δtop-1" in capsys.readouterr().out


def test_decoder_names_are_all_handled():
    data = to_jpeg(png_bytes(scene(32, 3)), 3, 90)
    for name in DECODERS:
        try:
            assert decode(data, 3, name).shape == (32, 32, 3)
        except (NotApplicable, Unavailable):
            pass
    with pytest.raises(ValueError, match="unknown decoder"):
        decode(data, 3, "libpng")
    assert normalisation(3)[0] == (0.485, 0.456, 0.406)


def test_an_image_a_decoder_cannot_read_counts_as_a_wrong_flipped_prediction(monkeypatch):
    import evaluation.sysnoise as sysnoise

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)).eval()
    samples = [(png_bytes(img), y) for img, y in quadrant_samples(6, seed=10)]
    real = sysnoise.decode
    calls = {"n": 0}

    def flaky(data, in_chans, decoder="pil"):
        if decoder == "opencv":
            calls["n"] += 1
            if calls["n"] == 2:
                raise ValueError("OpenCV could not decode the image")
        return real(data, in_chans, decoder)

    monkeypatch.setattr(sysnoise, "decode", flaky)
    res = evaluate_sysnoise(model, samples, image_size=32, in_chans=1, mean=(0.5,), std=(0.5,), axes=["decoder"])
    row = next(r for r in res["variants"] if r["name"] == "opencv")
    assert row["status"] == "ok" and row["decode_failures"] == 1 and "OpenCV" in row["first_failure"]
    assert row["flip_rate"] == pytest.approx(100 / 6)
