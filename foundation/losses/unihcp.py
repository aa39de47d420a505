"""UniHCP's losses (Ci et al., CVPR 2023, and its released code), one function per task, plus target
building and the Hungarian matcher of pedestrian detection.

- pose: MSE between predicted and Gaussian target heatmaps × the joints' target weights (SimpleBaseline's
  ``JointsMSELoss``), plus BCE on each joint's visibility logit;
- parsing: per present class, sigmoid cross-entropy and dice on importance-sampled points (Mask2Former's
  point losses, drawn per layer and mask) plus a class-frequency-weighted BCE on whether each class occurs;
- attributes: BCE weighted by the positive ratios (``exp(1 - r)`` for positives, ``exp(r)`` for
  negatives: "Rethinking of PAR"'s weighted sigmoid CE), unknown (-1) entries masked; summed over
  attributes, averaged over images;
- ReID: identity cross-entropy + batch-hard triplet with a soft margin (Hermans et al. 2017);
- detection: Hungarian matching (``scipy.optimize.linear_sum_assignment``) on focal + L1 + GIoU costs,
  then sigmoid focal loss on every query (those unmatched inside an ignore region excepted), L1 and GIoU
  on the matched (Deformable DETR's recipe; weights 2 / 5 / 2).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

# --------------------------------------------------------------------------------------------------
# pose


def heatmap_targets(keypoints: Tensor, size: tuple[int, int], stride: float, sigma: float) -> tuple[Tensor, Tensor]:
    """Gaussian heatmaps (B, K, h, w) of keypoints (B, K, 3) [x, y, v] in input pixels at ``stride``, and
    target weights (B, K): 1 for labelled joints (v > 0) inside the map."""
    h, w = size
    xy = keypoints[..., :2] / stride  # heatmap pixels (centre of input pixel i maps to i / stride)
    ys = torch.arange(h, device=keypoints.device, dtype=xy.dtype)
    xs = torch.arange(w, device=keypoints.device, dtype=xy.dtype)
    gx = torch.exp(-((xs - xy[..., 0:1]) ** 2) / (2 * sigma**2))  # (B, K, w)
    gy = torch.exp(-((ys - xy[..., 1:2]) ** 2) / (2 * sigma**2))  # (B, K, h)
    maps = gy[..., :, None] * gx[..., None, :]
    inside = (xy[..., 0] >= 0) & (xy[..., 0] <= w - 1) & (xy[..., 1] >= 0) & (xy[..., 1] <= h - 1)
    weight = ((keypoints[..., 2] > 0) & inside).to(maps.dtype)
    return maps * weight[..., None, None], weight


def pose_loss(maps: Tensor, vis_logits: Tensor, target: Tensor, weight: Tensor, mse_scale: float = 1.0,
              vis_weight: float = 1.0) -> dict[str, Tensor]:
    """``mse``: mean over (B, K) of 0.5·mean_pixels((weight·(pred - target))²) × ``mse_scale`` (JointsMSELoss);
    ``vis``: BCE of the visibility logits (B, K) against ``weight``."""
    w = weight[..., None, None]
    mse = 0.5 * ((maps * w - target * w) ** 2).mean(dim=(-2, -1)).mean() * mse_scale
    vis = F.binary_cross_entropy_with_logits(vis_logits, weight)
    return {"mse": mse, "vis": vis_weight * vis}


def heatmap_peaks(maps: Tensor, stride: float) -> tuple[Tensor, Tensor]:
    """Peak of each heatmap (B, K, h, w) → input-pixel coordinates (B, K, 2) with the quarter-pixel shift
    toward the higher neighbour (SimpleBaseline), and the peak values (B, K)."""
    b, k, h, w = maps.shape
    flat = maps.flatten(2)
    val, idx = flat.max(-1)
    x, y = (idx % w).float(), (idx // w).float()
    xi, yi = x.long(), y.long()
    pad = F.pad(maps, (1, 1, 1, 1), mode="replicate")
    bi, ki = torch.meshgrid(torch.arange(b), torch.arange(k), indexing="ij")
    dx = pad[bi, ki, yi + 1, xi + 2] - pad[bi, ki, yi + 1, xi]
    dy = pad[bi, ki, yi + 2, xi + 1] - pad[bi, ki, yi, xi + 1]
    x = x + 0.25 * torch.sign(dx)
    y = y + 0.25 * torch.sign(dy)
    return torch.stack([x, y], -1) * stride, val


# --------------------------------------------------------------------------------------------------
# parsing


def dice_loss(probs: Tensor, targets: Tensor) -> Tensor:
    """1 - (2·Σpt + 1) / (Σp + Σt + 1) per row (N, P) → (N,)."""
    num = 2 * (probs * targets).sum(-1) + 1
    den = probs.sum(-1) + targets.sum(-1) + 1
    return 1 - num / den


def sample_labels(label_map: Tensor, points: Tensor) -> Tensor:
    """The label (nearest pixel) at each point (B, P, 2) [x, y] in [0, 1] of a label map (B, H, W) → (B, P)."""
    grid = points[:, None].to(label_map.device) * 2 - 1
    return F.grid_sample(label_map[:, None].float(), grid, mode="nearest", align_corners=False).view(len(points), -1).long()


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of maps (N, h, w) at points (N, P, 2) [x, y] in [0, 1] (align_corners=False) → (N, P)."""
    grid = (points * 2 - 1)[:, :, None].to(maps)  # (N, P, 1, 2)
    return F.grid_sample(maps[:, None], grid, align_corners=False)[:, 0, :, 0]


