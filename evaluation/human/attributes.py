"""Pedestrian attribute metrics as in PA-100K / "Rethinking of Pedestrian Attribute Recognition"
(``get_pedestrian_metrics``): label-based mA and instance-based accuracy, precision, recall, F1.

Ground truth is 1 (present), 0 (absent) or -1 (unknown); unknown entries count in no metric. Divisions
carry the reference code's eps = 1e-20, so an attribute without positives has a positive recall of 0.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-20


def attribute_metrics(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5,
                      attribute_names: list[str] | None = None) -> dict:
    """pred (N, A): 0/1 labels or scores (> threshold is present; logits: pass threshold=0); gt (N, A)."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if pred.shape != gt.shape:
        raise ValueError(f"predictions {pred.shape} and ground truth {gt.shape} differ")
    is_label = pred.dtype == bool or np.isin(pred, (0, 1)).all()
    p = pred.astype(bool) if is_label else pred > threshold
    known = gt >= 0
    g = gt == 1
    p = p & known  # a prediction on an unknown entry counts nowhere
    tp = (g & p).sum(0)
    tn = (~g & ~p & known).sum(0)
    pos, neg = g.sum(0), (known & ~g).sum(0)
    pos_recall, neg_recall = tp / (pos + EPS), tn / (neg + EPS)
    label_ma = (pos_recall + neg_recall) / 2

    inter = (g & p).sum(1)
    union = (g | p).sum(1)
    inst_acc = inter / (union + EPS)
    inst_prec = inter / (p.sum(1) + EPS)
    inst_rec = inter / (g.sum(1) + EPS)
    inst_f1 = 2 * inst_prec * inst_rec / (inst_prec + inst_rec + EPS)
    names = attribute_names or [str(i) for i in range(gt.shape[1])]
    return {"mA": float(label_ma.mean()), "accuracy": float(inst_acc.mean()), "precision": float(inst_prec.mean()),
            "recall": float(inst_rec.mean()), "F1": float(inst_f1.mean()),
            "per_attribute_mA": {n: float(v) for n, v in zip(names, label_ma)}}


__all__ = ["attribute_metrics"]
