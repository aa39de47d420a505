"""Pedestrian detection as CrowdHuman's evaluator computes it (the tester UniHCP releases,
``core/solvers/utils/peddet_tester_dev.py``, CrowdDet's ``APMRToolkits``): AP, log-average miss rate
MR^-2 over FPPI in [1e-2, 1e0], and the Jaccard index (JI); plus COCO's 101-point AP@0.5 for reference.

Boxes are [x, y, w, h]. Per image, detections are matched greedily in score order to the unmatched
ground-truth box of highest IoU above the threshold (a true positive); a detection with no such box
whose intersection-over-its-own-area (IoA) with an ignore region is above the threshold is ignored
(neither true nor false positive); every other detection is a false positive.

* ``AP`` is CrowdHuman's ``eval_AP``: Caltech matching (below), then the trapezoidal area under the
  (recall, precision) points of the detections in score order, recall over the non-ignored ground truth.
  As there, an image with neither ground truth nor ignore region contributes no detections.
* ``AP50`` follows COCOeval (IoU ≥ 0.5, ignore regions as ``iscrowd`` boxes, 101-point interpolated
  precision), and is tested against it.
* ``MR-2`` follows CrowdHuman's evaluation (CrowdDet ``APMRToolkits``, mmdet's ``CrowdHumanMetric``):
  Caltech matching with strict thresholds (IoU > 0.5, IoA > 0.5); at each of the 9 FPPI reference points
  10^-2 ... 10^0 the miss rate of the first operating point whose FPPI reaches it (the last point when
  none does); MR^-2 is their geometric mean.
* ``JI`` follows CrowdHuman's ``computeJaccard``: per image, detections scoring above a threshold are
  matched one-to-one to ground truth by a maximum-weight matching on IoU (edges IoU ≥ 0.5; scipy's
  ``linear_sum_assignment`` on -IoU, as its ``compute_lap``); unmatched detections and unmatched ground
  truth inside an ignore region (IoA > 0.5) are not counted; JI = the sum over images of
  k / (n_gt + n_dt - k) divided by the number of images (an image without detections or ground truth
  adds 0); the reported ``JI`` is the best over thresholds 0.1, ..., 0.9.

CrowdHuman's tools also clip boxes to the image first; pass clipped boxes to get exactly their figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

IOU_THRESHOLD = 0.5
FPPI_REFS = np.power(10.0, np.linspace(-2.0, 0.0, 9))
JI_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))
JI_EPS = 1e-6


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


def match_image(dt_boxes, dt_scores, gt_boxes, ignore=None, iou_threshold: float = IOU_THRESHOLD,
                strict: bool = False) -> tuple:
    """(scores, is_tp, is_ignored) of the image's detections in descending score order.

    ``strict``: overlaps must exceed the threshold (Caltech / CrowdHuman), else reach it (COCO)."""
    dt, gt, ig = _boxes(dt_boxes), _boxes(gt_boxes), _boxes(ignore)
    scores = np.asarray(dt_scores, np.float64).ravel()
    order = np.argsort(-scores, kind="mergesort")
    dt, scores = dt[order], scores[order]
    iou = _overlaps(dt, gt)[0] if len(gt) else np.zeros((len(dt), 0))
    ioa = _overlaps(dt, ig)[1].max(1) if len(ig) else np.zeros(len(dt))

    def passes(v):
        return v > iou_threshold if strict else v >= iou_threshold

    taken = np.zeros(len(gt), bool)
    tp = np.zeros(len(dt), bool)
    for i in range(len(dt)):
        cand = np.where(taken, -1.0, iou[i])
        if cand.size and passes(cand.max()):
            taken[int(cand.argmax())] = tp[i] = True
    return scores, tp, ~tp & passes(ioa)


def _accumulate(images: Sequence[dict], iou_threshold: float, strict: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(is_tp, is_fp) of every non-ignored detection of all images in descending score order, and n_gt.
    ``strict`` (CrowdHuman's ``compare_caltech``) also leaves out the detections of an image with neither
    ground truth nor ignore region, as that evaluator does."""
    scores, tps, ignored = [np.zeros(0)], [np.zeros(0, bool)], [np.zeros(0, bool)]
    n_gt = 0
    for im in images:
        if strict and not len(_boxes(im.get("gt_boxes"))) and not len(_boxes(im.get("ignore"))):
            continue
        s, t, g = match_image(im.get("dt_boxes"), im.get("dt_scores", []), im.get("gt_boxes"), im.get("ignore"),
                              iou_threshold, strict)
        scores.append(s)
        tps.append(t)
        ignored.append(g)
        n_gt += len(_boxes(im.get("gt_boxes")))
    s, t, g = np.concatenate(scores), np.concatenate(tps), np.concatenate(ignored)
    order = np.argsort(-s, kind="mergesort")
    t, g = t[order], g[order]
    return t[~g], ~t[~g], n_gt


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


