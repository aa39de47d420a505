"""Shard reader: locating shards, evaluation exactly once, bad input skipped and counted, exact resume."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from foundation.config import DataConfig
from foundation.data import DataError
from foundation.data.shards import (
    build_eval_loader, build_train_loader, iter_raw_samples, read_manifest, resolve_shards, write_manifest, write_split,
)
from foundation.data.transforms import build_eval_transform, build_train_transform, decode_image

SIZE = 16


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_samples(prefix: str, n: int, bad: dict[int, str] | None = None) -> list[dict]:
    """``n`` samples (jpg, cls, txt, json); ``bad`` maps an index to a defect:
    truncated (JPEG cut in half), nocaption (txt missing), badjson."""
    out = []
    for i in range(n):
        s = {"__key__": f"{prefix}{i:05d}", "jpg": jpeg(hash((prefix, i)) % 10_000), "cls": str(i % 5).encode(),
             "txt": f"caption {prefix}{i}\nsecond {i}".encode(), "json": json.dumps({"i": i}).encode()}
        defect = (bad or {}).get(i)
        if defect == "truncated":
            s["jpg"] = s["jpg"][: len(s["jpg"]) // 2]
        elif defect == "nocaption":
            del s["txt"]
        elif defect == "badjson":
            s["json"] = b'{"i": '
        out.append(s)
    return out


def write_dataset(out, splits: dict[str, list[dict]], per_shard: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    entries = {name: write_split(out, name, samples, max_count=per_shard) for name, samples in splits.items()}
    write_manifest(out, None, entries, class_names=[f"c{i}" for i in range(5)], source={"format": "test"}, command="")


def config(**kw) -> DataConfig:
    base = dict(image_size=SIZE, workers=0, shuffle_buffer=0, augment={"interpolation": "bilinear"})
    return DataConfig(**{**base, **kw})


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])


def test_resolve_shards(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d, {"train": make_samples("t", 6), "val": make_samples("v", 3)}, per_shard=2)
    train = [str(d / f"train-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(str(d), "train") == [train]
    assert resolve_shards(str(d / "manifest.json"), "val") == [[str(d / "val-000000.tar"), str(d / "val-000001.tar")]]
    assert resolve_shards(f"{d}/train-{{000000..000002}}.tar::{d}", "train") == [train, train]
    with pytest.raises(DataError, match="no 'test' shards"):
        resolve_shards(str(d), "test")
    with pytest.raises(DataError, match="no 'test' split"):
        resolve_shards(str(d / "manifest.json"), "test")
    missing = f"{d}/train-{{000000..000004}}.tar"
    with pytest.raises(DataError, match="train-000003.tar"):
        resolve_shards(missing)
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        build_train_loader(config(train=str(tmp_path / "nowhere")), batch_size=2, seed=0, rank=0, world_size=1)
    other = tmp_path / "plain"  # shards not named after splits (img2dataset): all of them, whatever the split
    other.mkdir()
    write_split(other, "x", make_samples("p", 2))
    (other / "x-000000.tar").rename(other / "00000.tar")
    assert resolve_shards(str(other), "val") == [[str(other / "00000.tar")]]
    assert read_manifest(other) is None


@pytest.mark.parametrize("shards", [6, 1], ids=["shard-split", "sample-split"])
def test_eval_every_sample_once_over_ranks_and_workers(tmp_path, shards):
    d = tmp_path / "ds"
    samples = make_samples("v", 30)
    write_dataset(d, {"val": samples}, per_shard=-(-30 // shards))
    cfg = config(workers=2)
    keys = []
    for rank in range(2):
        loader = build_eval_loader(str(d), cfg, batch_size=4, rank=rank, world_size=2, tokenizer=tokenize)
        for batch in loader:
            assert batch["image"].shape[1:] == (3, SIZE, SIZE) and batch["image"].dtype == torch.float32
            assert batch["label"].dtype == torch.long and len(batch["text"]) == len(batch["key"])
            assert batch["tokens"].shape == (len(batch["key"]), 2)
            labels = {s["__key__"]: int(s["cls"]) for s in samples}
            assert batch["label"].tolist() == [labels[k] for k in batch["key"]]
            keys += batch["key"]
        assert loader.skipped == 0
    assert sorted(keys) == sorted(s["__key__"] for s in samples)


def test_bad_samples_skipped_and_counted_exactly(tmp_path):
    d = tmp_path / "ds"
    defects = {7: "truncated", 150: "nocaption", 233: "badjson"}  # 1% of 300
    samples = make_samples("s", 300, defects)
    write_dataset(d, {"val": samples}, per_shard=100)
    loader = build_eval_loader(str(d), config(workers=2), batch_size=32)
    keys = [k for batch in loader for k in batch["key"]]
    good = {s["__key__"] for i, s in enumerate(samples) if i not in defects}
    assert sorted(keys) == sorted(good)
    assert loader.skipped == 3
    reports = loader.pop_skip_reports()
    assert len(reports) == 3 and loader.pop_skip_reports() == []
    for i, reason in ((7, "corrupt image"), (150, "missing caption"), (233, "unreadable JSON")):
        assert any(f"val-00000{i // 100}.tar, s{i:05d}, {reason}" in r for r in reports), reports

    # training stream over one shard, no shuffle: every batch of 99 is one pass over the 99 good samples
    train = tmp_path / "train"
    write_dataset(train, {"train": samples[:100]}, per_shard=100)
    tl = build_train_loader(config(train=str(train)), batch_size=99, seed=0, rank=0, world_size=1)
    for passes in (1, 2, 3):
        batch = next(tl)
        assert sorted(batch["label"].tolist()) == sorted(int(s["cls"]) for i, s in enumerate(samples[:100]) if i != 7)
        assert tl.skipped == passes and len(tl.pop_skip_reports()) == 1
    assert "text" in batch and "image2" not in batch


def test_resumed_stream_continues_bitwise(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, {"train": make_samples("a", 40, {3: "truncated", 17: "badjson"})}, per_shard=10)
    write_dataset(b, {"train": make_samples("b", 20, {5: "nocaption"})}, per_shard=10)
    cfg = config(train=f"{a}::{b}/manifest.json", weights=[2.0, 1.0], workers=2, shuffle_buffer=16, two_view=True,
                 augment={"scale": (0.3, 1.0), "hflip": 0.5, "color_jitter": 0.2, "interpolation": "random"})
    kw = dict(batch_size=6, seed=3, rank=1, world_size=2, tokenizer=tokenize)
    first = build_train_loader(cfg, **kw)
    head = [next(first) for _ in range(5)]
    position = first.position()
    skipped = first.skipped
    tail = [next(first) for _ in range(3)]
    assert first.skipped >= skipped and first.epoch() == pytest.approx(8 * 6 * 2 / 60)
    first.close()

    path = tmp_path / "pos.pt"
    torch.save({"data": position}, path)
    restored = torch.load(path, weights_only=True)["data"]
    assert json.loads(json.dumps(restored)) == position
    resumed = build_train_loader(cfg, position=restored, **kw)
    assert resumed.skipped == skipped
    for old, new in zip(tail, [next(resumed) for _ in range(3)], strict=True):
        assert old.keys() == new.keys() == {"image", "image2", "label", "text", "tokens"}
        for key in ("image", "image2", "label", "tokens"):
            assert torch.equal(old[key], new[key]), key
        assert old["text"] == new["text"]
    assert resumed.position() == first.position()
    resumed.close()

    again = build_train_loader(cfg, **kw)  # determinism: same seed, same batches
    for old in head:
        new = next(again)
        assert torch.equal(old["image"], new["image"]) and old["text"] == new["text"]
    assert not torch.equal(head[0]["image"], head[0]["image2"])  # two independent views
    assert not torch.equal(head[0]["image"], head[1]["image"])
    again.close()
    with pytest.raises(DataError, match="workers=2 then, 0 now"):
        build_train_loader(cfg.model_copy(update={"workers": 0}), position=position, **kw)


def test_unreadable_shard_reported_and_others_continue(tmp_path):
    d = tmp_path / "ds"
    write_dataset(d, {"train": make_samples("g", 8)}, per_shard=8)
    (d / "train-000001.tar").write_bytes(b"this is not a tar file" * 50)
    (d / "train-000002.tar").write_bytes(b"")  # empty shard
    eval_loader = build_eval_loader(str(d), config(workers=0), batch_size=5, split="train")
    assert sum(len(b["key"]) for b in eval_loader) == 8
    reports = eval_loader.pop_skip_reports()
    assert any("train-000001.tar, -, unreadable shard" in r for r in reports), reports
    assert eval_loader.skipped == 0

    train = build_train_loader(config(train=str(d)), batch_size=4, seed=0, rank=0, world_size=1)
    batches = [next(train) for _ in range(12)]
    assert all(b["image"].shape[0] == 4 for b in batches)
    reports = train.pop_skip_reports()
    assert sum("train-000001.tar, -, unreadable shard" in r for r in reports) == 1  # once, though drawn often

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.tar").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no sample could be read"):
        next(build_train_loader(config(train=str(bad)), batch_size=2, seed=0, rank=0, world_size=1))


def test_targets_follow_the_shards(tmp_path):
    d = tmp_path / "ds"
    samples = make_samples("n", 6)
    for s in samples:
        del s["txt"]
    write_dataset(d, {"train": samples}, per_shard=6)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    batch = next(build_train_loader(config(train=str(d)), batch_size=3, seed=0, rank=0, world_size=1))
    assert set(batch) == {"image", "label"}
    assert torch.equal(torch.rand(3), expected)  # decoding in this process left its random state alone
    with pytest.raises(DataError, match="all unusable"):  # asking for captions the shards lack is a setting error
        next(build_train_loader(config(train=str(d), targets=["text"]), batch_size=3, seed=0, rank=0, world_size=1))


def test_transforms_and_decode(tmp_path):
    data = jpeg(0)
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2], 3)
    assert decode_image(data, 1).mode == "L" and decode_image(data, 3).mode == "RGB"
    gray = config(in_chans=1)
    x = build_train_transform(gray)(decode_image(data, 1))
    assert x.shape == (1, SIZE, SIZE)
    img = Image.new("L", (40, 20), 124)  # ImageNet's mean of means is 0.449 ~ 114.5/255
    y = build_eval_transform(gray)(img)
    assert y.shape == (1, SIZE, SIZE) and torch.allclose(y, torch.full_like(y, (124 / 255 - 0.449) / 0.226), atol=1e-3)
    with pytest.raises(DataError, match="data.mean has 3 values"):
        build_eval_transform(config(in_chans=1, mean=(0.5, 0.5, 0.5)))


def test_iter_raw_samples_in_order(tmp_path):
    d = tmp_path / "ds"
    samples = make_samples("r", 7)
    write_dataset(d, {"val": samples}, per_shard=3)
    raw = list(iter_raw_samples(str(d)))
    assert [s["__key__"] for s in raw] == [s["__key__"] for s in samples]
    assert raw[0]["jpg"] == samples[0]["jpg"] and raw[0]["__url__"].endswith("val-000000.tar")
