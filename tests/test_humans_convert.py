"""Human-centric converters round-trip: fixtures written in each dataset's own format → shards → decoded
targets equal to what was written (labels and pixels), bad input skipped and reported with the file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from foundation.data.cli import add_cli
from foundation.data.humans import COCO_KEYPOINTS, DECODERS, task_info
from foundation.data.shards import iter_raw_samples, read_manifest
from foundation.data.sources.coco_keypoints import crop_region


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="foundation")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def random_image(seed: int, w: int, h: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(array: np.ndarray, path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def decoded(out, split: str, kind: str) -> dict[str, dict]:
    return {s["__key__"]: {**DECODERS[kind](s), "raw": s} for s in iter_raw_samples(str(out), split)}


# ---------------------------------------------------------------------------------------------- COCO


def test_coco_keypoints_round_trip(tmp_path):
    root, out = tmp_path / "coco", tmp_path / "out"
    images = {1: random_image(1, 80, 60), 2: random_image(2, 50, 70)}
    for i, img in images.items():
        save(img, root / "val2017" / f"{i:012d}.png")
    rng = np.random.default_rng(0)

    def person(ann_id, image_id, box, n_labelled=17, **extra):
        x, y, w, h = box
        kps = []
        for k in range(17):
            if k < n_labelled:
                kps += [round(float(rng.uniform(min(x, x + w), max(x, x + w))), 2), round(float(rng.uniform(y, y + h)), 2), 1 + k % 2]
            else:
                kps += [0, 0, 0]
        return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": box, "area": w * h, "iscrowd": 0,
                "num_keypoints": n_labelled, "keypoints": kps, **extra}

    anns = [person(10, 1, [5.5, 4.0, 20.0, 40.0]), person(11, 1, [50.0, 10.0, 25.0, 30.0], n_labelled=9),
            person(12, 2, [0.0, 0.0, 30.0, 20.0]),  # wide box at the corner: crop reaches outside
            person(13, 2, [10.0, 10.0, -5.0, 20.0]),  # negative width: bad input
            person(14, 2, [10.0, 10.0, 20.0, 20.0], iscrowd=1),  # crowd: left out as in training
            person(15, 2, [10.0, 10.0, 20.0, 20.0], n_labelled=0)]  # nothing labelled: left out
    outside = person(16, 1, [10.0, 10.0, 20.0, 20.0])
    outside["keypoints"][0] = 95.0  # x beyond the 80-px-wide image: bad input
    anns.append(outside)
    coco = {"images": [{"id": 1, "file_name": "000000000001.png", "width": 80, "height": 60},
                       {"id": 2, "file_name": "000000000002.png", "width": 50, "height": 70}],
            "annotations": anns,
            "categories": [{"id": 1, "name": "person", "keypoints": COCO_KEYPOINTS,
                            "skeleton": [[16, 14], [14, 12], [6, 7]]}]}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "person_keypoints_val2017.json").write_text(json.dumps(coco))

    assert run_cli("build", str(root), "--format", "coco_keypoints", "--out", str(out), "--workers", "1") == 0
    manifest = read_manifest(out)
    info = task_info(manifest)
    assert info["kind"] == "pose" and info["keypoint_names"] == COCO_KEYPOINTS
    assert info["skeleton"] == [[15, 13], [13, 11], [5, 6]]  # 0-based
    assert [1, 2] in info["flip_pairs"] and [15, 16] in info["flip_pairs"] and len(info["flip_pairs"]) == 8
    assert info["sigmas"][0] == 0.026
    val = manifest["splits"]["val"]
    assert val["samples"] == 3 and val["skipped"] == 2
    reasons = " ".join(val["skip_examples"])
    assert "annotation 13" in reasons and "non-positive size" in reasons
    assert "annotation 16" in reasons and "outside" in reasons and "person_keypoints_val2017.json" in reasons
    assert manifest["source"]["filtered"] == {"crowd": 1, "no_keypoints": 1}

    samples = {s["raw"]["json"] and json.loads(s["raw"]["json"])["id"]: s for s in decoded(out, "val", "pose").values()}
    assert sorted(samples) == [10, 11, 12]
    by_id = {a["id"]: a for a in anns}
    for ann_id, s in samples.items():
        a = by_id[ann_id]
        region = crop_region(a["bbox"])
        assert s["crop"].tolist() == region
        x0, y0, x1, y1 = region
        h, w = y1 - y0, x1 - x0
        assert abs(w / h - 0.75) < 0.05 and h >= a["bbox"][3] * 1.25 - 1  # 3:4 aspect, padded 1.25
        src = images[a["image_id"]]
        # pixels: the crop equals the source region, black outside the image
        expect = np.zeros((h, w, 3), np.uint8)
        ys, xs = slice(max(y0, 0), min(y1, src.shape[0])), slice(max(x0, 0), min(x1, src.shape[1]))
        expect[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0] = src[ys, xs]
        np.testing.assert_array_equal(s["image"], expect)
        kps = np.asarray(a["keypoints"], np.float32).reshape(17, 3)
        got = s["keypoints"].copy()
        labelled = kps[:, 2] > 0
        got[labelled, :2] += s["crop"][:2]
        np.testing.assert_allclose(got, kps, atol=1e-3)
        np.testing.assert_allclose(s["box"][:2] + s["crop"][:2], a["bbox"][:2], atol=1e-4)
        assert json.loads(s["raw"]["json"])["area"] == a["area"]  # the OKS scale travels with the crop
        # keypoints fall on the pixels they named: crop pixel == source pixel
        for (kx, ky, v), (ox, oy, _) in zip(s["keypoints"][labelled], kps[labelled]):
            if 0 <= int(ky) < h and 0 <= int(kx) < w:
                assert (s["image"][int(ky), int(kx)] == src[int(oy), int(ox)]).all()
    assert samples[12]["crop"][0] < 0 and samples[12]["crop"][1] < 0  # reaches outside: padded


# ---------------------------------------------------------------------------------------------- parsing


def test_lip_and_cihp_parsing_round_trip(tmp_path):
    from foundation.data.humans import LIP_CLASSES

    lip, out = tmp_path / "LIP", tmp_path / "out"
    rng = np.random.default_rng(0)
    expect = {}
    for split, ids in (("train", ["100_a", "101_b", "102_c", "103_d", "104_e"]), ("val", ["200_a"])):
        for i, stem in enumerate(ids):
            img = random_image(i, 24 + i, 30)
            save(img, lip / "TrainVal_images" / f"{split}_images" / f"{stem}.jpg", "JPEG")
            labels = rng.integers(0, 20, (30, 24 + i), dtype=np.uint8)
            labels[0, :3] = 255  # ignore label is fine
            if stem == "101_b":
                labels = labels[:, :-2]  # label map narrower than its image: bad input
            if stem == "102_c":
                labels[5, 5] = 25  # beyond the 20 LIP classes: bad input
            if stem != "103_d":  # no label map: bad input
                save(labels, lip / "TrainVal_parsing_annotations" / f"{split}_segmentations" / f"{stem}.png")
            expect[stem] = ((lip / "TrainVal_images" / f"{split}_images" / f"{stem}.jpg").read_bytes(), labels)
        (lip / "TrainVal_images" / f"{split}_id.txt").write_text("\n".join(ids) + "\n")
    assert run_cli("build", str(lip), "--format", "human_parsing", "--out", str(out), "--workers", "2") == 0
    manifest = read_manifest(out)
    assert task_info(manifest)["class_names"] == LIP_CLASSES
    train = manifest["splits"]["train"]
    assert train["samples"] == 2 and train["skipped"] == 3
    reasons = " | ".join(train["skip_examples"])
    assert "101_b.png: label map is 23x30, its image 25x30" in reasons
    assert "102_c.png: label values [25]" in reasons and "103_d.png: missing label map" in reasons
    got = {**decoded(out, "train", "parsing"), **decoded(out, "val", "parsing")}
    assert len(got) == 3
    for key, s in got.items():
        stem = key.split("_", 1)[1]
        jpg, labels = expect[stem]
        assert s["raw"]["jpg"] == jpg  # JPEG bytes kept as they are
        np.testing.assert_array_equal(s["label_map"], labels)
        assert s["label_map"].shape == s["image"].shape[:2]

    # CIHP: Training/Images + Training/Category_ids (palette PNGs), names from --class-names
    cihp, out2 = tmp_path / "CIHP", tmp_path / "out2"
    labels = rng.integers(0, 3, (16, 12), dtype=np.uint8)
    save(random_image(9, 12, 16), cihp / "Training" / "Images" / "0001.png")
    seg = Image.fromarray(labels, "P")
    seg.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    (cihp / "Training" / "Category_ids").mkdir(parents=True)
    seg.save(cihp / "Training" / "Category_ids" / "0001.png")
    (cihp / "Training" / "train_id.txt").write_text("0001\n")
    assert run_cli("build", str(cihp), "--format", "human_parsing", "--out", str(out2), "--workers", "1",
                   "--class-names", "background,upper,lower") == 0
    (s,) = decoded(out2, "train", "parsing").values()
    np.testing.assert_array_equal(s["label_map"], labels)
    np.testing.assert_array_equal(s["image"], random_image(9, 12, 16))
    assert task_info(out2)["class_names"] == ["background", "upper", "lower"]


# ---------------------------------------------------------------------------------------------- attributes


def test_pa100k_mat_round_trip(tmp_path):
    from scipy.io import savemat

    root, out = tmp_path / "PA-100K", tmp_path / "out"
    names = ["Female", "Hat", "Glasses", "Backpack"]
    rng = np.random.default_rng(0)
    cell = lambda xs: np.array([[x] for x in xs], dtype=object)  # noqa: E731 - a MATLAB column cell
    data = {"attributes": cell(names)}
    labels = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        files = [f"{split}{i:05d}.jpg" for i in range(n)]
        for i, f in enumerate(files):
            save(random_image(len(labels), 10, 20), root / "data" / f, "JPEG")
        lab = rng.integers(0, 2, (n, len(names))).astype(np.uint8)
        data[f"{split}_images_name"] = cell(files)
        data[f"{split}_label"] = lab
        labels.update({Path(f).stem: lab[i] for i, f in enumerate(files)})
    (root / "data" / "val00001.jpg").unlink()  # a missing image: bad input
    savemat(root / "annotation.mat", data)
    assert run_cli("build", str(root), "--format", "pa100k", "--out", str(out), "--workers", "1") == 0
    manifest = read_manifest(out)
    assert task_info(manifest)["attribute_names"] == names
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 4, "val": 1, "test": 2}
    assert "val row 2: missing image" in manifest["splits"]["val"]["skip_examples"][0]
    for split in ("train", "val", "test"):
        for key, s in decoded(out, split, "attributes").items():
            np.testing.assert_array_equal(s["attributes"], labels[key.split("_", 1)[1]])
            assert s["raw"]["jpg"] == (root / "data" / f"{key.split('_', 1)[1]}.jpg").read_bytes()


def test_attribute_csv_round_trip(tmp_path):
    src, out = tmp_path / "attrs", tmp_path / "out"
    for i in range(5):
        save(random_image(i, 8, 16), src / "img" / f"p{i}.png")
    (src / "labels.csv").write_text("image,hat,bag,skirt,split\n"
                                    "img/p0.png,1,0,-1,train\n"
                                    "img/p1.png,0,,1,train\n"
                                    "img/p2.png,2,0,0,train\n"  # 2 is not a label: bad input
                                    "img/p3.png,true,no,0,val\n"
                                    "img/missing.png,1,1,1,train\n")  # missing image: bad input
    assert run_cli("build", str(src / "labels.csv"), "--format", "attribute_table", "--out", str(out),
                   "--workers", "1", "--no-shuffle") == 0
    manifest = read_manifest(out)
    assert task_info(manifest)["attribute_names"] == ["hat", "bag", "skirt"]
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["splits"]["train"]["skipped"] == 2
    reasons = " ".join(manifest["splits"]["train"]["skip_examples"])
    assert "labels.csv:4: values {'hat': '2'}" in reasons and "missing.png" in reasons
    got = {k.split("_", 1)[1]: s for split in ("train", "val") for k, s in decoded(out, split, "attributes").items()}
    assert {k: s["attributes"].tolist() for k, s in got.items()} == {
        "img_p0": [1, 0, -1], "img_p1": [0, -1, 1], "img_p3": [1, 0, 0]}
    np.testing.assert_array_equal(got["img_p1"]["image"], random_image(1, 8, 16))

    # list form: present attributes by name, the vocabulary from --class-names; an unknown name is bad input
    (src / "list.csv").write_text("image,attributes\nimg/p0.png,hat;skirt\nimg/p1.png,\nimg/p2.png,hat|cape\n")
    out2 = tmp_path / "out2"
    assert run_cli("build", str(src / "list.csv"), "--format", "attribute_table", "--out", str(out2),
                   "--workers", "1", "--class-names", "hat,bag,skirt", "--no-shuffle") == 0
    m2 = read_manifest(out2)
    assert m2["splits"]["train"]["skipped"] == 1 and "unknown attribute name(s) ['cape']" in m2["splits"]["train"]["skip_examples"][0]
    got2 = {k.split("_", 1)[1]: s["attributes"].tolist() for k, s in decoded(out2, "train", "attributes").items()}
    assert got2 == {"img_p0": [1, 0, 1], "img_p1": [0, 0, 0]}


# ---------------------------------------------------------------------------------------------- ReID


def test_market1501_round_trip(tmp_path):
    from evaluation.human.reid import evaluate_reid

    root, out = tmp_path / "Market-1501-v15.09.15", tmp_path / "out"
    names = {"bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s2_001000_02.jpg",
                                    "0000_c1s1_000001_01.jpg", "-1_c1s1_000002_01.jpg", "Thumbs.jpg"],
             "query": ["0010_c1s1_001051_00.jpg", "0011_c4s3_000100_00.jpg"],
             "bounding_box_test": ["0010_c1s1_001100_01.jpg", "0010_c2s1_001200_01.jpg", "0000_c3s1_000001_01.jpg",
                                   "-1_c1s1_000003_01.jpg", "0011_c5s3_000300_02.jpg", "0011_c4s3_000900_01.jpg"]}
    files = {}
    for folder, fs in names.items():
        for i, f in enumerate(fs):
            save(random_image(len(files), 8, 16), root / folder / f, "JPEG")
            files[Path(f).stem] = (root / folder / f).read_bytes()
    assert run_cli("build", str(root), "--format", "market1501", "--out", str(out), "--workers", "1") == 0
    manifest = read_manifest(out)
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 3, "query": 2, "gallery": 6}
    train = manifest["splits"]["train"]
    reasons = " ".join(train["skip_examples"])
    assert train["skipped"] == 3 and "Thumbs.jpg: not a Market-1501 name" in reasons
    assert "0000_c1s1_000001_01.jpg: id 0 (distractor)" in reasons and "-1_c1s1_000002_01.jpg: id -1 (junk)" in reasons
    assert train["class_counts"] == {"0": 2, "1": 1}  # ids 2 and 7 → 0 and 1
    info = task_info(manifest)
    assert info["train_ids"] == [2, 7] and info["num_ids"]["gallery"] == 2
    got = {}
    for split in ("train", "query", "gallery"):
        for key, s in decoded(out, split, "reid").items():
            stem = key.split("_", 1)[1]
            got[stem] = s
            assert s["split"] == split
            assert s["raw"]["jpg"] == files[stem]
    assert (got["0002_c2s1_000551_01"]["pid"], got["0002_c2s1_000551_01"]["camid"]) == (2, 2)
    assert got["0002_c2s1_000551_01"]["raw"]["cls"] == b"0"
    assert got["-1_c1s1_000003_01"]["pid"] == -1 and got["0000_c3s1_000001_01"]["pid"] == 0
    # the decoded ids drive the Market-1501 protocol: query 10/c1 at distance order
    # [10/c1 (same camera), junk, distractor, 10/c2] → rank 2 (distractor first), AP 1/2
    q = got["0010_c1s1_001051_00"]
    gallery = [got[k] for k in ("0010_c1s1_001100_01", "-1_c1s1_000003_01", "0000_c3s1_000001_01",
                                "0010_c2s1_001200_01")]
    res = evaluate_reid(np.array([[0.1, 0.2, 0.3, 0.4]]), np.array([q["pid"]]), np.array([g["pid"] for g in gallery]),
                        np.array([q["camid"]]), np.array([g["camid"] for g in gallery]), max_rank=2)
    assert res["cmc"] == [0.0, 1.0] and res["mAP"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- CrowdHuman


def test_crowdhuman_odgt_round_trip(tmp_path):
    root, out = tmp_path / "CrowdHuman", tmp_path / "out"
    for i, name in enumerate(["273271,c9db000d5146c15", "273271,1017c000ac1360b7", "284193,ab"]):
        save(random_image(i, 40, 30), root / "Images" / f"{name}.jpg", "JPEG")
    good = {"ID": "273271,c9db000d5146c15", "gtboxes": [
        {"tag": "person", "fbox": [1, 2, 10, 20], "vbox": [1, 2, 10, 12], "hbox": [3, 2, 4, 4],
         "extra": {"box_id": 0, "occ": 1}, "head_attr": {"ignore": 0}},
        {"tag": "person", "fbox": [-3, 5, 8, 22], "vbox": [0, 5, 5, 22], "hbox": [-1, 5, 3, 3], "extra": {"box_id": 1}},
        {"tag": "mask", "fbox": [20, 0, 15, 10], "vbox": [20, 0, 15, 10], "hbox": [20, 0, 15, 10], "extra": {"ignore": 1}},
        {"tag": "person", "fbox": [30, 10, 5, 8], "vbox": [30, 10, 5, 8], "hbox": [31, 10, 2, 2],
         "extra": {"ignore": 1}}]}
    negative = {"ID": "273271,1017c000ac1360b7", "gtboxes": [
        {"tag": "person", "fbox": [1, 2, 10, 20], "vbox": [1, 2, -4, 12], "hbox": [3, 2, 4, 4], "extra": {}}]}
    (root / "annotation_train.odgt").write_text(json.dumps(good) + "\n" + json.dumps(negative) + "\n{not json\n")
    (root / "annotation_val.odgt").write_text(json.dumps({"ID": "284193,ab", "gtboxes": []}) + "\n")
    assert run_cli("build", str(root), "--format", "crowdhuman", "--out", str(out), "--workers", "1") == 0
    manifest = read_manifest(out)
    assert task_info(manifest)["kind"] == "detection"
    train = manifest["splits"]["train"]
    assert train["samples"] == 1 and train["skipped"] == 2
    reasons = " ".join(train["skip_examples"])
    assert "annotation_train.odgt:2 (273271,1017c000ac1360b7): gtboxes[0]: vbox [1, 2, -4, 12] has a negative size" in reasons
    assert "annotation_train.odgt:3: unreadable record" in reasons
    (s,) = decoded(out, "train", "detection").values()
    assert s["boxes"].tolist() == [[1, 2, 10, 20], [-3, 5, 8, 22]]
    assert s["visible"].tolist() == [[1, 2, 10, 12], [0, 5, 5, 22]]
    assert s["heads"].tolist() == [[3, 2, 4, 4], [-1, 5, 3, 3]]
    assert s["ignore"].tolist() == [[20, 0, 15, 10], [30, 10, 5, 8]]  # the crowd mask and the ignored person
    assert s["raw"]["jpg"] == (root / "Images" / "273271,c9db000d5146c15.jpg").read_bytes()
    (v,) = decoded(out, "val", "detection").values()
    assert v["boxes"].shape == (0, 4) and v["ignore"].shape == (0, 4)
