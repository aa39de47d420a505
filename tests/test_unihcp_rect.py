"""UniHCP's aspect-preserving inputs (``data.image_size: [height, width]``, the release's pose 256×192 and ReID
256×128): the letterbox targets the rectangle, keypoints / boxes / parsing maps follow it and decode back to
source pixels, the ViT runs the rectangular token grid, and ReID spends no tokens on padding."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from foundation.config import DataConfig
from foundation.data.human_transforms import decode_human_sample
from foundation.losses.unihcp import heatmap_peaks, heatmap_targets
from foundation.models.unihcp import UniHCPNet, UniHCPShared, _token_grid

PLAIN = {"mean": (0, 0, 0), "std": (1, 1, 1)}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _pose_sample(h: int, w: int, points: dict[int, tuple[int, int]]) -> dict:
    img = np.zeros((h, w, 3), np.uint8)
    kps = [[0, 0, 0]] * 17
    for j, (x, y) in points.items():
        img[y, x] = 255
        kps[j] = [x, y, 2]
    return {"__key__": "a", "png": _png(img), "json": json.dumps({"keypoints": kps, "box": [0, 0, w, h]}).encode()}


def test_config_reads_a_rectangle_for_human_data_only():
    assert DataConfig(image_size=[256, 192], human=True).input_hw == (256, 192)
    assert DataConfig(image_size=64).input_hw == (64, 64) and DataConfig(image_size=64).image_size == 64
    with pytest.raises(ValueError, match="human"):
        DataConfig(image_size=[256, 192])


def test_rectangular_pose_keypoints_land_on_their_pixels_and_decode_back():
    """Source 40 × 20 (h × w) into 32 × 24: scale 0.8 (the height binds), 4 px of padding each side in x."""
    sample = _pose_sample(40, 20, {5: (4, 10), 6: (15, 30)})
    cfg = DataConfig(image_size=[32, 24], human=True, **PLAIN)
    out = decode_human_sample(sample, cfg, train=False)
    t = out["targets"]
    assert out["image"].shape == (3, 32, 24)
    assert t["scale"].item() == pytest.approx(0.8) and t["offset"].tolist() == pytest.approx([4.0, 0.0])
    # input pixel centre = 0.8 * (x + 0.5) + offset - 0.5
    assert t["keypoints"][5].tolist() == pytest.approx([0.8 * 4.5 + 3.5, 0.8 * 10.5 - 0.5, 2])
    assert t["keypoints"][6].tolist() == pytest.approx([0.8 * 15.5 + 3.5, 0.8 * 30.5 - 0.5, 2])
    # the image moved with them: the bright pixels sit within a pixel of the keypoints
    img = out["image"][0]
    for j in (5, 6):
        x, y = t["keypoints"][j, :2].round().long().tolist()
        assert img[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].max() > 0.2
    # the flip mirrors about the rectangle's width (24), not its height
    cfg_flip = DataConfig(image_size=[32, 24], human=True, augment={"hflip": 1.0}, **PLAIN)
    random.seed(0)
    ft = decode_human_sample(sample, cfg_flip, train=True)["targets"]
    s = float(ft["scale"])  # training jitters the scale: the sample's own scale and offset (before the flip)
    x6 = float(ft["offset"][0]) + s * 4.5 - 0.5  # joint 5 (left) became joint 6 (right), mirrored
    assert ft["keypoints"][6, 0].item() == pytest.approx(24 - 1 - x6, abs=1e-4)


def test_rectangular_heatmaps_decode_to_the_source_coordinates():
    """The oracle: heatmaps drawn from a 256 × 192 input's keypoints (64 × 48 maps, stride 4) peak-decoded and
    mapped back through the letterbox land on the source keypoints (within the heatmap's quantisation)."""
    from evaluation.human_evals import _to_source

    rng = np.random.default_rng(0)
    pts = {j: (int(rng.integers(0, 60)), int(rng.integers(0, 100))) for j in range(17)}
    sample = _pose_sample(100, 60, pts)
    out = decode_human_sample(sample, DataConfig(image_size=[256, 192], human=True, **PLAIN), train=False)
    t = {k: v[None] if isinstance(v, torch.Tensor) else v for k, v in out["targets"].items()}
    assert t["offset"][0].tolist() == pytest.approx([(192 - 60 * 2.56) / 2, 0.0])
    maps, weight = heatmap_targets(t["keypoints"], (64, 48), 4.0, 2.0)
    assert bool(weight.all())
    xy, _ = heatmap_peaks(maps, 4.0)
    src = _to_source(xy + 0.5, t) - 0.5
    truth = torch.tensor([pts[j] for j in range(17)], dtype=torch.float32)
    # within the heatmap's quantisation (under 2 input px); a square map or the offset forgotten: 19 px off
    assert (src[0] - truth).abs().max() <= 2.0 / 2.56


def test_the_vit_runs_a_rectangular_grid():
    """A 32 × 24 input on an 8-px-patch ViT learnt at 64²: the 8 × 8 position grid is interpolated to 4 × 3
    tokens, the memory positions and the stride-4 maps (16 × 12) follow the rectangle."""
    torch.manual_seed(0)
    enc = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                            num_classes=0, dynamic_img_size=True)
    assert enc.pos_embed.shape[1] - enc.num_prefix_tokens == 8 * 8
    x = torch.randn(2, 3, 32, 24)
    tokens, h, w = _token_grid(enc, x)
    assert (h, w) == (4, 3) and tokens.shape == (2, 12, 32)
    net = UniHCPNet("pose", enc, UniHCPShared(32, width=32, layers=1, heads=2, ffn=64), 17).eval()
    out = net(x)[-1]
    assert out["maps"].shape == (2, 17, 16, 12)
    with torch.no_grad():  # the right half of the input changes the right of the maps: no square in between
        y = x.clone()
        y[..., 12:] = 0
        diff = (net(y)[-1]["maps"] - out["maps"]).abs().sum(dim=(0, 1, 2))
    assert diff[6:].min() > 0