@torch.no_grad()
def importance_points(mask_logits: Tensor, num_points: int, oversample: float = 3.0,
                      importance: float = 0.75) -> Tensor:
    """Mask2Former's point sampling (PointRend's ``get_uncertain_point_coords_with_randomness``) for masks
    (N, h, w): draw ``oversample`` x ``num_points`` uniform points, keep the ``importance`` share whose logit
    is closest to 0 (most uncertain), fill the rest uniformly → (N, num_points, 2) [x, y] in [0, 1]."""
    n = mask_logits.shape[0]
    candidates = torch.rand(n, int(num_points * oversample), 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits.float(), candidates).abs()  # (N, kP)
    keep = int(importance * num_points)
    idx = uncertainty.topk(keep, dim=1).indices
    chosen = candidates.gather(1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - keep, 2, device=mask_logits.device)
    return torch.cat([chosen, rest], 1)


def ratio_weights(targets: Tensor, ratios: Tensor) -> Tensor:
    """"Rethinking of PAR"'s weights (the release's ``ratio2weight``): positives exp(1 - r), negatives exp(r)."""
    r = ratios.to(targets)
    return torch.exp(targets * (1 - r) + (1 - targets) * r)


def parsing_loss(class_logits: Tensor, mask_logits: Tensor, label_map: Tensor, num_points: int,
                 ignore_index: int = 255, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 presence_weight: float = 0.25, points: Tensor | None = None, class_ratios: Tensor | None = None,
                 sampling: str = "importance", oversample: float = 3.0, importance: float = 0.75) -> dict[str, Tensor]:
    """The released parsing loss (``FocalDiceLoss_bce_cls_emb_sample_weight``). Class queries' masks
    (B, C, h, w) against a label map (B, H, W): for every class present in an image, sigmoid CE (mean over
    its points) and dice on ``num_points`` points drawn per mask (``sampling``: importance or uniform; or
    ``points`` (B, P, 2) [x, y] shared by an image's masks), averaged over the present masks; points on
    ``ignore_index`` pixels are left out. Presence: BCE of the class logits (B, C) on whether each class
    occurs, weighted by ``class_ratios`` (``ratio_weights``) when given."""
    b, c = class_logits.shape
    classes = torch.where(label_map == ignore_index, c, label_map.long()).clamp(max=c).flatten(1)  # ignore -> bin c
    present = torch.zeros(b, c + 1, device=label_map.device).scatter_(1, classes, 1.0)[:, :c]  # (B, C) occurs
    img, cls = present.nonzero(as_tuple=True)  # one mask per (image, present class)
    if len(img):
        masks = mask_logits[img.to(mask_logits.device), cls.to(mask_logits.device)].float()  # (N, h, w)
        if points is not None:
            pts = points.to(masks.device)[img.to(masks.device)]
        elif sampling == "importance":
            pts = importance_points(masks.detach(), num_points, oversample, importance)
        else:
            pts = torch.rand(len(img), num_points, 2, device=masks.device)
        logits = point_sample(masks, pts)  # (N, P)
        labels = sample_labels(label_map[img], pts.to(label_map.device)).to(logits.device)  # (N, P)
        valid = (labels != ignore_index).float()
        target = (labels == cls.to(labels.device)[:, None]).float()
        ce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum(1)
        ce = (ce / valid.sum(1).clamp(min=1)).mean()
        dice = dice_loss(logits.sigmoid() * valid, target * valid).mean()
    else:
        ce = dice = mask_logits.sum() * 0.0
    weight = ratio_weights(present, class_ratios) if class_ratios is not None else None
    presence = F.binary_cross_entropy_with_logits(class_logits.float(), present, weight=weight)
    return {"mask": mask_weight * ce, "dice": dice_weight * dice, "presence": presence_weight * presence}


