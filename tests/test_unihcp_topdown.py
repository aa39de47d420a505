"""UniHCP's released top-down pose crop (``data.pose_crop: top_down``): the person box grown to the input's
aspect × 1.25, jittered when training (scale, rotation, flip), warped into the input in one affine; keypoints
follow the same affine and evaluation maps predictions back through its inverse."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from foundation.config import DataConfig, RecipeError, load_raw, validate
from foundation.data.human_transforms import decode_human_sample, invert_affine, top_down_box, top_down_matrix
from foundation.data.humans import COCO_KEYPOINTS, flip_pairs
from foundation.losses.unihcp import heatmap_peaks, heatmap_targets

PLAIN = {"mean": (0, 0, 0), "std": (1, 1, 1)}
TOP_DOWN = {"human": True, "pose_crop": "top_down", **PLAIN}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _sample(img: np.ndarray, points: dict[int, tuple[float, float]], box: list[float]) -> dict:
    kps = [[0, 0, 0]] * 17
    for j, (x, y) in points.items():
        kps[j] = [x, y, 2]
    return {"__key__": "a", "png": _png(img), "json": json.dumps({"keypoints": kps, "box": box}).encode()}


def _batched(targets: dict) -> dict:
    return {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in targets.items()}


def test_top_down_box_expands_the_short_side_to_the_aspect_then_pads():
    # wide: 120 x 40 at aspect 3:4 -> the height grows to 160; x 1.25
    assert top_down_box([10, 20, 120, 40], 0.75, 1.25) == pytest.approx((70.0, 40.0, 150.0, 200.0))
    # tall: 30 x 100 -> the width grows to 75
    assert top_down_box([0, 0, 30, 100], 0.75, 1.25) == pytest.approx((15.0, 50.0, 93.75, 125.0))
    # already 3:4: only the padding
    assert top_down_box([4, 8, 75, 100], 0.75, 1.0) == pytest.approx((41.5, 58.0, 75.0, 100.0))
    # ReID's 1:2 aspect
    assert top_down_box([0, 0, 10, 10], 0.5, 1.0) == pytest.approx((5.0, 5.0, 10.0, 20.0))


def test_oracle_keypoints_land_where_hand_computed_with_no_letterbox_bars():
    """A 3:4 box [20, 10, 30, 40] in a white 100 x 80 image, input 64 x 48: the crop is 37.5 x 50 about (35, 30);
    UDP maps the centre to ((48-1)/2, (64-1)/2) and scales by 47 / 37.5 in x, 63 / 50 in y."""
    img = np.full((100, 80, 3), 255, np.uint8)
    img[30, 35] = (255, 0, 0)  # a red pixel at the box centre
    sample = _sample(img, {0: (35, 30), 5: (20, 10), 6: (50, 50)}, [20, 10, 30, 40])
    out = decode_human_sample(sample, DataConfig(image_size=[64, 48], **TOP_DOWN), train=False)
    t = out["targets"]
    assert out["image"].shape == (3, 64, 48)
    sx, sy = 47 / 37.5, 63 / 50
    assert t["keypoints"][0].tolist() == pytest.approx([23.5, 31.5, 2])
    assert t["keypoints"][5].tolist() == pytest.approx([sx * (20 - 35 + 18.75), sy * (10 - 30 + 25), 2])
    assert t["keypoints"][6].tolist() == pytest.approx([sx * (50 - 35 + 18.75), sy * (50 - 30 + 25), 2])
    assert t["keypoints"][1, 2] == 0  # unlabelled stays unlabelled
    # the crop lies inside the image: every input pixel is the image's (a letterbox would leave black bars)
    green = out["image"][1]
    assert float(out["image"].min()) > 0.0 and float(green.mean()) > 0.99
    # the red pixel sits under the centre keypoint: the bilinear warp spreads it over the 2 x 2 around (23.5, 31.5)
    assert float(green[31:33, 23:25].max()) < 0.9 and float(green[:, :22].min()) == pytest.approx(1.0)
    # the letterbox (the default) of the same sample is not the crop
    lb = decode_human_sample(sample, DataConfig(image_size=[64, 48], human=True, **PLAIN), train=False)
    assert "affine" not in lb["targets"] and "scale" in lb["targets"]


def test_a_box_near_the_edge_shows_black_only_outside_the_image():
    img = np.full((100, 80, 3), 200, np.uint8)
    out = decode_human_sample(_sample(img, {0: (5, 50)}, [0, 30, 30, 40]),
                              DataConfig(image_size=[64, 48], **TOP_DOWN), train=False)
    x = out["image"][0]
    m = out["targets"]["affine"].numpy()
    left = float(np.round(m[0, 0] * -0.5 + m[0, 2]))  # input column of the image's left edge
    assert 0 < left < 48
    assert float(x[:, : int(left) - 1].max()) == 0.0 and float(x[:, int(left) + 1:].min()) == pytest.approx(200 / 255)


def _blobs(h: int, w: int, points: dict[int, tuple[int, int]], colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    for j, (x, y) in points.items():
        img[y - 3:y + 4, x - 3:x + 4] = colours[j]
    return img


def test_train_jitter_keeps_keypoints_on_their_pixels_and_the_flip_swaps_joints():
    """Scale, rotation (forced on) and flip (p 0.5) over many draws: the colour under each warped visible keypoint is
    its joint's blob, and after a flip joint 5 (left shoulder) sits on the right shoulder's blob mirrored."""
    pts = {0: (80, 60), 5: (60, 90), 6: (100, 95), 11: (70, 150)}
    colours = {0: (0, 0, 255), 5: (255, 0, 0), 6: (0, 255, 0), 11: (255, 255, 0)}
    sample = _sample(_blobs(200, 160, pts, colours), pts, [50, 50, 60, 110])
    cfg = DataConfig(image_size=[64, 48], augment={"hflip": 0.5}, top_down={"rot_prob": 1.0}, **TOP_DOWN)
    swap = dict(flip_pairs(COCO_KEYPOINTS))
    swap.update({b: a for a, b in list(swap.items())})
    flips = rotations = checked = 0
    for seed in range(40):
        random.seed(seed)
        np.random.seed(seed)
        out = decode_human_sample(sample, cfg, train=True)
        t, img = out["targets"], out["image"]
        m = t["affine"].numpy()
        flipped = np.linalg.det(m[:, :2]) < 0
        flips += flipped
        rotations += abs(m[1, 0]) > 1e-6
        for j in pts:
            x, y, v = t["keypoints"][j].tolist()
            if v == 0:
                continue
            src = swap.get(j, j) if flipped else j
            colour = torch.tensor(colours[src], dtype=torch.float32) / 255
            assert torch.allclose(img[:, round(y), round(x)], colour, atol=0.02), (seed, j, flipped)
            checked += 1
    assert 10 < flips < 30 and rotations == 40 and checked > 100


def test_train_jitter_draws_the_released_ranges():
    """Box size x clip(N(1, 0.5), 0.5, 1.5) and rotation clip(N(0, 40), -80, 80) with p 0.6: read back from the
    affines of many draws."""
    img = np.zeros((64, 48, 3), np.uint8)
    sample = _sample(img, {0: (24, 32)}, [12, 16, 24, 32])
    cfg = DataConfig(image_size=[64, 48], augment={"hflip": 0.0}, **TOP_DOWN)
    base = decode_human_sample(sample, cfg, train=False)["targets"]["affine"].numpy()
    scales, angles = [], []
    for seed in range(400):
        random.seed(seed)
        np.random.seed(seed)
        m = decode_human_sample(sample, cfg, train=True)["targets"]["affine"].numpy()
        scales.append(np.hypot(base[1, 1], 0) / np.hypot(m[1, 0], m[1, 1]))  # box size factor
        angles.append(np.degrees(np.arctan2(m[1, 0], m[1, 1])))
    scales, angles = np.array(scales), np.array(angles)
    assert scales.min() == pytest.approx(0.5, abs=1e-6) and scales.max() == pytest.approx(1.5, abs=1e-6)
    assert 0.25 < np.std(scales) < 0.45
    rotated = np.abs(angles) > 1e-6
    assert 0.5 < rotated.mean() < 0.7 and np.abs(angles).max() <= 80 + 1e-6
    assert 30 < np.std(angles[rotated]) < 45


def test_evaluation_inverse_maps_back_to_source_pixels():
    """Keypoints at input pixels → source pixels through the affine's inverse within 0.5 px (to float32 precision
    here), also through heatmaps and their peaks (within the stride-4 quantisation)."""
    from evaluation.human_evals import _keypoints_to_source

    rng = np.random.default_rng(0)
    pts = {j: (float(rng.uniform(40, 100)), float(rng.uniform(30, 150))) for j in range(17)}
    sample = _sample(np.zeros((180, 140, 3), np.uint8), pts, [35, 25, 70, 130])
    out = decode_human_sample(sample, DataConfig(image_size=[256, 192], **TOP_DOWN), train=False)
    t = _batched(out["targets"])
    truth = torch.tensor([pts[j] for j in range(17)], dtype=torch.float64)
    back = _keypoints_to_source(t["keypoints"][..., :2].double(), t)
    assert (back[0] - truth).abs().max() < 1e-4  # the targets are float32
    m = t["affine"][0].numpy()
    assert np.allclose(invert_affine(invert_affine(m)), m)
    maps, weight = heatmap_targets(t["keypoints"], (64, 48), 4.0, 2.0)
    assert bool(weight.all())
    xy, _ = heatmap_peaks(maps, 4.0)
    src = _keypoints_to_source(xy, t)
    scale = m[0, 0]  # input px per source px (about 1.6 here)
    assert (src[0] - truth.float()).abs().max() <= 2.0 / scale


def test_matrix_is_the_released_udp_warp():
    """top_down_matrix equals UniHCP's get_warp_matrix(r, 2c, out - 1, size) (post_transforms.py), transcribed."""
    import math

    def get_warp_matrix(theta, size_input, size_dst, size_target):  # the release's, verbatim
        theta = np.deg2rad(theta)
        matrix = np.zeros((2, 3), dtype=np.float32)
        scale_x = size_dst[0] / size_target[0]
        scale_y = size_dst[1] / size_target[1]
        matrix[0, 0] = math.cos(theta) * scale_x
        matrix[0, 1] = -math.sin(theta) * scale_x
        matrix[0, 2] = scale_x * (-0.5 * size_input[0] * math.cos(theta) + 0.5 * size_input[1] * math.sin(theta)
                                  + 0.5 * size_target[0])
        matrix[1, 0] = math.sin(theta) * scale_y
        matrix[1, 1] = math.cos(theta) * scale_y
        matrix[1, 2] = scale_y * (-0.5 * size_input[0] * math.sin(theta) - 0.5 * size_input[1] * math.cos(theta)
                                  + 0.5 * size_target[1])
        return matrix

    c, size, r = np.array([123.4, 88.8]), np.array([93.75, 125.0]), 31.0
    ours = top_down_matrix(tuple(c), tuple(size), (256, 192), r)
    theirs = get_warp_matrix(r, c * 2.0, np.array([192, 256]) - 1.0, size)
    assert np.allclose(ours, theirs, rtol=1e-5, atol=1e-4)


