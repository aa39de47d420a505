"""Frost blends ImageNet-C's own frost photographs (shipped in the imagecorruptions wheel, found without
importing its code) and reproduces make_imagenet_c.py's frost exactly for the same draws; without the
package it falls back to the generated texture, and the robustness result says which one was used."""

from __future__ import annotations

import numpy as np

from evaluation import corruptions as C

WEIGHTS = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)]  # make_imagenet_c.py's frost constants


def reference_frost(image: np.ndarray, severity: int, seed, photos) -> np.ndarray:
    """make_imagenet_c.py's frost at 224 px (no resize: crop a 224-px window of a photograph, BGR -> RGB,
    blend, clip), with the photograph and the crop drawn from the same generator as ours."""
    import cv2

    rng = np.random.default_rng(seed)
    frost = cv2.imread(str(photos[rng.integers(5)]))  # randint(5): frost6.jpg is never drawn
    top = rng.integers(frost.shape[0] - 224 + 1)
    left = rng.integers(frost.shape[1] - 224 + 1)
    frost = frost[top:top + 224, left:left + 224][..., [2, 1, 0]]
    keep, amount = WEIGHTS[severity - 1]
    out = np.clip(keep * image.astype(np.float64) + amount * frost, 0, 255)
    return np.rint(out).astype(np.uint8)


def photo(seed: int = 0) -> np.ndarray:
    """A 224-px RGB test picture: smooth gradients plus texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:224, 0:224] / 224.0
    base = np.stack([x, y, 1 - x * y], -1) * 200 + rng.normal(0, 12, (224, 224, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_imagecorruptions_photographs_are_found_and_used():
    photos = C._frost_photo_files()
    assert photos, ("the frost photographs of ImageNet-C were not found: install them with "
                    "`.venv/bin/pip install --no-deps imagecorruptions` (Apache-2.0; only its pictures are used)")
    assert [p.name for p in photos] == ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg"]
    assert C.frost_source() == "imagenet-c"
    image = photo()
    for severity in (1, 3, 5):
        for seed in ((0, 1, 8), (0, 7, 8)):
            ours = C.corrupt(image, "frost", severity, seed=seed)
            ref = reference_frost(image, severity, seed, photos)
            # identical up to float32 vs float64 rounding of the blend
            assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1, (severity, seed)
    # grey images get the photographs' luma; small images a scaled-down photograph (CIFAR-10-C: 0.2)
    grey = C.corrupt(image[..., 0], "frost", 3, seed=0)
    assert grey.shape == (224, 224) and psnr(image[..., 0], grey) < 25
    small = C.corrupt(image[:32, :32], "frost", 3, seed=0)
    assert small.shape == (32, 32, 3) and C._frost_photo_scale(32) == 0.2 and C._frost_photo_scale(224) == 1.0


def test_photographs_degrade_more_than_the_generated_texture(monkeypatch):
    """What made frost incomparable with published numbers: the generated texture is milder."""
    images = [photo(s) for s in range(3)]

    def mean_psnr(severity: int) -> float:
        return float(np.mean([psnr(im, C.corrupt(im, "frost", severity, seed=(0, i, 8)))
                              for i, im in enumerate(images)]))

    assert C._frost_photo_files(), "install imagecorruptions: `.venv/bin/pip install --no-deps imagecorruptions`"
    with_photos = [mean_psnr(s) for s in (1, 3, 5)]
    monkeypatch.setattr(C, "_frost_photo_files", lambda: ())
    assert C.frost_source() == "generated"
    generated = [mean_psnr(s) for s in (1, 3, 5)]
    assert all(g > p for g, p in zip(generated, with_photos)), (generated, with_photos)


def test_fallback_without_the_package(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    C._frost_photo_files.cache_clear()
    try:
        assert C._frost_photo_files() == () and C.frost_source() == "generated"
        image = photo()
        out = C.corrupt(image, "frost", 3, seed=0)
        assert out.shape == image.shape and not np.array_equal(out, image)
        assert np.array_equal(out, C.corrupt(image, "frost", 3, seed=0))  # deterministic
        keep, amount = WEIGHTS[2]
        texture = (out.astype(np.float64) / 255 - keep * image / 255) / amount  # what was blended in
        assert 0.3 < texture[out < 255].mean() < 0.7  # the generated bank (mean brightness ~0.5)
    finally:
        C._frost_photo_files.cache_clear()


def test_robustness_result_records_the_frost_source(monkeypatch):
    import torch

    from evaluation.robustness import evaluate_robustness

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3)).eval()
    samples = [(photo(i)[:64, :64], i % 3) for i in range(6)]
    kwargs = dict(image_size=64, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0,
                  interpolation="bilinear", corruptions=["frost", "fog"], severities=[1], attacks=[])
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    result = evaluate_robustness(model, samples, **kwargs)
    assert result["corruptions"]["frost_source"] == "imagenet-c"
    monkeypatch.setattr(C, "_frost_photo_files", lambda: ())
    result = evaluate_robustness(model, samples, **kwargs)
    assert result["corruptions"]["frost_source"] == "generated"
    no_frost = evaluate_robustness(model, samples, **{**kwargs, "corruptions": ["fog"]})
    assert no_frost["corruptions"]["frost_source"] is None
