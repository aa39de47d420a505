"""Fashion-MNIST files are verified by sha256 before use: the Debian package's files pass, they are the
canonical download's data (proved by rebuilding the canonical files from them), and a tampered file,
local or downloaded, is refused with exit code 2 and a message naming the file and both digests."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
from torchvision.datasets import FashionMNIST

from foundation.cli import main
from foundation.data import DataError
from foundation.data.sources import idx
from foundation.data.sources.idx import (
    FASHION_MNIST_DEBIAN_SHA256,
    FASHION_MNIST_FILES,
    FASHION_MNIST_IDX_SHA256,
    FASHION_MNIST_SHA256,
    find_fashion_mnist,
    verify_fashion_mnist,
)

SRC = Path("/usr/share/datasets/fashion-mnist")
# gzip mtime of the canonical files (2017-08-31); Debian's copies carry 2020-06-05 and no file name
CANONICAL_MTIME = {"train": 1504176606, "t10k": 1504176627}


@pytest.fixture(scope="module", autouse=True)
def _debian_package():
    if not all((SRC / f).is_file() for f in FASHION_MNIST_FILES):
        pytest.fail(f"{SRC} is missing: `apt-get install dataset-fashion-mnist` (make test does it as root)")


def canonical_bytes(name: str) -> bytes:
    """The canonical download of ``name``, rebuilt from Debian's copy: the same deflate stream and trailer
    under the gzip header the dataset's authors wrote (FNAME flag, their mtime, the file name)."""
    debian = (SRC / name).read_bytes()
    assert debian[:4] == b"\x1f\x8b\x08\x00"  # gzip, deflate, no flags: Debian dropped the name
    mtime = CANONICAL_MTIME[name.split("-")[0]].to_bytes(4, "little")
    return b"\x1f\x8b\x08\x08" + mtime + debian[8:10] + name[:-3].encode() + b"\0" + debian[10:]


def test_the_debian_files_pass_and_are_the_canonical_data():
    assert verify_fashion_mnist(SRC) == {name: "debian" for name in FASHION_MNIST_FILES}
    published_md5 = {Path(name).name: md5 for name, md5 in FashionMNIST.resources}  # torchvision's copy
    for name in FASHION_MNIST_FILES:
        rebuilt = canonical_bytes(name)
        assert hashlib.md5(rebuilt).hexdigest() == published_md5[name]
        assert hashlib.sha256(rebuilt).hexdigest() == FASHION_MNIST_SHA256[name]
        assert hashlib.sha256((SRC / name).read_bytes()).hexdigest() == FASHION_MNIST_DEBIAN_SHA256[name]
        assert FASHION_MNIST_SHA256[name] != FASHION_MNIST_DEBIAN_SHA256[name]
        # both gunzip to the same IDX file, whose digest covers --src folders holding them unzipped
        assert hashlib.sha256(gzip.decompress(rebuilt)).hexdigest() == FASHION_MNIST_IDX_SHA256[name[:-3]]


def src_copy(tmp_path: Path, tamper: str | None = None, unzip: str | None = None) -> Path:
    """A --src folder: links to the Debian files, with ``tamper`` a copy with one byte changed and ``unzip``
    stored decompressed."""
    d = tmp_path / "src"
    d.mkdir()
    for name in FASHION_MNIST_FILES:
        if name == unzip:
            (d / name[:-3]).write_bytes(gzip.decompress((SRC / name).read_bytes()))
        elif name == tamper:
            data = bytearray((SRC / name).read_bytes())
            data[len(data) // 2] ^= 0x01
            (d / name).write_bytes(bytes(data))
        else:
            (d / name).symlink_to(SRC / name)
    return d


def test_a_tampered_file_is_refused_with_exit_2_naming_file_and_digests(tmp_path, capsys):
    name = "t10k-labels-idx1-ubyte.gz"
    src = src_copy(tmp_path, tamper=name)
    actual = hashlib.sha256((src / name).read_bytes()).hexdigest()
    out = tmp_path / "out"
    assert main(["data", "fashion-mnist", "--src", str(src), "--out", str(out), "--workers", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src / name}: not the published Fashion-MNIST {name}")
    assert f"sha256 {actual}, expected {FASHION_MNIST_SHA256[name]} (canonical) or " \
           f"{FASHION_MNIST_DEBIAN_SHA256[name]} (debian)" in lines[0]
    assert not (out / "manifest.json").exists()  # refused before anything was built


def test_unzipped_files_are_checked_against_the_idx_digest(tmp_path):
    name = "train-labels-idx1-ubyte.gz"
    src = src_copy(tmp_path, unzip=name)
    assert verify_fashion_mnist(src)[name[:-3]] == "idx"
    data = bytearray((src / name[:-3]).read_bytes())
    data[-1] = (data[-1] + 1) % 10  # the last label, still a valid IDX file
    (src / name[:-3]).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{name[:-3]}: not the published .* expected {FASHION_MNIST_IDX_SHA256[name[:-3]]}"):
        verify_fashion_mnist(src)


def test_downloads_are_verified_before_they_enter_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "FASHION_MNIST_DIRS", ())  # as on a machine without the Debian package
    served = {name: canonical_bytes(name) for name in FASHION_MNIST_FILES}

    def fake_urlretrieve(url: str, dest: Path):
        Path(dest).write_bytes(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(idx.urllib.request, "urlretrieve", fake_urlretrieve)
    bad = "train-images-idx3-ubyte.gz"
    served[bad] = served[bad][:-100]  # a truncated transfer
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=f"download of .*{bad} refused: .*{bad}.part: not the published .*"
                                        f"expected {FASHION_MNIST_SHA256[bad]}"):
        find_fashion_mnist(None, cache)
    assert sorted(p.name for p in cache.iterdir()) == []  # the bad file was the first: nothing kept

    served[bad] = canonical_bytes(bad)
    assert find_fashion_mnist(None, cache) == cache
    assert verify_fashion_mnist(cache) == {name: "canonical" for name in FASHION_MNIST_FILES}

    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage left in the cache")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: not the published"):
        verify_fashion_mnist(find_fashion_mnist(None, cache))