def parsing_prediction(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Per-pixel class: argmax over classes of sigmoid(class) · sigmoid(mask); (B, C, h, w) → (B, h, w)."""
    return (class_logits.sigmoid()[..., None, None] * mask_logits.sigmoid()).argmax(1)


# --------------------------------------------------------------------------------------------------
# attributes


def attribute_loss(logits: Tensor, targets: Tensor, pos_ratio: Tensor) -> Tensor:
    """Weighted sigmoid CE (B, A): positives × exp(1 - r), negatives × exp(r), -1 entries masked; summed
    over attributes, averaged over the batch."""
    known = (targets >= 0).float()
    t = targets.clamp(min=0).float()
    r = pos_ratio.to(logits)
    weight = torch.where(t > 0, torch.exp(1 - r), torch.exp(r)) * known
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, weight=weight, reduction="none")
    return bce.sum() / logits.shape[0]


# --------------------------------------------------------------------------------------------------
# ReID


def batch_hard_triplet(features: Tensor, labels: Tensor) -> Tensor:
    """Soft-margin batch-hard triplet: mean over anchors with a positive and a negative of
    softplus(max d(a, p) - min d(a, n)), Euclidean distances."""
    d = torch.cdist(features.float(), features.float())  # (B, B)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    usable = pos.any(1) & neg.any(1)
    if not usable.any():
        return features.sum() * 0.0
    hardest_pos = torch.where(pos, d, torch.full_like(d, -1e9)).max(1).values
    hardest_neg = torch.where(neg, d, torch.full_like(d, 1e9)).min(1).values
    return F.softplus(hardest_pos - hardest_neg)[usable].mean()


def reid_loss(logits: Tensor, features: Tensor, labels: Tensor, triplet_weight: float = 1.0) -> dict[str, Tensor]:
    return {"ce": F.cross_entropy(logits.float(), labels), "triplet": triplet_weight * batch_hard_triplet(features, labels)}


# --------------------------------------------------------------------------------------------------
# detection


def focal_cost(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Deformable DETR's classification cost of calling each query a person: (Q,)."""
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    neg = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
    return pos - neg


@torch.no_grad()
def match_cost(logits: Tensor, boxes: Tensor, gt: Tensor, cost_class: float, cost_bbox: float, cost_giou: float,
               alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Cost matrix (Q, G): ``cost_class``·focal + ``cost_bbox``·L1(cxcywh) - ``cost_giou``·GIoU."""
    c_cls = focal_cost(logits, alpha, gamma)[:, None]
    c_l1 = torch.cdist(boxes.float(), gt.float(), p=1)
    c_giou = -generalized_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"), box_convert(gt.float(), "cxcywh", "xyxy"))
    return cost_class * c_cls + cost_bbox * c_l1 + cost_giou * c_giou


def hungarian_match(cost: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment (rows = queries, cols = ground truth) by scipy."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return rows, cols


def _ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the box's own area (Q, M), xyxy."""
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-9).prod(-1)
    return inter / area[:, None]


def detection_loss(logits: Tensor, boxes: Tensor, gt_boxes: list[Tensor], ignore: list[Tensor], *,
                   cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25,
                   gamma: float = 2.0, ioa_threshold: float = 0.7) -> dict[str, Tensor]:
    """``logits`` (B, Q), ``boxes`` (B, Q, 4) normalised cxcywh; per image ``gt_boxes`` (G, 4) and ``ignore``
    (M, 4) normalised xyxy. Returns ``focal`` / ``l1`` / ``giou`` already weighted (2 / 5 / 2), each
    normalised by the number of ground-truth boxes."""
    b, q = logits.shape
    targets = torch.zeros_like(logits, dtype=torch.float32)
    weights = torch.ones_like(targets)
    src, tgt = [], []
    sizes = [len(g) for g in gt_boxes]
    gts = [box_convert(g.to(boxes), "xyxy", "cxcywh") for g in gt_boxes]
    costs = None
    if sum(sizes):  # one cost matrix for the batch (DETR): (B, Q, all boxes), then each image's block
        costs = match_cost(logits.flatten(0, 1), boxes.flatten(0, 1), torch.cat(gts), cost_class, cost_bbox,
                           cost_giou, alpha, gamma).view(b, q, -1).cpu().split(sizes, -1)
    for i in range(b):
        gt = gts[i]
        matched = torch.zeros(q, dtype=torch.bool, device=logits.device)
        if len(gt):
            rows, cols = hungarian_match(costs[i][i])
            rows_t = torch.as_tensor(rows, device=logits.device)
            targets[i, rows_t] = 1.0
            matched[rows_t] = True
            src.append(boxes[i, rows_t])
            tgt.append(gt[torch.as_tensor(cols, device=logits.device)])
        if len(ignore[i]):
            pred = box_convert(boxes[i].detach().float(), "cxcywh", "xyxy")
            inside = (_ioa(pred, ignore[i].to(pred)) > ioa_threshold).any(1)
            weights[i, inside & ~matched] = 0.0  # neither person nor background: the crowd rule
    n = max(float(sum(len(g) for g in gt_boxes)), 1.0)
    focal = (sigmoid_focal_loss(logits.float(), targets, alpha=alpha, gamma=gamma, reduction="none") * weights).sum() / n
    if src:
        s, t = torch.cat(src).float(), torch.cat(tgt).float()
        l1 = F.l1_loss(s, t, reduction="sum") / n
        giou = (1 - torch.diag(generalized_box_iou(box_convert(s, "cxcywh", "xyxy"), box_convert(t, "cxcywh", "xyxy")))).sum() / n
    else:
        l1 = giou = boxes.sum() * 0.0
    return {"focal": cost_class * focal, "l1": cost_bbox * l1, "giou": cost_giou * giou}


__all__ = ["attribute_loss", "batch_hard_triplet", "detection_loss", "dice_loss", "focal_cost", "heatmap_peaks",
           "heatmap_targets", "hungarian_match", "importance_points", "match_cost", "parsing_loss", "point_sample",
           "ratio_weights", "parsing_prediction", "pose_loss",
           "reid_loss", "sample_labels"]
