"""Pose metrics: COCO keypoint AP/AR by OKS (pycocotools' COCOeval, iouType ``keypoints``) and PCKh.

``keypoint_ap`` takes the ground truth as a COCO dataset dict (``images``, ``annotations`` with
``keypoints``/``area``/``bbox``/``iscrowd``, ``categories``) and the predictions as COCO results
(``image_id``, ``category_id``, ``keypoints`` flat [x, y, score]*K, ``score``), in source-image pixels
(a pose shard's ``crop[:2]`` moves crop coordinates back). Sigmas default to COCO's 17.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

from foundation.data.humans import COCO_SIGMAS

COCO_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def keypoint_ap(gt: dict, results: list[dict], sigmas: list[float] | None = None) -> dict[str, float]:
    """COCO keypoint AP/AR (OKS thresholds 0.50:0.05:0.95, 20 detections per image) via COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if not results:
            return {k: 0.0 for k in COCO_STATS}
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, "keypoints")
        k = len(results[0]["keypoints"]) // 3
        sig = sigmas if sigmas is not None else COCO_SIGMAS
        if len(sig) != k:
            raise ValueError(f"{k} keypoints but {len(sig)} OKS sigmas; give sigmas= for this skeleton")
        ev.params.kpt_oks_sigmas = np.asarray(sig, np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(COCO_STATS, ev.stats)}


def crops_to_coco(labels: list[dict], category: dict | None = None) -> dict:
    """A COCO ground-truth dict with one image per pose-shard sample (its crop), from the samples' ``json``
    labels (``keypoints``, ``box``, optional ``area``: the OKS scale, the box area when absent). Image ids are
    the list positions; give ``keypoint_ap`` predictions in crop pixels with those ids: top-down evaluation
    on ground-truth boxes."""
    images, anns = [], []
    for i, lab in enumerate(labels):
        kps = np.asarray(lab["keypoints"], np.float64).reshape(-1, 3)
        x, y, w, h = (float(v) for v in lab["box"])
        images.append({"id": i, "file_name": str(i)})
        anns.append({"id": i + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": [x, y, w, h],
                     "area": float(lab.get("area") or w * h), "keypoints": kps.ravel().tolist(),
                     "num_keypoints": int((kps[:, 2] > 0).sum())})
    return {"images": images, "annotations": anns, "categories": [category or {"id": 1, "name": "person"}]}


def oks(pred: np.ndarray, gt: np.ndarray, area: float, sigmas: list[float] | None = None) -> float:
    """Object keypoint similarity of one prediction (K, 2+) with one ground truth (K, 3), as COCOeval
    computes it: mean over labelled keypoints of exp(-d² / (2 · area · (2σ)²))."""
    sig = np.asarray(sigmas if sigmas is not None else COCO_SIGMAS, np.float64)
    gt = np.asarray(gt, np.float64)
    d2 = ((np.asarray(pred, np.float64)[:, :2] - gt[:, :2]) ** 2).sum(1)
    e = d2 / (2 * sig) ** 2 / (area + np.spacing(1)) / 2
    labelled = gt[:, 2] > 0
    return float(np.exp(-e[labelled]).mean()) if labelled.any() else 0.0


def head_size_from_box(head_boxes: np.ndarray) -> np.ndarray:
    """MPII's head size: 0.6 × the diagonal of the head box [x1, y1, x2, y2] (N, 4) → (N,)."""
    b = np.asarray(head_boxes, np.float64).reshape(-1, 4)
    return 0.6 * np.hypot(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])


MPII_EXCLUDED = (6, 7)  # MPII's pelvis and thorax: left out of the reported mean (its evaluation script)


def pckh(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, head_size: np.ndarray,
         threshold: float = 0.5, excluded: tuple[int, ...] | None = None) -> dict:
    """PCKh@threshold: a visible joint is correct when its error ≤ threshold × head size.

    pred, gt (N, K, 2); visible (N, K) bool; head_size (N,). Returns ``PCKh`` over the visible joints
    outside ``excluded`` (None: MPII's pelvis and thorax when K = 16, as MPII's mean; () for every joint),
    ``PCKh_all`` over every visible joint, and ``per_joint`` (nan for a joint never visible).
    """
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    vis = np.asarray(visible, bool)
    err = np.linalg.norm(pred[..., :2] - gt[..., :2], axis=-1) / np.asarray(head_size, np.float64)[:, None]
    correct = (err <= threshold) & vis
    counts = vis.sum(0)
    per_joint = np.where(counts > 0, correct.sum(0) / np.maximum(counts, 1), np.nan)
    if excluded is None:
        excluded = MPII_EXCLUDED if vis.shape[1] == 16 else ()
    used = np.ones(vis.shape[1], bool)
    used[list(excluded)] = False
    return {"PCKh": float(correct[:, used].sum() / max(vis[:, used].sum(), 1)),
            "PCKh_all": float(correct.sum() / max(vis.sum(), 1)), "per_joint": per_joint.tolist(),
            "threshold": threshold}


__all__ = ["COCO_STATS", "MPII_EXCLUDED", "crops_to_coco", "head_size_from_box", "keypoint_ap", "oks", "pckh"]
