"""recipes/unihcp/vit_base_multitask.yaml against UniHCP's released configuration (tests/fixtures/unihcp_release.yaml:
numbers transcribed from OpenGVLab/UniHCP, each with its file). Fast: nothing trains, no ViT-B is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from foundation.config import load_recipe
from foundation.engine.transfer import build_optimizer, param_groups
from foundation.models.unihcp import LayerNorm2d, UniHCPShared
from foundation.tasks.unihcp import UNIHCP_TASKS

ROOT = Path(__file__).resolve().parents[1]
RELEASE = yaml.safe_load((ROOT / "tests/fixtures/unihcp_release.yaml").read_text())


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(ROOT / "recipes/unihcp/vit_base_multitask.yaml")


def _images_per_step(recipe, entry) -> float:
    """A task's share of the images of one step, up to the world size (batch x accumulated x K x share)."""
    return (entry.batch_size or recipe.train.batch_size) * entry.grad_accum * entry.data.id_instances * entry.share


def test_loss_balance_is_a_weight_per_sample(recipe):
    """Each task's normalised weight / its images per step = the released weight per sample, relative to parsing."""
    total = sum(e.loss_weight for e in recipe.tasks.values())
    per_sample = {n: e.loss_weight / total / _images_per_step(recipe, e) for n, e in recipe.tasks.items()}
    for name, released in RELEASE["sample_weight"].items():
        assert per_sample[name] / per_sample["parsing"] == pytest.approx(released / RELEASE["sample_weight"]["parsing"],
                                                                         rel=1e-9), name


def test_deep_supervision_per_task(recipe):
    for name, entry in recipe.tasks.items():
        cls = UNIHCP_TASKS[entry.task.name]
        assert cls.deep_supervised(entry.task.unihcp) is RELEASE["deep_supervision"][name], name
        assert entry.task.unihcp.initial_prediction is RELEASE["initial_prediction"]


def test_decoder_neck_and_reid_feature(recipe):
    dec = RELEASE["decoder"]
    for entry in recipe.tasks.values():
        u = entry.task.unihcp
        assert (u.width, u.layers, u.heads, u.ffn) == (dec["width"], dec["layers"], dec["heads"], dec["ffn"])
        assert u.reid_queries == dec["reid_queries"] and u.det_patterns == dec["det_patterns"]
        assert u.det_anchors * u.det_patterns == dec["det_queries"]
        assert u.reid_feature_norm is RELEASE["reid_feature_norm"]
    u = recipe.tasks["pose"].task.unihcp
    neck = UniHCPShared(768, u.width, layers=1, heads=u.heads, ffn=8, neck_mid=u.neck_mid,
                        neck_norm=u.neck_norm).neck  # ViT-B's width
    assert (neck.up1.in_channels, neck.up1.out_channels) == (768, RELEASE["neck"]["mid"])
    assert (neck.up2.in_channels, neck.up2.out_channels) == (RELEASE["neck"]["mid"], RELEASE["neck"]["out"])
    assert isinstance(neck.norm, LayerNorm2d) and neck.up1.stride == (2, 2) and neck.up2.stride == (2, 2)


def test_task_losses(recipe):
    p, r = recipe.tasks["parsing"].task.unihcp, RELEASE["parsing"]
    assert p.point_sampling == "importance" and p.dice_points == r["num_points"]
    assert (p.oversample_ratio, p.importance_sample_ratio) == (r["oversample_ratio"], r["importance_sample_ratio"])
    assert (p.presence_weight, p.mask_weight, p.dice_weight) == (r["class_weight"], r["mask_weight"], r["dice_weight"])
    assert p.parse_class_ratios == pytest.approx(r["sample_weight"], rel=1e-8)
    pose = recipe.tasks["pose"].task.unihcp
    # ours: 0.5 x mean((w (p - t))^2) x pose_mse_scale; released: mean((p - t)^2 x w) x mask_weight, w in {0, 1}
    assert 0.5 * pose.pose_mse_scale == RELEASE["pose"]["mask_weight"]
    assert pose.pose_vis_weight == RELEASE["pose"]["class_weight"]
    assert recipe.tasks["attributes"].task.unihcp.attr_pos_ratios == pytest.approx(RELEASE["attributes_sample_weight"])
    d, rd = recipe.tasks["detection"].task.unihcp, RELEASE["detection"]
    assert (d.det_ignore_ioa, d.cost_class, d.cost_bbox, d.cost_giou, d.focal_alpha) == (
        rd["ign_thr"], rd["class_weight"], rd["bbox_weight"], rd["giou_weight"], rd["focal_alpha"])


