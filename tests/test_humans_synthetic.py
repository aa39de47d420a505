"""Synthetic humans: deterministic for a seed, labels consistent across the five tasks, drawable by inspect."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from foundation.data import DataError
from foundation.data.cli import add_cli
from foundation.data.humans import DECODERS, task_info
from foundation.data.shards import iter_raw_samples, read_manifest
from foundation.data.synthetic_humans import ATTRIBUTES, CLASSES, background, generate

TASKS = ("pose", "parsing", "attributes", "reid", "detection")


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="foundation")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["data", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def humans(tmp_path_factory):
    out = tmp_path_factory.mktemp("humans") / "h"
    assert run_cli("synthetic-humans", "--out", str(out), "--n", "15", "--seed", "3", "--size", "96") == 0
    return out


def samples(out, task: str, splits=None) -> dict[str, dict]:
    splits = splits or read_manifest(out / task)["splits"]
    return {s["__key__"]: {**DECODERS[task](s), "raw": s} for split in splits for s in iter_raw_samples(str(out / task), split)}


def test_deterministic_for_a_seed(humans, tmp_path):
    again = generate(tmp_path / "again", 15, seed=3, size=96)
    other = generate(tmp_path / "other", 15, seed=4, size=96)
    for task in TASKS:
        shas = {n: [s["sha256"] for s in e["shards"]] for n, e in read_manifest(humans / task)["splits"].items()}
        assert shas == {n: [s["sha256"] for s in e["shards"]] for n, e in again[task]["splits"].items()}
        assert shas != {n: [s["sha256"] for s in e["shards"]] for n, e in other[task]["splits"].items()}
    with pytest.raises(DataError, match="--overwrite"):
        generate(tmp_path / "again", 15, seed=4, size=96)
    replaced = generate(tmp_path / "again", 15, seed=4, size=96, overwrite=True)
    assert replaced["pose"]["splits"]["train"]["shards"] == other["pose"]["splits"]["train"]["shards"]


def test_manifests_name_the_tasks(humans):
    assert task_info(humans / "parsing")["class_names"] == CLASSES
    assert task_info(humans / "attributes")["attribute_names"] == ATTRIBUTES
    pose = task_info(humans / "pose")
    assert pose["kind"] == "pose" and len(pose["keypoint_names"]) == 17 and len(pose["flip_pairs"]) == 8
    reid = read_manifest(humans / "reid")
    assert sorted(reid["splits"]) == ["gallery", "query", "train"]
    assert reid["splits"]["train"]["samples"] == 12 * 3 and reid["splits"]["query"]["samples"] == 3
    assert reid["splits"]["gallery"]["samples"] == 3 * 2 + 1  # the other views of the 3 test ids, a distractor
    assert read_manifest(humans / "detection")["source"]["note"].startswith("procedurally drawn")


def test_labels_are_consistent(humans):
    pose, parsing = samples(humans, "pose"), samples(humans, "parsing")
    attrs, reid = samples(humans, "attributes"), samples(humans, "reid")
    distractors = {k for k in reid if k.startswith("distractor")}
    assert len(distractors) == 1 and all(reid[k]["pid"] == 0 and reid[k]["split"] == "gallery" for k in distractors)
    assert pose.keys() == parsing.keys() == attrs.keys() == reid.keys() - distractors and len(pose) == 45
    upper = CLASSES.index("upper_clothes")
    head = {CLASSES.index(c) for c in ("face", "hair", "hat")}
    looks: dict[int, set] = {}
    cams: dict[int, set] = {}
    hidden = 0
    for key, p in pose.items():
        x, y, w, h = p["box"]
        kps = p["keypoints"]
        assert set(kps[:, 2].tolist()) <= {1.0, 2.0}
        hidden += int((kps[:, 2] == 1).sum())
        # keypoints inside their person's box, box = the silhouette's extent in the label map
        assert (kps[:, 0] >= x).all() and (kps[:, 0] < x + w).all() and (kps[:, 1] >= y).all() and (kps[:, 1] < y + h).all()
        labels = parsing[key]["label_map"]
        on = labels[kps[:, 1].astype(int), kps[:, 0].astype(int)]
        assert (on > 0).all()  # every joint lies on the person
        assert all(int(c) in head for c in on[:5][kps[:5, 2] == 2])  # a visible face keypoint is on the head
        ys, xs = np.nonzero(labels)
        assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
        # the mask is the person exactly: outside it the picture is the camera's backdrop, pixel for pixel
        img = parsing[key]["image"]
        backdrop = background(reid[key]["camid"], img.shape[1], img.shape[0], seed=3)
        np.testing.assert_array_equal(img[labels == 0], backdrop[labels == 0])
        assert (img != backdrop).any(-1)[labels > 0].mean() > 0.95
        assert labels.max() < len(CLASSES)
        # attributes are what the label map shows
        a = dict(zip(ATTRIBUTES, attrs[key]["attributes"].tolist()))
        for name in ("hat", "skirt", "bag"):
            assert a[name] == int((labels == CLASSES.index(name)).any()), (key, name)
        assert a["trousers"] + a["shorts"] + a["skirt"] == 1
        # the same identity wears the same colours in every camera
        r = reid[key]
        colours = {tuple(c) for c in p["image"][labels == upper]}
        looks.setdefault(r["pid"], set()).add(frozenset(colours))
        cams.setdefault(r["pid"], set()).add(r["camid"])
    assert all(len(v) == 1 for v in looks.values())
    assert 0 < hidden < 0.3 * 17 * len(pose)  # some joints are hidden behind an arm or a bag, most are not
    assert len({next(iter(v)) for v in looks.values()}) > 5  # identities do differ
    assert all(len(c) >= 2 for c in cams.values())


def test_detection_scenes(humans):
    scenes = samples(humans, "detection")
    assert len(scenes) == 5
    people = ignores = 0
    for s in scenes.values():
        h, w = s["image"].shape[:2]
        for full, vis in zip(s["boxes"], s["visible"]):
            assert full[2] > 0 and full[3] > 0 and full[0] >= 0 and full[1] >= 0
            assert full[0] + full[2] <= w and full[1] + full[3] <= h
            # the visible part lies within the full box
            assert vis[0] >= full[0] and vis[1] >= full[1]
            assert vis[0] + vis[2] <= full[0] + full[2] and vis[1] + vis[3] <= full[1] + full[3]
        assert len(s["heads"]) == len(s["boxes"])
        people += len(s["boxes"])
        ignores += len(s["ignore"])
    assert people >= 10
    labels = [json.loads(s["raw"]["json"]) for s in scenes.values()]
    occluded = sum(v != f for lab in labels for v, f in zip(lab["visible"], lab["boxes"]))
    assert occluded >= 1  # somebody stands behind somebody


def test_inspect_draws_every_task(humans, tmp_path):
    for task in TASKS:
        split = "query" if task == "reid" else "train"
        assert run_cli("inspect", str(humans / task), "--split", split, "--samples", "2",
                       "--draw", str(tmp_path / task)) == 0
        drawn = sorted((tmp_path / task).glob("*.png"))
        assert len(drawn) == 2
        img = np.asarray(Image.open(drawn[0]).convert("RGB"))
        assert img.shape[0] >= 256 and img.std() > 10
        marks = {"pose": (255, 0, 0), "detection": (0, 255, 0)}  # keypoints, full boxes
        if task in marks:
            assert (img == marks[task]).all(-1).sum() > 20


def test_pose_shard_evaluates_with_cocoeval(humans):
    """The bridge from a pose shard to COCO keypoint AP: exact keypoints score 1, a shift of every keypoint
    by 5 px in crops of ~70 px people scores clearly less."""
    from evaluation.human.pose import crops_to_coco, keypoint_ap

    labels = [json.loads(s["json"]) for s in iter_raw_samples(str(humans / "pose"), "val")]
    gt = crops_to_coco(labels)

    def results(shift: float) -> list[dict]:
        out = []
        for i, lab in enumerate(labels):
            kps = np.asarray(lab["keypoints"])
            kps[:, :2] += shift
            kps[:, 2] = 1
            out.append({"image_id": i, "category_id": 1, "keypoints": kps.ravel().tolist(), "score": 1.0})
        return out

    assert keypoint_ap(gt, results(0.0))["AP"] == pytest.approx(1.0)
    shifted = keypoint_ap(gt, results(5.0))["AP"]
    assert shifted < 0.6


def test_reid_split_scores_with_the_market_protocol(humans):
    """Garment colours (what stays the same across cameras; found through the parsing label map of the
    same key) find the right person; random features do not."""
    from evaluation.human.reid import evaluate_reid, pairwise_distance

    label_maps = {k: v["label_map"] for k, v in samples(humans, "parsing", ["val"]).items()}
    garments = [[CLASSES.index("upper_clothes")], [CLASSES.index(c) for c in ("pants", "skirt")]]

    def features(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feats, pids, cams = [], [], []
        for s in iter_raw_samples(str(humans / "reid"), split):
            t = DECODERS["reid"](s)
            img = t["image"].astype(np.float64)
            labels = label_maps.get(s["__key__"])
            if labels is None:  # a distractor: no parsing sample; the centre of the picture will do
                h, w = img.shape[:2]
                feats.append(np.tile(img[h // 3: 2 * h // 3, w // 3: 2 * w // 3].mean((0, 1)), 2))
            else:
                feats.append(np.concatenate([img[np.isin(labels, g)].mean(0) for g in garments]))
            pids.append(t["pid"])
            cams.append(t["camid"])
        return np.asarray(feats), np.asarray(pids), np.asarray(cams)

    qf, qp, qc = features("query")
    gf, gp, gc = features("gallery")
    assert (gp == 0).sum() == 1
    good = evaluate_reid(pairwise_distance(qf, gf), qp, gp, qc, gc)
    assert good["valid_queries"] == 3 and good["rank1"] == 1.0 and good["mAP"] == 1.0
    rng = np.random.default_rng(0)
    rand = evaluate_reid(pairwise_distance(rng.normal(size=qf.shape), rng.normal(size=gf.shape)), qp, gp, qc, gc)
    assert rand["mAP"] < 0.9