class _Ideal(nn.Module):
    """A pose network that knows the answer: heatmaps at the batch's keypoints, and on the mirrored input the
    mirrored keypoints with left / right swapped (what a trained network predicts)."""

    keypoint_flip_pairs = flip_pairs(COCO_KEYPOINTS)

    def __init__(self, batches):
        super().__init__()
        self.batches, self.i = batches, 0

    def forward(self, images):
        b = self.batches[self.i]
        kps = b["targets"]["keypoints"].clone()
        if torch.equal(images, b["image"].flip(-1)):
            kps[..., 0] = images.shape[-1] - 1 - kps[..., 0]
            perm = list(range(17))
            for a, c in self.keypoint_flip_pairs:
                perm[a], perm[c] = c, a
            kps = kps[:, perm]
            self.i += 1
        maps, w = heatmap_targets(kps, (images.shape[-2] // 4, images.shape[-1] // 4), 4.0, 1.5)
        return [{"maps": maps, "logits": w * 10 - 5}]


def test_pose_evaluation_with_flip_test_on_top_down_crops(tmp_path):
    """Synthetic pose shards through the top-down crop and evaluate_pose with the flip test: AP ~1 in source pixels
    (a forgotten inverse or a mis-mirrored flip puts the joints off their people)."""
    from evaluation.human_evals import evaluate_pose
    from foundation.data.shards import build_eval_loader
    from foundation.data.synthetic_humans import generate

    generate(tmp_path / "h", n=6, seed=1, views=2, size=64)
    cfg = DataConfig(image_size=[64, 48], workers=0, **TOP_DOWN)
    batches = list(build_eval_loader(str(tmp_path / "h" / "pose" / "manifest.json"), cfg, batch_size=4))
    assert "affine" in batches[0]["targets"] and batches[0]["image"].shape[-2:] == (64, 48)
    res = evaluate_pose(_Ideal(batches), batches, flip_test=True)
    assert res["flip_test"] == 1.0 and res["AP"] > 0.9 and res["OKS"] > 0.95, res


def test_pose_crop_is_validated_at_recipe_load():
    raw = load_raw("recipes/unihcp/vit_base_multitask.yaml")
    raw["tasks"]["parsing"]["data"]["pose_crop"] = "top_down"
    with pytest.raises(RecipeError, match=r"tasks\.parsing.*pose_crop"):
        validate(raw)
    raw = load_raw("recipes/unihcp/vit_base_multitask.yaml")
    raw["tasks"]["pose"]["data"]["pose_crop"] = "topdown"
    with pytest.raises(RecipeError, match=r"tasks\.pose\.data\.pose_crop.*top_down"):
        validate(raw)
    raw = load_raw("recipes/unihcp/vit_base_multitask.yaml")
    raw["tasks"]["pose"]["data"]["top_down"] = {"scale_factor": 1.5}
    with pytest.raises(RecipeError, match=r"tasks\.pose\.data\.top_down\.scale_factor"):
        validate(raw)
    with pytest.raises(ValueError, match="data.pose_crop.*data.human"):
        DataConfig(pose_crop="top_down")


def test_converter_context_keeps_every_pixel_the_release_reads(tmp_path):
    """coco_keypoints --pose-context 1.5: the top-down crop decoded from the shard (train jitter: centre shift,
    half body, scale, rotation, flip) equals the one decoded from the whole source image with the box in source
    pixels, draw for draw."""
    import argparse

    from foundation.data.cli import add_cli
    from foundation.data.shards import iter_raw_samples

    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    Image.fromarray(src).save(root / "val2017" / "000000000001.png")
    # a person with the arms out: the upper body's joints (COCO 0-10) span the box's width in its top 20 px, the
    # lower body's a narrow column below; the upper half-body box (x 1.5) then reaches past the person's square
    box = [150.5, 120.0, 60.0, 50.0]
    kps = []
    for j in range(17):
        x, y = ((rng.uniform(150.5, 210.5), rng.uniform(120, 140)) if j <= 10 else
                (rng.uniform(170, 190), rng.uniform(150, 170)))
        kps += [round(float(x), 2), round(float(y), 2), 2]
    coco = {"images": [{"id": 1, "file_name": "000000000001.png", "width": 400, "height": 300}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": box, "area": 1000.0, "iscrowd": 0,
                             "num_keypoints": 17, "keypoints": kps}],
            "categories": [{"id": 1, "name": "person", "keypoints": COCO_KEYPOINTS, "skeleton": []}]}
    (root / "annotations" / "person_keypoints_val2017.json").write_text(json.dumps(coco))
    parser = argparse.ArgumentParser(prog="foundation")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["data", "build", str(root), "--format", "coco_keypoints", "--out", str(tmp_path / "out"),
                              "--workers", "1", "--pose-context", "1.5"])
    assert args.func(args) == 0
    (shard,) = list(iter_raw_samples(str(tmp_path / "out"), "val"))
    labels = json.loads(shard["json"])
    x0, y0, x1, y1 = labels["crop"]
    # the person's square: 1.5 x the padded box's diagonal (75 x 100 -> 125 px) about (180.5, 145), widened by the
    # largest centre shift (0.2 x 60, 0.2 x 50), +1 px: [73, 41, 287, 249]
    assert x0 <= 73 and y0 <= 41 and x1 >= 287 and y1 >= 249
    # and each half-body box's square (its extent grown to 3:4, x 1.5), here wider than the person's
    from foundation.data.human_transforms import half_body_box

    points = np.array(kps, np.float64).reshape(17, 3)
    reach = []
    for choice in (0.0, 1.0):
        cx, cy, w, h = half_body_box(points, list(range(11)), 0.75, 1.5, choice)
        r = 1.5 * np.hypot(w, h) / 2
        reach.append((cx - r, cy - r, cx + r, cy + r))
        assert x0 <= np.floor(cx - r) and y0 <= np.floor(cy - r) and x1 >= np.ceil(cx + r) and y1 >= np.ceil(cy + r)
    # the half body widens the cut: some half-body square leaves the person's square
    assert any(a < 73 or b < 41 or c > 287 or d > 249 for a, b, c, d in reach)
    assert x0 > 0 and y0 > 0 and x1 < 400 and y1 < 300 and shard["png"] is not None  # inside the image: a real cut
    whole = _sample(src, {j: kps[3 * j: 3 * j + 2] for j in range(17)}, box)
    whole["__key__"] = shard["__key__"]  # the centre shift is drawn once per person, from its key
    for half_body in (0.3, 1.0):
        cfg = DataConfig(image_size=[64, 48], top_down={"rot_prob": 1.0, "half_body_prob": half_body,
                                                        "centre_shift_prob": 1.0}, **TOP_DOWN)
        for seed in range(12):
            outs = []
            for sample in (shard, whole):
                random.seed(seed)
                np.random.seed(seed)
                outs.append(decode_human_sample(sample, cfg, train=seed > 0))
            a, b = outs
            assert (a["image"] - b["image"]).abs().max() <= 2 / 255, seed  # cv2's 1/32-px fixed point may round apart
            assert (a["image"] - b["image"]).abs().mean() < 1e-3, seed
            assert torch.allclose(a["targets"]["keypoints"], b["targets"]["keypoints"], atol=1e-3), seed


