"""O(1) data resume: a saved position reopens the stream without reading what came before it, exactly."""

from __future__ import annotations

import io
import shlex
import tarfile

import pytest
import torch
import webdataset as wds

from foundation.data import DataError
from foundation.data import tars, train_stream
from foundation.data.train_stream import build_train_loader
from test_data_reader import config, make_samples, tokenize, write_dataset


@pytest.fixture
def counted_reads(monkeypatch):
    """Counts the samples whose bytes the reader takes out of tar files (workers=0: same process)."""
    counts = {"samples": 0}
    real = train_stream.tar_samples

    def counting(*args, **kwargs):
        for item in real(*args, **kwargs):
            counts["samples"] += 1
            yield item

    monkeypatch.setattr(train_stream, "tar_samples", counting)
    return counts


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_resume_from_every_batch_is_bitwise(tmp_path):
    """Positions at every batch, across shard ends, a full and a draining buffer, two sources, two workers."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, {"train": make_samples("a", 21, {4: "truncated"})}, per_shard=5)
    write_dataset(b, {"train": make_samples("b", 7)}, per_shard=3)
    cfg = config(train=f"{a}::{b}", weights=[3.0, 1.0], workers=2, shuffle_buffer=6,
                 augment={"hflip": 0.5, "interpolation": "bilinear"})
    kw = dict(batch_size=4, seed=7, rank=0, world_size=1, tokenizer=tokenize)
    straight = build_train_loader(cfg, **kw)
    batches, positions = [], [straight.position()]
    for _ in range(14):
        batches.append(next(straight))
        positions.append(straight.position())
    straight.close()
    assert positions[-1]["streams"][0][0]["draw"] > 2  # several shards of source a were passed through
    for start in (1, 5, 9, 13):
        resumed = build_train_loader(cfg, position=positions[start], **kw)
        for n in range(start, 14):
            assert _equal(batches[n], next(resumed)), (start, n)
            assert resumed.position() == positions[n + 1]
        resumed.close()


def test_resume_reads_only_the_current_shard_and_the_buffer(tmp_path, counted_reads):
    d = tmp_path / "d"
    write_dataset(d, {"train": make_samples("s", 60)}, per_shard=20)
    cfg = config(train=str(d), shuffle_buffer=8)
    kw = dict(batch_size=5, seed=0, rank=0, world_size=1)
    loader = build_train_loader(cfg, **kw)
    early = late = None
    for step in range(1, 121):  # 600 samples: 30 shards drawn
        next(loader)
        if step == 2:
            early = loader.position()
        if step == 120:
            late = loader.position()
    expected = next(loader)["image"]
    read_straight = counted_reads["samples"]
    assert read_straight >= 600

    def resume_reads(position: dict) -> tuple[int, torch.Tensor]:
        counted_reads["samples"] = 0
        batch = next(build_train_loader(cfg, position=position, **kw))
        return counted_reads["samples"], batch["image"]

    late_reads, image = resume_reads(late)
    early_reads, _ = resume_reads(early)
    assert torch.equal(image, expected)
    # the 8 buffered samples, then one batch of 5: what a resume reads does not grow with the step
    assert late_reads <= 8 + 5 and early_reads <= 8 + 5, (early_reads, late_reads)


def test_remote_stream_shards_resume_exactly(tmp_path):
    """Shards read as a stream (``pipe:``): earlier members are read past, not decoded; same batches."""
    d = tmp_path / "d"
    write_dataset(d, {"train": make_samples("p", 12)}, per_shard=4)
    spec = f"pipe:cat {shlex.quote(str(d))}/train-{{000000..000002}}.tar::{d}"
    cfg = config(train=spec, weights=[1.0, 1.0], shuffle_buffer=3, targets=["label"])
    kw = dict(batch_size=3, seed=1, rank=0, world_size=1)
    first = build_train_loader(cfg, **kw)
    for _ in range(5):
        next(first)
    position = first.position()
    tail = [next(first)["image"] for _ in range(3)]
    resumed = build_train_loader(cfg, position=position, **kw)
    assert all(torch.equal(t, next(resumed)["image"]) for t in tail)


def test_old_and_mismatched_positions_fail_clearly(tmp_path):
    d = tmp_path / "d"
    write_dataset(d, {"train": make_samples("o", 12)}, per_shard=4)
    cfg = config(train=str(d), shuffle_buffer=4)
    kw = dict(batch_size=3, seed=0, rank=0, world_size=1)
    loader = build_train_loader(cfg, **kw)
    for _ in range(3):
        next(loader)
    position = loader.position()
    old = {k: v for k, v in position.items() if k != "streams"} | {"version": 1}
    with pytest.raises(DataError, match="train.resume_data=restart"):
        build_train_loader(cfg, position=old, **kw)
    with pytest.raises(DataError, match="source"):  # a second source appeared in data.train
        build_train_loader(config(train=f"{d}::{d}", shuffle_buffer=4), position=position, **kw)
    assert max(position["streams"][0][0]["buffer_offsets"]) > 0, "the buffer should hold a shard's later samples"
    write_dataset(d, {"train": make_samples("o", 3)}, per_shard=1)  # rebuilt smaller: the buffered samples are gone
    with pytest.raises(DataError, match="fewer samples than when the data position was saved"):
        next(build_train_loader(cfg, position=position, **kw))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_tar_reader_agrees_with_webdataset(tmp_path, fmt, gz):
    """Long names (pax path / GNU long name / ustar prefix), directories, meta files, compression."""
    path = tmp_path / ("s.tar.gz" if gz else "s.tar")
    deep = "d" * 60 + "/" + "e" * 60  # over 100 characters: stored outside the plain name field
    members = [("dir/", None), ("__meta__.json", b"{}"), (f"{deep}/k1.jpg", b"x" * 700), (f"{deep}/k1.CLS", b"3"),
               ("k2.jpg", b""), ("k2.txt", "caption é".encode()), ("k3.a.b", b"y" * 512), ("k3.json", b"{}")]
    if fmt == tarfile.USTAR_FORMAT:
        members = [(n.replace("d" * 60 + "/", "d/"), d) for n, d in members]
    with tarfile.open(path, "w:gz" if gz else "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    read = list(tars.tar_samples(str(path)))
    ours = [s for _, _, s in read]
    theirs = list(wds.tarfile_to_samples()(iter([{"url": str(path)}])))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs] and len(ours) == 4
    for a, b in zip(ours, theirs, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("__")} == {
            k: v for k, v in b.items() if not k.startswith("__")}
    assert [o for o, _, _ in tars.tar_samples(str(path), wanted={2})] == [2]
    assert [s["__key__"] for _, _, s in tars.tar_samples(str(path), start=2)] == ["k2", "k3"]
    for ordinal, at, sample in read:  # a sample's byte offset finds it again (-1: compressed, no seeking)
        assert (at >= 0) == (not gz)
        again = list(tars.tar_samples(str(path), ordinal, at=at, at_ordinal=ordinal))
        assert again[0][0] == ordinal and again[0][2] == sample and len(again) == 4 - ordinal
    if not gz:
        data = path.read_bytes()
        path.write_bytes(data[: data.index(b"x" * 700) + 100])  # cut inside k1.jpg
        with pytest.raises(tarfile.ReadError):
            list(tars.tar_samples(str(path)))
