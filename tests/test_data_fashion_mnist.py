"""Fashion-MNIST from the Debian package dataset-fashion-mnist: 60,000 / 10,000 samples, 6,000 / 1,000 per class."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foundation.config import DataConfig
from foundation.data.shards import build_train_loader, class_names, iter_raw_samples, read_manifest
from foundation.data.sources.idx import FASHION_MNIST_CLASSES, read_idx

pytestmark = pytest.mark.slow  # builds all 70,000 images into shards: the full tier (make test-all)

SRC = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module", autouse=True)
def _debian_package():
    """`make test` installs the package when run as root (CI does); anywhere else say what is missing."""
    if not (SRC / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"{SRC} is missing: `apt-get install dataset-fashion-mnist` (make test does it as root)")


@pytest.fixture(scope="module")
def shards(fmnist_shards) -> Path:
    return fmnist_shards  # conftest: built once per session, shared with the multi-task recipe test


def test_counts_per_split_and_class(shards):
    manifest = read_manifest(shards)
    assert manifest["class_names"] == FASHION_MNIST_CLASSES == class_names(str(shards))
    assert manifest["source"]["path"] == str(SRC)
    for split, n in (("train", 60_000), ("val", 10_000)):
        entry = manifest["splits"][split]
        assert entry["samples"] == n == sum(s["samples"] for s in entry["shards"])
        assert entry["class_counts"] == {str(c): n // 10 for c in range(10)}
    # the shards themselves, not only the manifest (val only: reading all 60,000 would double the test's time)
    labels = Counter(int(s["cls"]) for s in iter_raw_samples(str(shards), "val"))
    assert labels == {c: 1_000 for c in range(10)}


def test_pixels_and_captions_match_the_idx_files(shards):
    images = read_idx(SRC / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(SRC / "t10k-labels-idx1-ubyte.gz")
    for sample in iter_raw_samples(str(shards), "val"):
        i = int(sample["__key__"])
        if i % 97 == 0:
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), images[i])
            assert int(sample["cls"]) == labels[i]
            assert sample["txt"].decode() == f"a photo of a {FASHION_MNIST_CLASSES[labels[i]]}."


def test_recipe_style_batch(shards):
    cfg = DataConfig(train=str(shards / "manifest.json"), image_size=32, in_chans=1, mean=(0.286,), std=(0.353,),
                     workers=0, shuffle_buffer=100)
    batch = next(build_train_loader(cfg, batch_size=16, seed=0, rank=0, world_size=1))
    assert batch["image"].shape == (16, 1, 32, 32) and batch["label"].shape == (16,) and len(batch["text"]) == 16
