"""UniHCP detection at per-image sizes (``data.resize``, the release's aspect-kept short side S / long side <= L,
padded to a multiple of the patch): decoding, a batch-1 forward + loss at two sizes, evaluation and prediction
mapping boxes back to source pixels, and the recipe's validation."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from foundation.config import DataConfig, ModelConfig, RecipeError, TaskConfig, UniHCPConfig, validate
from foundation.data.decode import collate
from foundation.data.human_transforms import decode_human_sample, letterbox_image

PLAIN = {"mean": (0, 0, 0), "std": (1, 1, 1)}
# a 2:1 source, 400 wide x 200 high; two boxes xywh, the first filled white in the image
SRC_W, SRC_H = 400, 200
BOXES = [[40.0, 20.0, 80.0, 120.0], [250.0, 60.0, 60.0, 100.0]]


def _det_sample(w: int = SRC_W, h: int = SRC_H, boxes=BOXES, key: str = "a", bg: int = 0) -> dict:
    img = np.full((h, w, 3), bg, np.uint8)
    x, y, bw, bh = (int(v) for v in boxes[0])
    img[y:y + bh, x:x + bw] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return {"__key__": key, "png": buf.getvalue(), "json": json.dumps({"boxes": boxes, "ignore": []}).encode()}


def _cfg(**resize) -> DataConfig:
    rs = {"short": [64, 80], "eval_short": 96, "max_long": 170, "multiple": 16} | resize
    return DataConfig(human=True, image_size=64, resize=rs, augment={"hflip": 0.0}, **PLAIN)


def _xyxy(b) -> np.ndarray:
    b = np.asarray(b, np.float64)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def test_a_2to1_sample_decodes_to_its_own_size_with_boxes_scaled_alike():
    """Evaluation: S 96 would make the long side 192 > L 170, so S drops to round(170 * 200 / 400) = 85: the image
    is 85 x 170 at scale 0.425, padded to 96 x 176 (multiples of 16) with 0 after normalisation."""
    out = decode_human_sample(_det_sample(), _cfg(), train=False)
    t, img = out["targets"], out["image"]
    assert img.shape == (3, 96, 176)
    assert t["scale"].item() == pytest.approx(85 / 200) and t["offset"].tolist() == [0.0, 0.0]
    torch.testing.assert_close(t["boxes"], torch.tensor(_xyxy(BOXES) * 0.425, dtype=torch.float32))
    torch.testing.assert_close(t["src_boxes"], torch.tensor(BOXES))
    assert img[:, 85:].abs().max() == 0 and img[:, :, 170:].abs().max() == 0  # the padding
    x0, y0, x1, y1 = (t["boxes"][0] + torch.tensor([1, 1, -1, -1])).round().int().tolist()
    assert img[0, y0:y1, x0:x1].min() > 0.95  # the white box moved with its coordinates
    assert img[0, :, : x0 - 2].max() < 0.05


def test_training_draws_the_short_side_from_the_set_under_the_long_cap():
    random.seed(0)
    shorts = set()
    for _ in range(12):
        out = decode_human_sample(_det_sample(), _cfg(), train=True)
        s = out["targets"]["scale"].item()
        h, w = round(SRC_H * s), int(SRC_W * s)
        shorts.add(h)
        assert h in (64, 80) and w <= 170
        assert out["image"].shape[1:] == (-(-h // 16) * 16, -(-w // 16) * 16)
        torch.testing.assert_close(out["targets"]["boxes"], torch.tensor(_xyxy(BOXES) * s, dtype=torch.float32))
    assert shorts == {64, 80}


def test_the_crop_branch_keeps_boxes_on_their_pixels():
    """crop_prob 1: resize to a crop short side, crop a random region, resize again; the white box's decoded
    coordinates still cover white pixels, wherever the crop fell, and the crop lies inside the (grey) source:
    nothing black but the bottom/right padding."""
    random.seed(1)
    cfg = _cfg(short=[80], max_long=400, crop_prob=1.0, crop_short=[100], crop_size=[60, 90])
    seen = 0
    for _ in range(20):
        out = decode_human_sample(_det_sample(bg=100), cfg, train=True)
        t, img = out["targets"], out["image"]
        content = img[0] > 0.3
        rows, cols = int(content.any(1).sum()), int(content.any(0).sum())
        assert content[:rows, :cols].all() and rows > img.shape[1] - 16 and cols > img.shape[2] - 16
        assert min(rows, cols) == 80 and all(v % 16 == 0 for v in img.shape[1:])
        s, off = t["scale"].item(), t["offset"].numpy()
        assert 0.5 * 80 / 90 - 1e-6 <= s <= 0.5 * 80 / 60 + 1e-6  # 0.5 to the crop short side 100, then 80 / crop
        # the crop, in the 100-px-short resize (scale 0.5): 60-90 px each side, inside that image
        assert 60 - 1 <= cols / s * 0.5 <= 90 + 1 and 60 - 1 <= rows / s * 0.5 <= 90 + 1
        assert (-off / s >= -1e-6).all() and -off[0] / s + cols / s <= SRC_W + 2 and -off[1] / s + rows / s <= SRC_H + 2
        white = (_xyxy(BOXES[:1]) * s + np.tile(off, 2))[0]
        inside = np.clip(white, 0, [cols, rows] * 2)
        if (inside[2] - inside[0]) > 4 and (inside[3] - inside[1]) > 4:
            seen += 1
            torch.testing.assert_close(t["boxes"][0], torch.tensor(inside, dtype=torch.float32))
            x0, y0, x1, y1 = (int(round(v)) for v in inside + [1, 1, -1, -1])
            assert img[0, y0:y1, x0:x1].min() > 0.95
    assert seen >= 3


def test_existing_sizes_decode_as_before():
    """No data.resize: the square and the rectangle letterbox, untouched (scale and shape as before)."""
    out = decode_human_sample(_det_sample(), DataConfig(human=True, image_size=64, **PLAIN), train=False)
    assert out["image"].shape == (3, 64, 64) and out["targets"]["scale"].item() == pytest.approx(64 / 400)
    assert out["targets"]["offset"].tolist() == [0.0, pytest.approx(16.0)]
    rect = decode_human_sample(_det_sample(), DataConfig(human=True, image_size=[32, 48], **PLAIN), train=False)
    assert rect["image"].shape == (3, 32, 48) and rect["targets"]["scale"].item() == pytest.approx(48 / 400)


def _task(size_cfg: DataConfig):
    from foundation.tasks.unihcp import UniHCPDetection

    model = ModelConfig(backbone="vit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=0,
                        kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2, "dynamic_img_size": True})
    task = TaskConfig(name="unihcp_detection", unihcp=UniHCPConfig(
        width=32, layers=2, heads=2, ffn=64, det_anchors=8, vocabulary={"kind": "detection"}))
    return UniHCPDetection.build(model, task, size_cfg)


def test_batch_of_one_trains_at_two_sizes():
    torch.manual_seed(0)
    cfg = _cfg()
    task = _task(cfg).train()
    sizes = []
    for w, h in ((SRC_W, SRC_H), (120, 240)):  # landscape and portrait: different token grids
        boxes = [[10.0, 20.0, 40.0, 60.0]]
        item = decode_human_sample(_det_sample(w, h, boxes), cfg, train=False)
        batch = collate([item], None, False)
        out = task(batch)
        assert torch.isfinite(out["loss"]) and out["loss"] > 0
        out["loss"].backward()
        sizes.append(tuple(batch["image"].shape[-2:]))
    assert sizes[0] == (96, 176) and sizes[1] == (176, 96)  # portrait: S 85 (long 170), 85 x 170 padded
    assert task.model.anchors.grad is not None


def test_recipe_checks_the_patch_and_the_task():
    with pytest.raises(RecipeError, match="multiple"):
        _task(_cfg(multiple=12))
    from foundation.tasks.unihcp import UniHCPPose

    with pytest.raises(RecipeError, match="detection only"):
        UniHCPPose.build(ModelConfig(backbone="vit_tiny_patch16_224", num_classes=0, kwargs={"dynamic_img_size": True}),
                         TaskConfig(name="unihcp_pose", unihcp=UniHCPConfig(vocabulary={"kind": "pose"})), _cfg())


@pytest.mark.parametrize("resize,message", [
    ({"short": [1400], "eval_short": 800, "max_long": 1333}, "tasks.detection.data.resize: short: a short side of 1400"),
    ({"short": [800], "eval_short": 1400, "max_long": 1333}, "tasks.detection.data.resize: eval_short"),
    ({"short": [0, 800], "eval_short": 800, "max_long": 1333}, "tasks.detection.data.resize: short: .* must be positive"),
    ({"short": [800], "eval_short": 800, "max_long": -1}, "tasks.detection.data.resize.max_long"),
    ({"short": [], "eval_short": 800, "max_long": 1333}, "tasks.detection.data.resize.short"),
])
def test_bad_sizes_fail_at_load_naming_the_key(resize, message):
    recipe = {"tasks": {"detection": {"task": {"name": "unihcp_detection"},
                                      "data": {"train": "x", "human": True, "resize": resize}}}}
    with pytest.raises(RecipeError, match=message):
        validate(recipe)
    with pytest.raises(RecipeError, match="data.resize: per-image sizes are read by human-centric data only"):
        validate({"data": {"train": "x", "resize": {"short": [800], "eval_short": 800, "max_long": 1333}}})


def test_evaluation_maps_per_image_boxes_back_to_source_pixels(monkeypatch):
    """Oracle: a model that predicts exactly the decoded ground truth → evaluate_detection hands the metric the
    source boxes again. A batch of two sizes (padded together) is run one image at a time at its own size."""
    import evaluation.human_evals as he

    cfg = _cfg()
    samples = [(_det_sample(), BOXES), (_det_sample(120, 240, [[10.0, 20.0, 40.0, 60.0]]), [[10.0, 20.0, 40.0, 60.0]])]
    batch = collate([decode_human_sample(s, cfg, train=False) for s, _ in samples], None, False)
    assert batch["image"].shape == (2, 3, 176, 176)  # 96 x 176 and 176 x 96 padded to the larger of each side
    assert batch["targets"]["input_hw"].tolist() == [[96, 176], [176, 96]]

    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, images):
            h, w = images.shape[-2:]
            b = batch["targets"]["boxes"][len(self.calls)]
            self.calls.append((h, w))
            q = 3
            boxes, logits = torch.zeros(1, q, 4), torch.full((1, q), -10.0)
            cxcywh = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
            boxes[0, :len(b)] = cxcywh / torch.tensor([w, h, w, h])
            logits[0, :len(b)] = 10.0
            return [{"logits": logits, "boxes": boxes}]

    seen = {}
    monkeypatch.setattr(he, "detection_metrics", lambda images: seen.setdefault("images", images) and {"AP": 1.0})
    oracle = Oracle()
    he.evaluate_detection(oracle, [batch])
    assert oracle.calls == [(96, 176), (176, 96)]
    for im, (_, src) in zip(seen["images"], samples):
        np.testing.assert_allclose(im["dt_boxes"], np.asarray(src), atol=1e-3)


def test_predict_maps_boxes_back_from_the_padded_input():
    """foundation predict: the image at the evaluation short side, padded; a box predicted at the source box's
    place in the input comes back as the source box."""
    from types import SimpleNamespace

    from foundation.predict import predict_image

    cfg = _cfg()
    image = Image.open(io.BytesIO(_det_sample()["png"]))
    x, s, offset = letterbox_image(image, cfg)
    assert x.shape == (3, 96, 176) and s == pytest.approx(0.425) and list(offset) == [0.0, 0.0]
    src = torch.tensor(_xyxy(BOXES[:1]), dtype=torch.float32)[0]

    class Model(nn.Module):
        def forward(self, images):
            h, w = images.shape[-2:]
            b = src * s
            box = torch.stack([(b[0] + b[2]) / 2 / w, (b[1] + b[3]) / 2 / h, (b[2] - b[0]) / w, (b[3] - b[1]) / h])
            return [{"logits": torch.tensor([[5.0]]), "boxes": box[None, None]}]

    task = SimpleNamespace(model=Model(), kind="detection", meta={})
    res = predict_image({"detection": (task, cfg)}, image)["detection"]
    np.testing.assert_allclose(res["boxes"][0], src.numpy(), atol=1e-3)


def test_fixed_size_consumers_letterbox_a_per_image_task(monkeypatch):
    """Robustness, SysNoise and quantize run the fixed-size deploy seam: their DataConfig drops data.resize, so a
    2:1 sample decodes into data.image_size (64²) and the deployed network takes it (it raised a shape error)."""
    import evaluation.unihcp_robustness as ur

    cfg = _cfg()
    task = _task(cfg)
    monkeypatch.setattr(ur, "load_unihcp", lambda ckpt, name, device: ({"detection": (task, cfg)}, None))
    name, _, data, deploy, outputs = ur.task_network("ckpt", None)
    assert name == "detection" and data.resize is None and data.image_size == cfg.image_size
    item = decode_human_sample(_det_sample(), data, train=False)
    assert item["image"].shape == (3, 64, 64)
    logits, boxes = deploy(item["image"][None])
    assert boxes.shape == (1, 3 * 8, 4)