def test_reid_spends_no_tokens_on_padding_beyond_its_aspect():
    """A 2:1 person crop at 256 × 128 fills the input (offset 0): 128 tokens of 16 px, none black; the
    square 256² letterbox of the same crop spends half of its 256 tokens on padding."""
    rng = np.random.default_rng(0)
    crop = rng.integers(1, 255, (64, 32, 3), dtype=np.uint8)
    sample = {"__key__": "r", "png": _png(crop), "json": json.dumps({"pid": 3, "camid": 1, "split": "query"}).encode()}

    def padding_tokens(size):
        out = decode_human_sample(sample, DataConfig(image_size=size, human=True, **PLAIN), train=False)
        img = out["image"]
        hh, ww = img.shape[-2] // 16, img.shape[-1] // 16
        patches = img.abs().sum(0).reshape(hh, 16, ww, 16).amax(dim=(1, 3))
        return int((patches == 0).sum()), hh * ww, out["targets"]

    pad, n, t = padding_tokens([256, 128])
    assert (pad, n) == (0, 128) and t["offset"].tolist() == [0.0, 0.0] and t["scale"].item() == 4.0
    pad_sq, n_sq, _ = padding_tokens(256)
    assert (pad_sq, n_sq) == (128, 256)
    # another aspect pads only what it must: 100 × 60 at 256 × 128 is scaled by 128 / 60 (the width binds),
    # 213.3 rows of image, ~42.7 of padding: 2 full token rows
    other = {"__key__": "o", "png": _png(rng.integers(1, 255, (100, 60, 3), dtype=np.uint8)), "json": sample["json"]}
    img = decode_human_sample(other, DataConfig(image_size=[256, 128], human=True, **PLAIN), train=False)["image"]
    rows = img.abs().sum(0).reshape(16, 16, 8, 16).amax(dim=(1, 3))
    assert int((rows == 0).sum()) == 2 * 8


class _Scripted(nn.Module):
    def __init__(self, make, batches):
        super().__init__()
        self.make, self.batches, self.i = make, batches, 0

    def forward(self, images):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return [self.make(b["targets"], images)]


@pytest.fixture(scope="module")
def humans(tmp_path_factory):
    from foundation.data.synthetic_humans import generate

    out = tmp_path_factory.mktemp("humans") / "h"
    generate(out, n=6, seed=1, views=2, size=64)
    return out


def test_rectangular_evaluations_map_back_to_source(humans):
    """Oracles through the evaluation paths at rectangular inputs: pose at 64 × 48 (heatmaps 16 × 12) scores
    AP ~1, parsing at 96 × 64 (offset 8 px in x) reads back mIoU 1 at the source resolution."""
    from evaluation.human_evals import evaluate_parsing, evaluate_pose
    from foundation.data.shards import build_eval_loader

    cfg = DataConfig(human=True, image_size=[64, 48], workers=0)
    batches = list(build_eval_loader(str(humans / "pose" / "manifest.json"), cfg, batch_size=4))
    assert batches[0]["image"].shape[-2:] == (64, 48) and float(batches[0]["targets"]["offset"][0, 0]) == 8.0

    def pose(t, images):
        maps, w = heatmap_targets(t["keypoints"], (16, 12), 4.0, 1.5)
        return {"maps": maps, "logits": w * 10 - 5}

    res = evaluate_pose(_Scripted(pose, batches), batches, flip_test=False)
    assert res["AP"] > 0.9, res
    pcfg = DataConfig(human=True, image_size=[96, 64], workers=0)
    pb = list(build_eval_loader(str(humans / "parsing" / "manifest.json"), pcfg, batch_size=4))
    assert tuple(pb[0]["targets"]["label_map"].shape[-2:]) == (96, 64)
    assert pb[0]["targets"]["offset"][0].tolist() == [8.0, 0.0]

    def parsing(t, images):
        lab = t["label_map"].clone()
        lab[lab == 255] = 0
        return {"maps": F.one_hot(lab, 14).permute(0, 3, 1, 2).float() * 20 - 10,
                "logits": torch.full((len(lab), 14), 5.0)}

    res = evaluate_parsing(_Scripted(parsing, pb), pb)
    assert res["original_resolution"] == 1.0 and res["mIoU"] == pytest.approx(1.0)


