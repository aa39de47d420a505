"""Converters round-trip: images (pixel-equal for lossless, original bytes for JPEG), labels, captions, counts."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import struct

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from foundation.data import DataError
from foundation.data.captions import SIMPLE_TEMPLATE, TEMPLATES, captions_for
from foundation.data.cli import add_cli
from foundation.data.shards import iter_raw_samples, read_manifest


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="foundation")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def image(seed: int, size: int = 12, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def samples_by_suffix(out, split: str) -> dict[str, dict]:
    """Samples keyed by their source name (keys are ``<index>_<source path>``)."""
    return {s["__key__"].split("_", 1)[1]: s for s in iter_raw_samples(str(out), split)}


def test_captions_templates():
    assert SIMPLE_TEMPLATE == "a photo of a {}."
    assert len(TEMPLATES) == 80 and len(set(TEMPLATES)) == 80 and all("{}" in t for t in TEMPLATES)
    assert captions_for("cat", [SIMPLE_TEMPLATE, "art of a {}."]) == ["a photo of a cat.", "art of a cat."]


def test_imagefolder_round_trip(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    files = {}
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            (src / split / cls).mkdir(parents=True)
            for i in range(n):
                fmt = ("PNG", "JPEG", "BMP")[i % 3]
                data = encoded(image(hash((split, cls, i)) % 1000), fmt)
                name = f"{cls}{i}.{fmt.lower()}"
                (src / split / cls / name).write_bytes(data)
                files[(split, f"{cls}_{cls}{i}")] = (fmt, data, cls)
    assert run_cli("build", str(src), "--format", "imagefolder", "--out", str(out), "--captions", "--workers", "2",
                   "--max-samples-per-shard", "3") == 0
    manifest = read_manifest(out)
    assert manifest["class_names"] == ["cat", "dog"]
    assert manifest["splits"]["train"]["samples"] == 8 and manifest["splits"]["val"]["samples"] == 4
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [3, 3, 2]
    assert manifest["splits"]["train"]["class_counts"] == {"0": 4, "1": 4}
    assert "imagefolder" in manifest["command"] and manifest["source"]["format"] == "imagefolder"
    for split in ("train", "val"):
        got = samples_by_suffix(out, split)
        assert len(got) == (8 if split == "train" else 4)
        for name, sample in got.items():
            fmt, data, cls = files[(split, name)]
            assert int(sample["cls"]) == ["cat", "dog"].index(cls)
            assert sample["txt"].decode() == f"a photo of a {cls}."
            if fmt == "JPEG":
                assert sample["jpg"] == data  # original bytes kept
            else:  # PNG kept, BMP re-encoded losslessly as PNG
                assert np.array_equal(pixels(sample["png"]), pixels(data))
    with pytest.raises(DataError, match="--overwrite"):
        run_cli("build", str(src), "--format", "imagefolder", "--out", str(out), "--workers", "0")
    assert run_cli("build", str(src), "--format", "imagefolder", "--out", str(out), "--workers", "0",
                   "--overwrite") == 0
    assert "txt" not in read_manifest(out)["splits"]["train"]["keys"]


def test_imagefolder_val_fraction_and_added_split(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(10):
            (src / cls / f"{i}.png").write_bytes(encoded(image(i), "PNG"))
    run_cli("build", str(src), "--format", "imagefolder", "--out", str(out), "--val-fraction", "0.2", "--workers", "0")
    m = read_manifest(out)["splits"]
    assert (m["train"]["samples"], m["val"]["samples"]) == (16, 4)
    assert m["val"]["class_counts"] == {"0": 2, "1": 2}  # stratified hold-out
    # a split added later keeps the class indices of the manifest
    (tmp_path / "extra" / "b").mkdir(parents=True)
    (tmp_path / "extra" / "b" / "x.png").write_bytes(encoded(image(99), "PNG"))
    run_cli("build", str(tmp_path / "extra"), "--format", "imagefolder", "--out", str(out), "--split", "test",
            "--workers", "0")
    test = list(iter_raw_samples(str(out), "test"))
    assert len(test) == 1 and test[0]["cls"] == b"1"
    assert set(read_manifest(out)["splits"]) == {"train", "val", "test"}


def test_caption_sidecars_round_trip(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(png_a := encoded(image(1), "PNG"))
    (src / "a.txt").write_text("a red square\n\nsecond caption\n")
    (src / "sub" / "b.jpg").write_bytes(jpg_b := encoded(image(2), "JPEG"))
    (src / "sub" / "b.txt").write_text("one line")
    (src / "c.png").write_bytes(encoded(image(3), "PNG"))  # no caption file: skipped and counted
    (src / "d.png").write_bytes(b"not an image")  # unreadable image: skipped and counted
    (src / "d.txt").write_text("caption of a broken image")
    run_cli("build", str(src), "--format", "captions", "--out", str(out), "--workers", "2")
    entry = read_manifest(out)["splits"]["train"]
    assert entry["samples"] == 2 and entry["skipped"] == 2
    got = samples_by_suffix(out, "train")
    assert got["a"]["txt"].decode().splitlines() == ["a red square", "second caption"]
    assert np.array_equal(pixels(got["a"]["png"]), pixels(png_a))
    assert got["sub_b"]["jpg"] == jpg_b and got["sub_b"]["txt"] == b"one line"


def test_table_csv_and_jsonl_round_trip(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        (imgs / f"{i}.png").write_bytes(encoded(image(10 + i, mode="L"), "PNG"))
    csv = tmp_path / "t.csv"
    csv.write_text("file,caption,category\nimgs/0.png,zero,shoe\nimgs/1.png,one,bag\nimgs/0.png,zero again,shoe\n"
                   "imgs/missing.png,lost,bag\nimgs/2.png,two,bag\n")
    out = tmp_path / "out_csv"
    run_cli("build", str(csv), "--format", "table", "--out", str(out), "--image-column", "file",
            "--label-column", "category", "--workers", "0")
    m = read_manifest(out)
    assert m["class_names"] == ["bag", "shoe"]
    assert m["splits"]["train"]["samples"] == 3 and m["splits"]["train"]["skipped"] == 1
    got = samples_by_suffix(out, "train")
    assert got["imgs_0"]["txt"].decode().splitlines() == ["zero", "zero again"]  # rows merged per image
    assert got["imgs_0"]["cls"] == b"1" and got["imgs_1"]["cls"] == b"0"
    assert np.array_equal(pixels(got["imgs_2"]["png"]), pixels((imgs / "2.png").read_bytes()))

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"image": "imgs/0.png", "text": ["a", "b"], "label": 3}\n{"image": "imgs/3.png", "text": "c", '
                     '"label": 1}\n{broken json\n')
    out = tmp_path / "out_jsonl"
    run_cli("build", str(jsonl), "--format", "table", "--out", str(out), "--split", "val", "--workers", "0")
    m = read_manifest(out)
    assert m["class_names"] is None and m["splits"]["val"]["samples"] == 2 and m["splits"]["val"]["skipped"] == 1
    got = samples_by_suffix(out, "val")
    assert got["imgs_0"]["txt"] == b"a\nb" and got["imgs_0"]["cls"] == b"3" and got["imgs_3"]["txt"] == b"c"
    with pytest.raises(DataError, match="no caption column 'nope'"):
        run_cli("build", str(jsonl), "--format", "table", "--out", str(tmp_path / "x"), "--caption-column", "nope")


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_round_trip(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 256, (30, 7, 9)), rng.integers(0, 256, (11, 7, 9))
    write_idx(src / "train-images-idx3-ubyte.gz", train)
    write_idx(src / "train-labels-idx1-ubyte.gz", np.arange(30) % 3)
    write_idx(src / "t10k-images-idx3-ubyte", val)
    write_idx(src / "t10k-labels-idx1-ubyte", np.arange(11) % 3)
    run_cli("build", str(src), "--format", "idx", "--out", str(out), "--class-names", "x,y,z", "--workers", "2",
            "--max-samples-per-shard", "8", "--captions")
    m = read_manifest(out)
    assert m["class_names"] == ["x", "y", "z"]
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (30, 11)
    assert len(m["splits"]["train"]["shards"]) == 4
    for split, arr in (("train", train), ("val", val)):
        samples = list(iter_raw_samples(str(out), split))
        assert len(samples) == len(arr)
        for s in samples:
            i = int(s["__key__"])
            assert np.array_equal(pixels(s["png"]), arr[i])  # PNG: lossless
            assert int(s["cls"]) == i % 3 and s["txt"].decode() == f"a photo of a {'xyz'[i % 3]}."


def test_existing_shards_reshard_and_inspect(tmp_path, capsys):
    src, out = tmp_path / "img2dataset", tmp_path / "out"
    src.mkdir()
    with wds.TarWriter(str(src / "00000.tar")) as w:
        for i in range(6):
            sample = {"__key__": f"0000{i:05d}", "jpg": encoded(image(i), "JPEG"), "txt": f"caption {i}".encode(),
                      "json": json.dumps({"url": f"http://x/{i}"}).encode()}
            if i == 4:
                sample["json"] = b"{not json"
            w.write(sample)
    run_cli("build", str(src), "--format", "shards", "--out", str(out), "--workers", "0")
    entry = read_manifest(out)["splits"]["train"]
    assert entry["samples"] == 5 and entry["skipped"] == 1
    originals = {s["__key__"]: s for s in iter_raw_samples(str(src), "train")}
    for s in iter_raw_samples(str(out), "train"):
        assert s["jpg"] == originals[s["__key__"]]["jpg"] and s["txt"] == originals[s["__key__"]]["txt"]
    assert run_cli("inspect", str(out), "--samples", "2") == 0
    text = capsys.readouterr().out
    assert "split train: 5 samples in 1 shards" in text and "txt='caption 0'" in text
