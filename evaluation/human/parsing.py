"""Human parsing metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy, mean class accuracy.

Pixels whose ground truth is ``ignore_index`` (255) are not counted. A class absent from both the ground
truth and the predictions has no IoU and is left out of the mean (as mmseg and the LIP/CIHP evaluation do).
"""

from __future__ import annotations

import numpy as np

from foundation.data.humans import IGNORE_LABEL


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_LABEL) -> np.ndarray:
    """(C, C) int64 counts, rows = ground truth class, columns = predicted class."""
    pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
    keep = gt != ignore_index
    pred, gt = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
    if gt.size and (gt.max() >= num_classes or pred.max() >= num_classes or pred.min() < 0):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    return np.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def parsing_metrics(conf: np.ndarray, class_names: list[str] | None = None) -> dict:
    """``mIoU``, ``pixel_accuracy``, ``mean_accuracy`` and per-class ``IoU`` (None where undefined)."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    gt_count, pred_count = conf.sum(1), conf.sum(0)
    union = gt_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    names = class_names or [str(i) for i in range(len(tp))]
    return {"mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "pixel_accuracy": float(tp.sum() / max(conf.sum(), 1)),
            "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
            "IoU": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)}}


class ParsingMeter:
    """Accumulates the confusion matrix over images (predictions and label maps of any size, equal pairs)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_LABEL) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.conf = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.conf += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)

    def result(self, class_names: list[str] | None = None) -> dict:
        return parsing_metrics(self.conf, class_names)


__all__ = ["ParsingMeter", "confusion_matrix", "parsing_metrics"]
