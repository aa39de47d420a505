"""UniHCP: losses against hand computations, the Hungarian matcher against brute force, the interpreter's
output shapes for every task, and the human-centric decoding (letterbox, flip pairs)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from foundation.losses.unihcp import (
    attribute_loss, batch_hard_triplet, detection_loss, dice_loss, focal_cost, heatmap_peaks, heatmap_targets,
    hungarian_match, importance_points, match_cost, parsing_loss, parsing_prediction, point_sample, pose_loss,
)
from foundation.models.unihcp import UniHCPNet, UniHCPShared, sine_embedding


def test_heatmap_targets_and_pose_loss_by_hand():
    kps = torch.tensor([[[8.0, 4.0, 2], [0.0, 0.0, 0], [100.0, 4.0, 2]]])  # labelled, unlabelled, outside
    maps, weight = heatmap_targets(kps, (4, 6), stride=2.0, sigma=1.0)
    assert weight.tolist() == [[1.0, 0.0, 0.0]]
    assert maps[0, 0, 2, 4] == pytest.approx(1.0)  # (8, 4) / 2 = column 4, row 2
    assert maps[0, 0, 2, 5] == pytest.approx(math.exp(-0.5))
    assert maps[0, 0, 3, 5] == pytest.approx(math.exp(-1.0))
    assert maps[0, 1].abs().sum() == 0 and maps[0, 2].abs().sum() == 0
    pred = torch.zeros_like(maps)
    pred[0, 1] = 5.0  # an unlabelled joint's prediction costs nothing
    vis = torch.tensor([[2.0, -1.0, 0.0]])
    terms = pose_loss(pred, vis, maps, weight, mse_scale=10.0, vis_weight=1.0)
    mse = 0.5 * (maps[0, 0] ** 2).mean().item() / 3 * 10.0
    bce = -(math.log(1 / (1 + math.exp(-2))) + math.log(1 - 1 / (1 + math.exp(1))) + math.log(0.5)) / 3
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert terms["vis"].item() == pytest.approx(bce, rel=1e-5)
    xy, val = heatmap_peaks(maps[:, :1], 2.0)
    assert xy[0, 0].tolist() == [8.0, 4.0] and val[0, 0] == pytest.approx(1.0)


def test_parsing_loss_by_hand():
    # 2 classes, a 2x2 label map [[0, 1], [1, 255]]; masks at the same resolution; points at pixel centres
    label = torch.tensor([[[0, 1], [1, 255]]])
    masks = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]], [[-2.0, 1.5], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    cls = torch.tensor([[0.3, -0.2]])
    points = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]])
    terms = parsing_loss(cls, masks, label, 4, mask_weight=1.0, dice_weight=1.0, presence_weight=1.0, points=points)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ce = 0.0
    logits = {0: [2.0, -1.0, 0.5], 1: [-2.0, 1.5, 0.0]}  # the three valid pixels (row-major), per class
    truth = {0: [1, 0, 0], 1: [0, 1, 1]}
    dices = []
    for c in (0, 1):
        for x, t in zip(logits[c], truth[c]):
            ce += -(t * math.log(sig(x)) + (1 - t) * math.log(1 - sig(x)))
        p = [sig(x) for x in logits[c]]
        dices.append(1 - (2 * sum(a * b for a, b in zip(p, truth[c])) + 1) / (sum(p) + sum(truth[c]) + 1))
    assert terms["mask"].item() == pytest.approx(ce / 6, rel=1e-5)
    assert terms["dice"].item() == pytest.approx(sum(dices) / 2, rel=1e-5)
    presence = -(math.log(sig(0.3)) + math.log(sig(-0.2))) / 2
    assert terms["presence"].item() == pytest.approx(presence, rel=1e-5)
    assert dice_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0)
    # prediction = argmax of sigmoid(class) * sigmoid(mask)
    pred = parsing_prediction(cls, masks)[0]
    expect = (torch.sigmoid(cls)[0, :, None, None] * masks[0].sigmoid()).argmax(0)
    assert torch.equal(pred, expect) and pred[0, 0] == 0 and pred[0, 1] == 1


def test_attribute_loss_by_hand():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]])
    targets = torch.tensor([[1, 0, -1], [0, 1, 1]])
    ratio = torch.tensor([0.2, 0.5, 0.9])
    total = 0.0
    for i in range(2):
        for a in range(3):
            t = int(targets[i, a])
            if t < 0:
                continue
            x, r = float(logits[i, a]), float(ratio[a])
            p = 1 / (1 + math.exp(-x))
            w = math.exp(1 - r) if t == 1 else math.exp(r)
            total += -w * (t * math.log(p) + (1 - t) * math.log(1 - p))
    assert attribute_loss(logits, targets, ratio).item() == pytest.approx(total / 2, rel=1e-5)


def test_batch_hard_triplet_by_hand():
    f = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # anchor 0: hardest pos 1, hardest neg 3; anchor 1: pos 1, neg 2; anchor 2: pos 4, neg 2; anchor 3: pos 4, neg 6
    expect = np.mean([math.log1p(math.exp(a - b)) for a, b in ((1, 3), (1, 2), (4, 2), (4, 6))])
    assert batch_hard_triplet(f, labels).item() == pytest.approx(expect, rel=1e-5)
    # an anchor without a positive is left out
    assert batch_hard_triplet(f[:3], labels[:3]).item() == pytest.approx(
        np.mean([math.log1p(math.exp(1 - 3)), math.log1p(math.exp(1 - 2))]), rel=1e-5)


def test_hungarian_matcher_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        q, g = 5, int(torch.randint(1, 4, (1,), generator=gen))
        logits = torch.randn(q, generator=gen)
        boxes = torch.cat([torch.rand(q, 2, generator=gen) * 0.6 + 0.2, torch.rand(q, 2, generator=gen) * 0.3 + 0.05], 1)
        gt = torch.cat([torch.rand(g, 2, generator=gen) * 0.6 + 0.2, torch.rand(g, 2, generator=gen) * 0.3 + 0.05], 1)
        cost = match_cost(logits, boxes, gt, 2.0, 5.0, 2.0)
        rows, cols = hungarian_match(cost)
        got = float(cost[rows, cols].sum())
        best = min(sum(float(cost[p[j], j]) for j in range(g)) for p in itertools.permutations(range(q), g))
        assert got == pytest.approx(best, abs=1e-5), trial
        assert sorted(cols.tolist()) == list(range(g))
    # the cost's terms by hand for one pair
    from torchvision.ops import box_convert, generalized_box_iou

    p = torch.sigmoid(logits[0])
    fc = 0.25 * (1 - p) ** 2 * -torch.log(p) - 0.75 * p**2 * -torch.log(1 - p)
    assert focal_cost(logits[:1]).item() == pytest.approx(fc.item(), rel=1e-4)
    giou = generalized_box_iou(box_convert(boxes[:1], "cxcywh", "xyxy"), box_convert(gt[:1], "cxcywh", "xyxy"))[0, 0]
    hand = 2 * fc + 5 * (boxes[0] - gt[0]).abs().sum() - 2 * giou
    assert cost[0, 0].item() == pytest.approx(hand.item(), rel=1e-4)


def test_parsing_loss_counts_present_classes_and_weights_presence():
    # 3 classes, class 2 absent: its mask (however wrong) adds nothing to mask / dice; presence BCE weighted by
    # the class ratios: present exp(1 - r), absent exp(r) (the release's ratio2weight)
    label = torch.tensor([[[0, 1], [1, 255]]])
    masks = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]], [[-2.0, 1.5], [0.0, 1.0]], [[9.0, 9.0], [9.0, 9.0]]]])
    cls = torch.tensor([[0.3, -0.2, 0.7]])
    points = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]])
    two = parsing_loss(cls[:, :2], masks[:, :2], label, 4, mask_weight=1.0, dice_weight=1.0, presence_weight=1.0,
                       points=points)
    ratios = torch.tensor([0.5, 0.2, 0.1])
    three = parsing_loss(cls, masks, label, 4, mask_weight=1.0, dice_weight=1.0, presence_weight=0.25, points=points,
                         class_ratios=ratios)
    assert three["mask"].item() == pytest.approx(two["mask"].item(), rel=1e-6)
    assert three["dice"].item() == pytest.approx(two["dice"].item(), rel=1e-6)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    w = [math.exp(0.5), math.exp(0.8), math.exp(0.1)]
    bce = [-math.log(sig(0.3)), -math.log(sig(-0.2)), -math.log(1 - sig(0.7))]
    assert three["presence"].item() == pytest.approx(0.25 * sum(a * b for a, b in zip(w, bce)) / 3, rel=1e-5)
    # no class present (all ignore): mask terms are zero, still differentiable
    empty = parsing_loss(cls, masks.requires_grad_(), torch.full((1, 2, 2), 255), 4)
    assert empty["mask"].item() == 0.0 and empty["mask"].requires_grad


def test_importance_points_keep_the_uncertain_share():
    # a mask whose logits are 0 (uncertain) on the left 6 of 16 columns: 3 x 400 candidates put ~490 there, so
    # the 300 kept by uncertainty all lie on the strip; the 100 uniform ones land there ~40% of the time
    torch.manual_seed(0)
    logits = torch.full((1, 16, 16), 10.0)
    logits[:, :, :6] = 0.0
    pts = importance_points(logits, 400, oversample=3.0, importance=0.75)
    assert pts.shape == (1, 400, 2) and (pts >= 0).all() and (pts <= 1).all()
    uncertain = point_sample(logits, pts).abs() < 5
    assert uncertain[0, :300].all()
    assert uncertain[0, 300:].float().mean() < 0.6
    # uniform candidates: with importance 0 nothing is chosen by uncertainty
    assert (point_sample(logits, importance_points(logits, 400, importance=0.0)).abs() < 5).float().mean() < 0.6


def test_detection_loss_matched_and_ignored():
    # query 0 sits exactly on the person, query 1 inside an ignore region, query 2 elsewhere
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.4], [0.8, 0.8, 0.1, 0.1], [0.1, 0.8, 0.1, 0.1]]])
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    gt = [torch.tensor([[0.2, 0.1, 0.4, 0.5]])]  # xyxy of query 0's box
    ignore = [torch.tensor([[0.7, 0.7, 0.95, 0.95]])]
    terms = detection_loss(logits, boxes, gt, ignore)
    assert terms["l1"].item() == pytest.approx(0.0, abs=1e-6) and terms["giou"].item() == pytest.approx(0.0, abs=1e-6)
    from torchvision.ops import sigmoid_focal_loss

    t = torch.tensor([[1.0, 0.0, 0.0]])
    per = sigmoid_focal_loss(logits, t, reduction="none")
    assert terms["focal"].item() == pytest.approx(2.0 * (per[0, 0] + per[0, 2]).item(), rel=1e-5)
    no_ignore = detection_loss(logits, boxes, gt, [torch.zeros(0, 4)])
    assert no_ignore["focal"].item() == pytest.approx(2.0 * per.sum().item(), rel=1e-5)
    # the IoA threshold (release 0.7): a region covering 60% of query 1's box (0.75..0.85)^2 ignores it at 0.5,
    # not at 0.7
    part = [torch.tensor([[0.75, 0.75, 0.81, 0.85]])]
    assert detection_loss(logits, boxes, gt, part, ioa_threshold=0.5)["focal"].item() == pytest.approx(terms["focal"].item())
    assert detection_loss(logits, boxes, gt, part, ioa_threshold=0.7)["focal"].item() == pytest.approx(no_ignore["focal"].item())


def test_sine_embedding_distinguishes_points():
    e = sine_embedding(torch.tensor([[0.1, 0.2], [0.2, 0.1]]), 16)
    assert e.shape == (2, 16) and not torch.allclose(e[0], e[1])


def _encoder():
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                             num_classes=0, dynamic_img_size=True)


@pytest.mark.parametrize("kind,queries,extra", [
    ("pose", 17, {}), ("parsing", 14, {}), ("attributes", 11, {}), ("reid", 6, {"num_ids": 9}),
    ("detection", 10, {"det_patterns": 3}),
])
def test_interpreter_shapes(kind, queries, extra):
    torch.manual_seed(0)
    shared = UniHCPShared(32, width=32, layers=3, heads=2, ffn=64)
    net = UniHCPNet(kind, _encoder(), shared, queries, **extra)
    net.train()
    outs = net(torch.randn(2, 3, 64, 48))  # another input size than the encoder's: positions interpolate
    assert len(outs) == 3  # deep supervision: one prediction per decoder layer
    first = UniHCPNet(kind, _encoder(), shared, queries, initial_prediction=True, **extra).train()
    assert len(first(torch.randn(2, 3, 64, 48))) == 4  # + the prediction from the queries alone (the release)
    assert len(UniHCPNet(kind, _encoder(), shared, queries, deep_supervision=False, **extra).train()(
        torch.randn(2, 3, 64, 48))) == 1
    out = outs[-1]
    if kind in ("pose", "parsing"):
        assert out["maps"].shape == (2, queries, 16, 12)  # stride 4
        assert out["logits"].shape == (2, queries)
    elif kind == "attributes":
        assert out["logits"].shape == (2, queries)
    elif kind == "reid":
        assert out["feature"].shape == (2, 6 * 32) and out["logits"].shape == (2, 9)
        # the feature is the raw layer output (the release), not passed through the decoder LayerNorm: scaling
        # that norm's weight leaves it alone, and scales the feature of a net with reid_feature_norm
        normed = UniHCPNet(kind, _encoder(), shared, queries, reid_feature_norm=True, **extra)
        x = torch.randn(2, 3, 64, 48)
        with torch.no_grad():
            raw0, normed0 = net.eval()(x)[-1]["feature"], normed.eval()(x)[-1]["feature"]
            shared.norm.weight.mul_(3.0)
            torch.testing.assert_close(net(x)[-1]["feature"], raw0)
            torch.testing.assert_close(normed(x)[-1]["feature"], 3 * normed0)
    else:
        assert out["logits"].shape == (2, 30) and out["boxes"].shape == (2, 30, 4)
        # the box MLP's last layer starts at zero: query p * anchors + j sits on anchor j (each content pattern
        # repeats the anchors), sized sigmoid(-2) of the image in both directions
        anchors = net.anchors.detach().clamp(0, 1).repeat(3, 1).expand(2, -1, -1)
        torch.testing.assert_close(out["boxes"][..., :2], anchors, atol=1e-4, rtol=0)
        torch.testing.assert_close(out["boxes"][..., 2:], torch.full((2, 30, 2), float(torch.sigmoid(torch.tensor(-2.0)))))
    net.eval()
    assert len(net(torch.randn(1, 3, 64, 64))) == 1


def test_human_decoding_letterbox_and_flip(tmp_path):
    """Keypoints follow the image through the letterbox and the flip (left/right swapped)."""
    import io
    import json

    from PIL import Image

    from foundation.config import DataConfig
    from foundation.data.human_transforms import decode_human_sample

    img = np.zeros((40, 20, 3), np.uint8)
    img[10, 4] = 255  # a bright pixel on the left shoulder
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    kps = [[0, 0, 0]] * 17
    kps[5] = [4, 10, 2]  # left_shoulder
    sample = {"__key__": "a", "png": buf.getvalue(),
              "json": json.dumps({"keypoints": kps, "box": [0, 0, 20, 40], "crop": [0, 0, 20, 40]}).encode()}
    cfg = DataConfig(image_size=80, human=True, mean=(0, 0, 0), std=(1, 1, 1))
    out = decode_human_sample(sample, cfg, train=False)
    t = out["targets"]
    def brightest(image):
        idx = int(image[0].argmax())
        return torch.tensor([idx % 80 + 0.5, idx // 80 + 0.5])  # the pixel's centre

    assert out["image"].shape == (3, 80, 80)
    # the keypoint still sits on its pixel (scale 2, offset 20 in x)
    assert (t["keypoints"][5, :2] - brightest(out["image"])).abs().max() <= 1.0
    assert t["scale"].item() == pytest.approx(2.0) and t["offset"].tolist() == [20.0, 0.0]
    cfg_flip = DataConfig(image_size=80, human=True, mean=(0, 0, 0), std=(1, 1, 1),
                          augment={"hflip": 1.0})
    import random

    random.seed(0)
    flipped = decode_human_sample(sample, cfg_flip, train=True)
    ft = flipped["targets"]
    assert ft["keypoints"][5, 2] == 0 and ft["keypoints"][6, 2] == 2  # left became right
    assert (ft["keypoints"][6, :2] - brightest(flipped["image"])).abs().max() <= 1.0


@pytest.fixture(scope="module")
def humans(tmp_path_factory):
    from foundation.data.synthetic_humans import generate

    out = tmp_path_factory.mktemp("humans") / "h"
    generate(out, n=6, seed=1, views=2, size=64)
    return out


def test_evaluations_score_perfect_predictions_near_one(humans):
    """Predictions made from the ground truth itself go through each evaluation's decoding (heatmap peaks,
    letterbox back to source pixels, parsing argmax) and score ~1; their negations do not."""
    from torch import nn

    from evaluation.human_evals import evaluate_attributes, evaluate_parsing, evaluate_pose
    from foundation.config import DataConfig
    from foundation.data.shards import build_eval_loader

    cfg = DataConfig(human=True, image_size=64, workers=0)

    class Oracle(nn.Module):
        def __init__(self, batches, make):
            super().__init__()
            self.batches, self.make, self.i = batches, make, 0

        def forward(self, images):
            b = self.batches[self.i]
            self.i += 1
            return [self.make(b["targets"])]

    def pose(t):
        maps, w = heatmap_targets(t["keypoints"], (16, 16), 4.0, 1.5)
        return {"maps": maps, "logits": w * 10 - 5}

    def parsing(t):
        lab = t["label_map"].clone()
        lab[lab == 255] = 0
        onehot = F.one_hot(lab, 14).permute(0, 3, 1, 2).float() * 20 - 10
        return {"maps": F.avg_pool2d(onehot, 4), "logits": torch.full((len(lab), 14), 5.0)}

    def attributes(t):
        return {"logits": t["attributes"].float() * 10 - 5}

    for kind, fn, make, key in (("pose", evaluate_pose, pose, "AP"), ("parsing", evaluate_parsing, parsing, "pixel_accuracy"),
                                ("attributes", evaluate_attributes, attributes, "accuracy")):
        batches = list(build_eval_loader(str(humans / kind / "manifest.json"), cfg, batch_size=4))
        res = fn(Oracle(batches, make), batches)
        assert res[key] > 0.9, (kind, res)
        if kind == "parsing":  # scored on the source label maps: the letterbox undone, padding never counted
            assert res["original_resolution"] == 1.0, res
        bad = fn(Oracle(batches, lambda t, m=make: {k: -v for k, v in m(t).items()}), batches)
        assert bad[key] < 0.5, (kind, bad)


def test_parsing_is_scored_at_the_source_resolution(humans):
    """Exact per-pixel predictions on a 1.5x letterboxed input (source 64 x 32 -> 96^2, offset 24 px) read back
    at every source pixel give mIoU 1; the same maps mirrored do not."""
    from torch import nn

    from evaluation.human_evals import evaluate_parsing
    from foundation.config import DataConfig
    from foundation.data.shards import build_eval_loader

    batches = list(build_eval_loader(str(humans / "parsing" / "manifest.json"),
                                     DataConfig(human=True, image_size=96, workers=0), batch_size=4))
    t0 = batches[0]["targets"]
    assert float(t0["scale"][0]) == 1.5 and tuple(t0["src_label_map"][0].shape) == (64, 32)

    class Exact(nn.Module):
        def __init__(self, mirror: bool):
            super().__init__()
            self.i, self.mirror = 0, mirror

        def forward(self, images):
            lab = batches[self.i]["targets"]["label_map"].clone()
            self.i += 1
            lab[lab == 255] = 0
            maps = F.one_hot(lab, 14).permute(0, 3, 1, 2).float() * 20 - 10
            return [{"maps": maps.flip(-2) if self.mirror else maps, "logits": torch.full((len(lab), 14), 5.0)}]

    res = evaluate_parsing(Exact(False), batches)
    assert res["original_resolution"] == 1.0 and res["mIoU"] == pytest.approx(1.0)
    assert evaluate_parsing(Exact(True), batches)["mIoU"] < 0.7


def test_reid_pk_batches_are_identity_balanced_and_resume_exactly(humans):
    """data.id_instances = K: each of the P samples of a batch brings K - 1 more images of its own identity
    (so the batch-hard triplet always has positives), and a loader restarted from a saved position yields
    the same batches."""
    from foundation.config import DataConfig
    from foundation.data.shards import build_train_loader
    from foundation.losses.unihcp import batch_hard_triplet

    cfg = DataConfig(train=str(humans / "reid" / "manifest.json"), human=True, image_size=32, workers=0,
                     shuffle_buffer=4, id_instances=3)
    loader = build_train_loader(cfg, batch_size=4, seed=0, rank=0, world_size=1)
    first = next(loader)
    position = loader.position()
    second = next(loader)
    loader.close()
    assert first["image"].shape == (4, 3, 3, 32, 32)
    # the extra views are other images (another pose / camera), not copies of the first
    assert not torch.equal(first["image"][:, 0], first["image"][:, 1])
    resumed = build_train_loader(cfg, batch_size=4, seed=0, rank=0, world_size=1, position=position)
    again = next(resumed)
    resumed.close()
    assert torch.equal(again["image"], second["image"]) and torch.equal(again["targets"]["label"], second["targets"]["label"])
    # the labels a task sees: K copies of each sample's identity -> every anchor has a positive
    labels = first["targets"]["label"].repeat_interleave(3)
    feats = torch.randn(len(labels), 8)
    assert batch_hard_triplet(feats, labels) > 0
    same = labels[:, None] == labels[None, :]
    assert (same.sum(1) >= 3).all()
