"""Human-centric converters round-trip: fixtures written in each dataset's own format → shards → decoded
targets equal to what was written (labels and pixels), bad input skipped and reported with the file."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
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
        # keypoints fall on the pixels they named: crop pixel == source pixel
        for (kx, ky, v), (ox, oy, _) in zip(s["keypoints"][labelled], kps[labelled]):
            if 0 <= int(ky) < h and 0 <= int(kx) < w:
                assert (s["image"][int(ky), int(kx)] == src[int(oy), int(ox)]).all()
    assert samples[12]["crop"][0] < 0 and samples[12]["crop"][1] < 0  # reaches outside: padded