def test_half_body_crops_the_upper_or_lower_joints_as_released():
    """With half_body_prob 1 and no other jitter, the crop is centred on the mean of the upper body's joints (COCO
    0-10) or of the lower body's; the upper when a standard normal draw is < 0.5 (the release's randn, ~69 %)."""
    from foundation.data.human_transforms import half_body_box, upper_body_ids

    assert upper_body_ids(COCO_KEYPOINTS) == list(range(11))
    mpii = ["r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax", "upper_neck", "head_top",
            "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist"]
    assert upper_body_ids(mpii) == list(range(7, 16))  # the release's MPII upper_body_ids
    rng = np.random.default_rng(1)
    pts = {j: (float(rng.uniform(40, 80)), float(rng.uniform(20, 60) if j <= 10 else rng.uniform(70, 110)))
           for j in range(17)}
    sample = _sample(np.zeros((140, 120, 3), np.uint8), pts, [40, 20, 40, 90])
    points = np.array([pts[j] for j in range(17)])
    upper, lower = points[:11].mean(0), points[11:].mean(0)
    cfg = DataConfig(image_size=[64, 48], augment={"hflip": 0.0}, top_down={
        "half_body_prob": 1.0, "scale_factor": 0.0, "rot_prob": 0.0, "centre_shift_prob": 0.0}, **TOP_DOWN)
    picks = []
    for seed in range(300):
        np.random.seed(seed)
        m = decode_human_sample(sample, cfg, train=True)["targets"]["affine"].numpy()
        centre = invert_affine(m)[:, :2] @ np.array([23.5, 31.5]) + invert_affine(m)[:, 2]
        is_upper = np.allclose(centre, upper, atol=1e-6)
        assert is_upper or np.allclose(centre, lower, atol=1e-6), seed
        picks.append(is_upper)
    assert 0.6 < np.mean(picks) < 0.78  # P(N(0, 1) < 0.5) = 0.69
    # the upper crop's size: the joints' extent grown to 3:4, x 1.5
    cx, cy, w, h = half_body_box(np.c_[points, np.full(17, 2.0)], list(range(11)), 0.75, 1.5, 0.0)
    ext = points[:11].max(0) - points[:11].min(0)
    assert (w / 1.5, h / 1.5) == pytest.approx((max(ext[0], 0.75 * ext[1]), max(ext[1], ext[0] / 0.75)))
    # eight visible joints or fewer: never a half body
    few = _sample(np.zeros((140, 120, 3), np.uint8), {j: pts[j] for j in range(8)}, [40, 20, 40, 90])
    full = decode_human_sample(few, cfg, train=False)["targets"]["affine"].numpy()
    np.random.seed(0)
    assert np.allclose(decode_human_sample(few, cfg, train=True)["targets"]["affine"].numpy(), full)


