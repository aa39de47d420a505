"""Pedestrian detection: AP@0.5 (COCO-style, 101 recall points), log-average miss rate MR^-2 over FPPI
in [1e-2, 1e0], and CrowdHuman's Jaccard index (JI).

Boxes are [x, y, w, h]. Per image, detections are matched greedily in score order to the unmatched
ground-truth box of highest IoU ≥ 0.5 (a true positive); a detection with no such box whose
intersection-over-its-own-area with an ignore region is ≥ 0.5 is ignored (neither true nor false
positive) — COCOeval's treatment of ``iscrowd`` regions; every other detection is a false positive.

JI (CrowdHuman, CrowdDet's ``compute_JI``): per image, detections above a score threshold that do not
fall in an ignore region are matched one-to-one to ground truth by a maximum-weight bipartite matching
on IoU ≥ 0.5 (scipy's ``linear_sum_assignment``); JI = mean over images of k / (n_gt + n_dt - k); the
reported ``JI`` is the best over thresholds 0.0, 0.1, ..., 0.9.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

IOU_THRESHOLD = 0.5
FPPI_REFS = np.power(10.0, np.linspace(-2.0, 0.0, 9))
JI_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))


def _boxes(b) -> np.ndarray:
    return np.asarray(b if b is not None else [], np.float64).reshape(-1, 4)


def _overlaps(dt: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, intersection over the detection's area), both (D, G)."""
    dx1, dy1, dx2, dy2 = dt[:, 0:1], dt[:, 1:2], dt[:, 0:1] + dt[:, 2:3], dt[:, 1:2] + dt[:, 3:4]
    gx1, gy1, gx2, gy2 = gt[:, 0], gt[:, 1], gt[:, 0] + gt[:, 2], gt[:, 1] + gt[:, 3]
    iw = np.clip(np.minimum(dx2, gx2) - np.maximum(dx1, gx1), 0, None)
    ih = np.clip(np.minimum(dy2, gy2) - np.maximum(dy1, gy1), 0, None)
    inter = iw * ih
    d_area = (dt[:, 2] * dt[:, 3])[:, None]
    union = d_area + (gt[:, 2] * gt[:, 3])[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0), np.where(d_area > 0, inter / d_area, 0.0)


def match_image(dt_boxes, dt_scores, gt_boxes, ignore=None, iou_threshold: float = IOU_THRESHOLD) -> tuple:
    """(scores, is_tp, is_ignored) of the image's detections in descending score order."""
    dt, gt, ig = _boxes(dt_boxes), _boxes(gt_boxes), _boxes(ignore)
    scores = np.asarray(dt_scores, np.float64).ravel()
    order = np.argsort(-scores, kind="mergesort")
    dt, scores = dt[order], scores[order]
    iou = _overlaps(dt, gt)[0] if len(gt) else np.zeros((len(dt), 0))
    ioa = _overlaps(dt, ig)[1].max(1) if len(ig) else np.zeros(len(dt))
    taken = np.zeros(len(gt), bool)
    tp = np.zeros(len(dt), bool)
    for i in range(len(dt)):
        cand = np.where(taken, -1.0, iou[i])
        if cand.size and cand.max() >= iou_threshold:
            taken[int(cand.argmax())] = tp[i] = True
    ignored = ~tp & (ioa >= iou_threshold)
    return scores, tp, ignored


def _accumulate(images: Sequence[dict], iou_threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    scores, tps, ignored = [], [], []
    n_gt = 0
    for im in images:
        s, t, g = match_image(im.get("dt_boxes"), im.get("dt_scores", []), im.get("gt_boxes"), im.get("ignore"),
                              iou_threshold)
        scores.append(s)
        tps.append(t)
        ignored.append(g)
        n_gt += len(_boxes(im.get("gt_boxes")))
    s, t, g = np.concatenate(scores), np.concatenate(tps), np.concatenate(ignored)
    order = np.argsort(-s, kind="mergesort")
    t, g = t[order], g[order]
    keep = ~g
    return t[keep], ~t[keep], n_gt


def average_precision(tp: np.ndarray, fp: np.ndarray, n_gt: int) -> float:
    """COCO's 101-point interpolated AP of detections in score order."""
    if n_gt == 0:
        return float("nan")
    tpc, fpc = np.cumsum(tp), np.cumsum(fp)
    recall = tpc / n_gt
    precision = tpc / np.maximum(tpc + fpc, np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope: best precision at recall ≥ r
    idx = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    q = np.zeros(idx.size)
    inside = idx < precision.size
    q[inside] = precision[idx[inside]]
    return float(np.mean(q))


def log_average_miss_rate(tp: np.ndarray, fp: np.ndarray, n_gt: int, n_images: int) -> float:
    """MR^-2: geometric mean of the miss rate at 9 FPPI points log-spaced in [1e-2, 1e0] (Dollár et al.);
    at each point the miss rate of the last operating point with FPPI ≤ it (1 when there is none)."""
    fppi = np.cumsum(fp) / max(n_images, 1)
    miss = 1.0 - np.cumsum(tp) / max(n_gt, 1)
    mr = np.ones(len(FPPI_REFS))
    for i, ref in enumerate(FPPI_REFS):
        j = np.flatnonzero(fppi <= ref)
        if j.size:
            mr[i] = miss[j[-1]]
    return float(np.exp(np.log(np.maximum(mr, 1e-10)).mean()))


def jaccard_index(images: Sequence[dict], iou_threshold: float = IOU_THRESHOLD,
                  score_thresholds: Sequence[float] = JI_THRESHOLDS) -> dict:
    """CrowdHuman JI: ``JI`` (best over score thresholds) and ``per_threshold``."""
    per = {}
    for thr in score_thresholds:
        ratios = []
        for im in images:
            dt, gt, ig = _boxes(im.get("dt_boxes")), _boxes(im.get("gt_boxes")), _boxes(im.get("ignore"))
            dt = dt[np.asarray(im.get("dt_scores", []), np.float64).ravel() >= thr]
            if len(ig) and len(dt):
                dt = dt[_overlaps(dt, ig)[1].max(1) < iou_threshold]
            k = 0
            if len(dt) and len(gt):
                iou = _overlaps(dt, gt)[0]
                weight = np.where(iou >= iou_threshold, iou, 0.0)
                r, c = linear_sum_assignment(weight, maximize=True)
                k = int((weight[r, c] > 0).sum())
            denom = len(gt) + len(dt) - k
            ratios.append(k / denom if denom else 1.0)
        per[thr] = float(np.mean(ratios)) if ratios else 0.0
    best = max(per, key=per.get)
    return {"JI": per[best], "JI_score_threshold": best, "per_threshold": per}


def detection_metrics(images: Sequence[dict], iou_threshold: float = IOU_THRESHOLD) -> dict:
    """AP, MR^-2 and JI over ``images``: dicts of ``gt_boxes``, ``ignore``, ``dt_boxes``, ``dt_scores``."""
    tp, fp, n_gt = _accumulate(images, iou_threshold)
    return {"AP50": average_precision(tp, fp, n_gt), "MR-2": log_average_miss_rate(tp, fp, n_gt, len(images)),
            **jaccard_index(images, iou_threshold), "num_gt": n_gt, "num_images": len(images)}


__all__ = ["average_precision", "detection_metrics", "jaccard_index", "log_average_miss_rate", "match_image"]