def test_rectangular_detection_boxes_round_trip():
    """A person box through the decoding at 48 × 64 and the evaluation: normalised per axis by the task,
    back to source pixels by the evaluation (every box found)."""
    from evaluation.human_evals import evaluate_detection
    from foundation.tasks.unihcp import UniHCPDetection

    gt = [[10.0, 20.0, 30.0, 40.0], [50.0, 10.0, 20.0, 60.0], [5.0, 70.0, 40.0, 25.0]]  # xywh, 100 × 100 source
    sample = {"__key__": "d", "png": _png(np.full((100, 100, 3), 80, np.uint8)),
              "json": json.dumps({"boxes": gt}).encode()}
    out = decode_human_sample(sample, DataConfig(image_size=[48, 64], human=True, **PLAIN), train=False)
    t = out["targets"]
    assert t["offset"].tolist() == [8.0, 0.0] and t["scale"].item() == pytest.approx(0.48)
    batch = {"image": out["image"][None], "targets": {k: v[None] if isinstance(v, torch.Tensor) and k != "boxes"
                                                      and k != "ignore" else [v] for k, v in t.items()}}
    norm = UniHCPDetection.prepare(None, batch, {})["boxes"][0]  # xyxy in [0, 1] per axis
    assert norm.tolist()[0] == pytest.approx([(10 * 0.48 + 8) / 64, 20 * 0.48 / 48, (40 * 0.48 + 8) / 64, 60 * 0.48 / 48])
    cxcywh = torch.cat([(norm[:, :2] + norm[:, 2:]) / 2, norm[:, 2:] - norm[:, :2]], 1)
    pred = {"logits": torch.tensor([[3.0, 2.0, 1.0]]), "boxes": cxcywh[None]}
    batch["targets"]["src_boxes"] = [t["src_boxes"].numpy()]
    batch["targets"]["src_ignore"] = [t["src_ignore"].numpy()]
    res = evaluate_detection(_Scripted(lambda *_: pred, [batch]), [batch])
    # all three found in score order: recall 1/3 -> 1 at precision 1, CrowdHuman's trapezoid from the first: 2/3
    assert res["AP"] == pytest.approx(2 / 3)


def test_a_rectangle_off_the_patch_grid_is_a_recipe_error():
    from foundation.config import ModelConfig, RecipeError, TaskConfig
    from foundation.data.humans import COCO_KEYPOINTS
    from foundation.tasks.unihcp import UniHCPPose

    model = ModelConfig(backbone="vit_tiny_patch16_224", img_size=64, patch_size=8,
                        kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2, "dynamic_img_size": True})
    task = TaskConfig(name="unihcp_pose", unihcp={"width": 32, "layers": 1, "heads": 2, "ffn": 64,
                                                 "vocabulary": {"kind": "pose", "keypoint_names": list(COCO_KEYPOINTS)}})
    assert UniHCPPose.build(model, task, DataConfig(human=True, image_size=[32, 24])).model.kind == "pose"
    with pytest.raises(RecipeError, match="multiple of the ViT's 8 x 8 patch"):
        UniHCPPose.build(model, task, DataConfig(human=True, image_size=[32, 20]))


def test_predict_maps_rectangular_outputs_back_to_the_image():
    """``foundation predict`` on a 90 × 40 (h × w) image at 64 × 48: scale 64 / 90, offset ((48 - 28.4) / 2, 0);
    a heatmap peak and a box made at the rectangle come back at their source pixels."""
    from types import SimpleNamespace

    from foundation.predict import predict_image

    s = 64 / 90
    ox = (48 - 40 * s) / 2
    src_xy = (20.0, 45.0)
    inp = (s * (src_xy[0] + 0.5) + ox - 0.5, s * (src_xy[1] + 0.5) - 0.5)
    kps = torch.tensor([[[inp[0], inp[1], 2.0]]])
    maps, _ = heatmap_targets(kps, (16, 12), 4.0, 1.0)
    box = torch.tensor([[10.0, 20.0, 30.0, 80.0]])  # xyxy source
    xyxy = torch.stack([box[:, 0] * s + ox, box[:, 1] * s, box[:, 2] * s + ox, box[:, 3] * s], 1) / torch.tensor([48, 64, 48, 64])
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    outs = {"pose": {"maps": maps, "logits": torch.tensor([[5.0]])},
            "detection": {"logits": torch.tensor([[5.0]]), "boxes": cxcywh[None]}}
    seen = []

    def net(kind):
        def forward(x):
            seen.append(tuple(x.shape[-2:]))
            return [outs[kind]]
        return forward

    tasks = {k: (SimpleNamespace(model=net(k), kind=k, meta={}), DataConfig(human=True, image_size=[64, 48]))
             for k in outs}
    res = predict_image(tasks, Image.new("RGB", (40, 90), (50, 50, 50)))
    assert seen == [(64, 48), (64, 48)]
    assert res["pose"]["keypoints"][0][:2] == pytest.approx(list(src_xy), abs=4.0 / s / 4 + 1e-3)
    assert res["detection"]["boxes"][0] == pytest.approx(box[0].tolist(), abs=1e-3)