def test_pose_crops_are_the_released_top_down_crops(recipe):
    """Pose: the box grown to the input's aspect x 1.25 (its centre shifted once per person), flipped / half-body /
    scaled / rotated with the released factors, warped with UDP's matrix (``data.pose_crop: top_down`` and
    ``data.top_down``'s values)."""
    from foundation.data.human_transforms import top_down_box

    data, r = recipe.tasks["pose"].data, RELEASE["pose_crop"]
    assert data.pose_crop == "top_down" and r["use_udp"] is True
    h, w = data.input_hw
    assert w / h == r["aspect_wh"]
    td = data.top_down
    assert (td.padding, td.scale_factor, td.rot_factor, td.rot_prob, data.augment.hflip) == (
        r["padding"], r["scale_factor"], r["rot_factor"], r["rot_prob"], r["flip_prob"])
    assert (td.half_body_prob, td.half_body_joints, td.half_body_padding, td.centre_shift_prob, td.centre_shift) == (
        r["half_body_prob"], r["half_body_joints"], r["half_body_padding"], r["center_shift_prob"], r["center_shift"])
    from foundation.data.human_transforms import upper_body_ids
    from foundation.data.humans import COCO_KEYPOINTS

    assert upper_body_ids(COCO_KEYPOINTS) == r["upper_body_ids"]
    # a tall 30 x 100 box: the width grows to 75 (3:4), then both x 1.25
    assert top_down_box([0, 0, 30, 100], r["aspect_wh"], td.padding)[2:] == (75 * r["padding"], 100 * r["padding"])
    for name, entry in recipe.tasks.items():  # the other tasks read their samples whole
        assert name == "pose" or entry.data.pose_crop == "letterbox", name


def test_position_grid(recipe):
    b = RELEASE["backbone"]
    assert recipe.model.img_size == b["img_size"] and recipe.model.drop_path_rate == b["drop_path_rate"]
    assert recipe.model.backbone.endswith(f"patch{b['patch_size']}_224") and recipe.model.kwargs["dynamic_img_size"]
    # the learnt grid (84 x 84 for ViT-B/16 at 1344), interpolated to each task's input
    vit = timm.create_model("vit_tiny_patch16_224", img_size=recipe.model.img_size, depth=1, embed_dim=16,
                            num_heads=1, num_classes=0, dynamic_img_size=True)
    side = b["img_size"] // b["patch_size"]
    assert vit.pos_embed.shape[1] - vit.num_prefix_tokens == side * side
    assert vit.forward_features(torch.zeros(1, 3, 256, 192)).shape[1] == 16 * 12 + vit.num_prefix_tokens


def _released_scale(name: str, ld: dict) -> float:
    """core/utils.py get_num_layer_for_vit with lpe_lr, and lr x rate ** (num_layers - layer_id - 1)."""
    n = ld["num_layers"]
    if name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    elif name.startswith("patch_embed."):
        layer = 0
    else:  # pos_embed, cls_token (direct ViT parameters, lpe_lr) and the final norm
        layer = n - 1
    return ld["rate"] ** (n - layer - 1)


def test_layer_decay_and_optimizer(recipe):
    """Per-parameter lr scales of a 12-block ViT under the recipe's optim section = the release's rule."""

    class Task(nn.Module):
        backbone_name = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=12, embed_dim=16,
                                              num_heads=1, num_classes=0)
            self.head = nn.Linear(16, 2)

    task = Task()
    scale = {}
    for group in param_groups(task, recipe.optim):
        for p in group["params"]:
            scale[p] = group["lr_scale"]
    ld = RELEASE["layer_decay"]
    for name, p in task.backbone.named_parameters():
        assert scale[p] == pytest.approx(_released_scale(name, ld), rel=1e-9), name
    assert scale[task.head.weight] == 1.0
    assert scale[task.backbone.pos_embed] == 1.0 and scale[task.backbone.blocks[11].attn.qkv.weight] == pytest.approx(4 / 3)
    o, ro = recipe.optim, RELEASE["optimizer"]
    assert (o.lr, o.warmup_lr, o.warmup_steps, o.min_lr, o.weight_decay) == (
        ro["lr"], ro["warmup_from"], ro["warmup_steps"], ro["eta_min"], ro["weight_decay"])
    assert recipe.train.steps == ro["max_iter"] and recipe.train.clip_grad is None
    opt = build_optimizer(task, recipe.optim)
    g = opt.param_groups[0]
    assert type(opt).__name__ == "AdafactorBigVision"
    assert (g["momentum"], g["beta2_cap"], g["clipping_threshold"], g["decay_rate"]) == (
        ro["beta1"], ro["clip_beta2"], ro["clip_threshold"], -ro["decay_rate"])
    assert g["weight_decay"] in (0.0, ro["weight_decay"]) and not g.get("unscaled_wd", False)


def test_inputs_keep_the_released_aspect_ratios(recipe):
    for name, hw in RELEASE["inputs"].items():
        assert recipe.tasks[name].data.input_hw == tuple(hw), name


def test_detection_inputs_are_the_released_per_image_sizes(recipe):
    """Aspect kept, the release's short sides and cap, its crop branch, padding, batch per card and this task's own
    accumulation (the other tasks accumulate nothing)."""
    entry, r = recipe.tasks["detection"], RELEASE["detection_inputs"]
    rs = entry.data.resize
    assert (rs.short, rs.max_long, rs.eval_short, rs.multiple) == (
        r["train_short"], r["max_long"], r["eval_short"], r["pad_multiple"])
    assert (rs.crop_prob, rs.crop_short, list(rs.crop_size)) == (r["crop_prob"], r["crop_short"], r["crop_size"])
    assert entry.batch_size == r["batch_size"]
    assert entry.grad_accum == r["batch_accumulation"] and recipe.train.grad_accum == 1
    assert all(e.grad_accum == 1 for n, e in recipe.tasks.items() if n != "detection")