def test_centre_shift_is_drawn_once_per_person():
    """The release's build-time centre shift: a person keeps one shift (from its key) for every draw; about 30 % of
    people are shifted, by at most 0.2 x (w, h); evaluation never shifts."""
    from foundation.data.human_transforms import centre_shift

    box = [0, 0, 50, 100]
    shifts = np.array([centre_shift(f"p{i}", box, 0.3, 0.4) for i in range(2000)])
    moved = np.abs(shifts).sum(1) > 0
    assert 0.26 < moved.mean() < 0.34
    assert np.abs(shifts[:, 0]).max() <= 10 and np.abs(shifts[:, 1]).max() <= 20 and np.abs(shifts[:, 1]).max() > 15
    assert centre_shift("p3", box, 0.3, 0.4) == centre_shift("p3", box, 0.3, 0.4)
    key = next(f"p{i}" for i in range(2000) if moved[i])
    sample = _sample(np.zeros((140, 120, 3), np.uint8), {0: (50, 50)}, [30, 20, 40, 90])
    sample["__key__"] = key
    cfg = DataConfig(image_size=[64, 48], augment={"hflip": 0.0}, top_down={
        "half_body_prob": 0.0, "scale_factor": 0.0, "rot_prob": 0.0}, **TOP_DOWN)
    base = decode_human_sample(sample, cfg, train=False)["targets"]["affine"].numpy()
    dx, dy = centre_shift(key, [30, 20, 40, 90], 0.3, 0.4)
    for seed in range(3):  # the same shift on every draw
        np.random.seed(seed)
        m = decode_human_sample(sample, cfg, train=True)["targets"]["affine"].numpy()
        assert np.allclose(m[:, :2], base[:, :2]) and np.allclose(m[:, 2], base[:, 2] - base[:, :2] @ [dx, dy])


