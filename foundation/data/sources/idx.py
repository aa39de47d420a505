"""IDX files of the MNIST family (MNIST, Fashion-MNIST, KMNIST, EMNIST ...), plain or gzipped.

``SRC`` is a folder holding ``<prefix>-images-idx3-ubyte[.gz]`` and ``<prefix>-labels-idx1-ubyte[.gz]``
pairs; a prefix ending in ``train`` becomes the train split, one ending in ``t10k`` or ``test`` the val
split. Images are stored as PNG (lossless), labels as ``cls``. ``fashion_mnist`` finds the Fashion-MNIST
files (Debian package ``dataset-fashion-mnist``, ``--src``, or the canonical download), checks every file's
sha256 before reading it, and builds them with class names.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from foundation.data import DataError
from foundation.data.sources.base import BuildOptions, Plan, run_plan
from foundation.trust import sha256_of

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(?P<prefix>.+?)[-_.](?P<kind>images|labels)[-_.]idx(?P<ndim>\d)[-_.]ubyte(?P<gz>\.gz)?$")
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian package dataset-fashion-mnist
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                       "t10k-labels-idx1-ubyte.gz")
# The canonical download (FASHION_MNIST_URL; the dataset's README and torchvision publish the md5 of the
# same files: 8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
# Debian's dataset-fashion-mnist (0.0~git20200523.55506a9-1) ships the same deflate streams with the gzip
# header's file name and time dropped, so its .gz files have digests of their own (each file is
# len(name) + 1 bytes shorter; tests/test_downloads.py puts the name and the 2017-08-31 time back and gets
# the canonical digests).
FASHION_MNIST_DEBIAN_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
# The decompressed IDX files (the same for both sources), for a --src folder holding them unzipped.
FASHION_MNIST_IDX_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` or not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path}: truncated or padded IDX file ({len(data)} bytes, expected {expected})")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape)


def _split_of(prefix: str) -> str | None:
    p = prefix.lower()
    if p.endswith("train"):
        return "train"
    if p.endswith("t10k") or p.endswith("test"):
        return "val"
    return None


def plan(src: Path, opts: BuildOptions) -> Plan:
    if not src.is_dir():
        raise DataError(f"{src}: not a directory; --format idx wants a folder of *-images-idx3-ubyte[.gz] files")
    pairs: dict[str, dict[str, Path]] = {}
    for f in sorted(src.iterdir()):
        m = _FILE.match(f.name)
        if m:
            pairs.setdefault(m["prefix"], {})[m["kind"]] = f
    splits = {}
    for prefix, files in sorted(pairs.items()):
        split = _split_of(prefix) or (opts.split if len(pairs) == 1 else None)
        if split is None or set(files) != {"images", "labels"}:
            log.warning("ignoring IDX files %s (need an images+labels pair named train/t10k/test)",
                        sorted(files.values()))
            continue
        if split in splits:
            raise DataError(f"{src}: several IDX pairs map to split {split!r}; keep one per split in the folder")
        images, labels = read_idx(files["images"]), read_idx(files["labels"])
        channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))
        if images.dtype != np.uint8 or not channels_ok:
            raise DataError(f"{files['images']}: expected uint8 images (N, H, W) or (N, H, W, 1|3), "
                            f"got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{files['labels']}: {labels.shape} labels for {len(images)} images")
        width = len(str(len(images) - 1))
        splits[split] = [{"key": f"{i:0{width}d}", "pixels": images[i], "label": int(labels[i])}
                         for i in range(len(images))]
    if not splits:
        raise DataError(f"{src}: no IDX images+labels pairs found (names like train-images-idx3-ubyte.gz)")
    splits = dict(sorted(splits.items(), key=lambda kv: kv[0] != "train"))  # train first
    return Plan(splits, encode, opts.class_names, {"format": "idx", "path": str(src.resolve())})


def encode(task: dict) -> dict:
    pixels = task["pixels"]
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "PNG")
    return {"png": buf.getvalue()}


def verify_fashion_mnist_file(path: Path, name: str | None = None) -> str:
    """Check ``path`` (the Fashion-MNIST file ``name``, default its own name) against the published sha256:
    returns which copy it is ("canonical", "debian" or "idx"); raises DataError naming the file, the
    expected and the actual digest otherwise."""
    name = name or path.name
    known = ({"canonical": FASHION_MNIST_SHA256[name], "debian": FASHION_MNIST_DEBIAN_SHA256[name]}
             if name.endswith(".gz") else {"idx": FASHION_MNIST_IDX_SHA256[name]})
    actual = sha256_of([path])
    for which, digest in known.items():
        if actual == digest:
            return which
    expected = " or ".join(f"{d} ({w})" for w, d in known.items())
    raise DataError(f"{path}: not the published Fashion-MNIST {name}: sha256 {actual}, expected {expected}; "
                    "the file is corrupt or altered: delete it and fetch it again")


def verify_fashion_mnist(d: Path) -> dict[str, str]:
    """Verify the four files in ``d`` (each gzipped or not) before anything reads them: {file: which copy}."""
    found = {}
    for name in FASHION_MNIST_FILES:
        path = d / name if (d / name).is_file() else d / name[:-3]
        found[path.name] = verify_fashion_mnist_file(path)
    return found


def find_fashion_mnist(src: str | None, cache: Path) -> Path:
    """A folder with the four Fashion-MNIST files: ``src``, the Debian package's, a cache, or a download."""
    if src is not None:
        d = Path(src).expanduser()
        if not all((d / f).is_file() or (d / f[:-3]).is_file() for f in FASHION_MNIST_FILES):
            raise DataError(f"--src {d} must hold {', '.join(FASHION_MNIST_FILES)} (gzipped or not)")
        return d
    for d in [*map(Path, FASHION_MNIST_DIRS), cache]:
        if all((d / f).is_file() for f in FASHION_MNIST_FILES):
            return d
    cache.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        if (cache / name).is_file():
            continue
        log.info("downloading %s%s", FASHION_MNIST_URL, name)
        tmp = cache / (name + ".part")
        try:
            urllib.request.urlretrieve(FASHION_MNIST_URL + name, tmp)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"Fashion-MNIST not found locally and the download of {FASHION_MNIST_URL + name} failed ({e}); "
                "install the Debian package dataset-fashion-mnist, or give --src DIR holding the four .gz files"
            ) from None
        try:
            verify_fashion_mnist_file(tmp, name)
        except DataError as e:
            tmp.unlink()
            raise DataError(f"download of {FASHION_MNIST_URL + name} refused: {e}") from None
        tmp.replace(cache / name)
    return cache


def fashion_mnist(out: Path, opts: BuildOptions, src: str | None = None, cache: Path | None = None) -> dict:
    """Build Fashion-MNIST train (60,000) / val (10,000) shards with class names; returns the manifest."""
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "foundation" / "fashion-mnist"
    d = find_fashion_mnist(src, cache)
    verify_fashion_mnist(d)  # the Debian package's, --src and the cache alike: nothing unverified is read
    opts.class_names = FASHION_MNIST_CLASSES
    p = plan(d, opts)
    if set(p.splits) != {"train", "val"}:
        raise DataError(f"{d}: expected Fashion-MNIST train and t10k files, found splits {sorted(p.splits)}")
    p.source = {"format": "idx", "dataset": "fashion-mnist", "path": str(d.resolve())}
    return run_plan(p, out, opts)