def crowdhuman_ap(tp: np.ndarray, fp: np.ndarray, n_gt: int) -> float:
    """CrowdHuman's ``eval_AP``: the trapezoidal area under the (recall, precision) points of the
    detections in score order (from the first detection; no (0, 1) point is added)."""
    if n_gt == 0 or tp.size == 0:
        return 0.0
    tpc, fpc = np.cumsum(tp), np.cumsum(fp)
    recall, precision = tpc / n_gt, tpc / (tpc + fpc)
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def log_average_miss_rate(tp: np.ndarray, fp: np.ndarray, n_gt: int, n_images: int) -> float:
    """MR^-2 as CrowdHuman computes it: geometric mean over the 9 FPPI references of the miss rate at
    the first operating point whose FPPI ≥ the reference (the last point when none reaches it)."""
    if tp.size == 0:
        return 1.0
    fppi = np.cumsum(fp) / max(n_images, 1)
    miss = 1.0 - np.cumsum(tp) / max(n_gt, 1)
    first = np.searchsorted(fppi, FPPI_REFS, side="left")  # fppi is non-decreasing
    mr = miss[np.minimum(first, fppi.size - 1)]
    return float(np.exp(np.log(np.maximum(mr, 1e-10)).mean()))


def _ji_image(dt: np.ndarray, gt: np.ndarray, ig: np.ndarray, iou_threshold: float) -> tuple[int, int, int]:
    """(matched, counted ground truth, counted detections) of one image for CrowdHuman's JI."""
    k = 0
    dt_left, gt_left = np.ones(len(dt), bool), np.ones(len(gt), bool)
    if len(dt) and len(gt):
        iou = _overlaps(dt, gt)[0]
        rows, cols = linear_sum_assignment(-np.where(iou >= iou_threshold, iou, 0.0))  # maximum total IoU
        keep = iou[rows, cols] >= iou_threshold
        rows, cols = rows[keep], cols[keep]
        k = rows.size
        dt_left[rows] = False
        gt_left[cols] = False
    ignored_dt = ignored_gt = 0
    if len(ig):
        if dt_left.any():
            ignored_dt = int((_overlaps(dt[dt_left], ig)[1].max(1) > iou_threshold).sum())
        if gt_left.any():
            ignored_gt = int((_overlaps(gt[gt_left], ig)[1].max(1) > iou_threshold).sum())
    return k, len(gt) - ignored_gt, len(dt) - ignored_dt


def jaccard_index(images: Sequence[dict], iou_threshold: float = IOU_THRESHOLD,
                  score_thresholds: Sequence[float] = JI_THRESHOLDS) -> dict:
    """CrowdHuman JI: ``JI`` (best over score thresholds), ``JI_score_threshold`` and ``per_threshold``."""
    per = {}
    for thr in score_thresholds:
        ratios = []
        for im in images:
            dt = _boxes(im.get("dt_boxes"))
            dt = dt[np.asarray(im.get("dt_scores", []), np.float64).ravel() > thr]
            k, m, n = _ji_image(dt, _boxes(im.get("gt_boxes")), _boxes(im.get("ignore")), iou_threshold)
            ratios.append(k / (m + n - k + JI_EPS) if m or n else 0.0)
        per[thr] = float(np.sum(ratios) / max(len(images), 1))
    best = max(per, key=per.get)
    return {"JI": per[best], "JI_score_threshold": best, "per_threshold": per}


def detection_metrics(images: Sequence[dict], iou_threshold: float = IOU_THRESHOLD) -> dict:
    """CrowdHuman's AP, MR-2 and JI (and COCO's AP50) over ``images``: dicts of ``gt_boxes``, ``ignore``,
    ``dt_boxes``, ``dt_scores`` (every detection above the score threshold, not a top-k)."""
    if not images:
        raise ValueError("no images to evaluate")
    tp, fp, n_gt = _accumulate(images, iou_threshold, strict=False)
    tp_c, fp_c, _ = _accumulate(images, iou_threshold, strict=True)
    return {"AP": crowdhuman_ap(tp_c, fp_c, n_gt), "AP50": average_precision(tp, fp, n_gt),
            "MR-2": log_average_miss_rate(tp_c, fp_c, n_gt, len(images)),
            **jaccard_index(images, iou_threshold), "num_gt": n_gt, "num_images": len(images)}


__all__ = ["average_precision", "crowdhuman_ap", "detection_metrics", "jaccard_index", "log_average_miss_rate", "match_image"]