def test_training_crop_and_the_scene_pipeline_crop_agree():
    """The decoder's top-down crop (numpy / cv2) and the scene pipeline's (torch, foundation/models/unihcp_scene.py)
    are one protocol: the same expanded box, the same UDP frame, the same pixels."""
    from foundation.models.unihcp_scene import crop_boxes, crop_frame, expand_boxes

    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)
    box = [30.0, 20.0, 24.0, 60.0]
    out = decode_human_sample(_sample(img, {0: (40, 50)}, box), DataConfig(image_size=[64, 48], **TOP_DOWN),
                              train=False)
    xyxy = torch.tensor([[box[0], box[1], box[0] + box[2], box[1] + box[3]]], dtype=torch.float64)
    expanded = expand_boxes(xyxy, 48 / 64)
    cx, cy, w, h = top_down_box(box, 48 / 64, 1.25)
    assert expanded[0].tolist() == pytest.approx([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    centre, step = crop_frame(expanded, (64, 48))
    inv = invert_affine(out["targets"]["affine"].numpy())  # input pixel -> source pixel
    for p in ([0.0, 0.0], [47.0, 63.0], [12.5, 40.0]):
        scene = centre[0].numpy() + (np.array(p) - np.array([47 / 2, 63 / 2])) * step[0].numpy()
        assert inv[:, :2] @ p + inv[:, 2] == pytest.approx(scene)
    theirs = crop_boxes(torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255, expanded, (64, 48))[0]
    diff = (out["image"].double() - theirs).abs()  # PLAIN: the decoder's image is RGB / 255 too
    assert diff.max() < 0.005 and diff.mean() < 0.002, (float(diff.max()), float(diff.mean()))  # uint8 rounding
