"""Linear probe: multinomial logistic regression (L-BFGS, scikit-learn) on frozen features.

The inverse regularisation strength C is chosen on a held-out, stratified part of the training split
(``holdout`` of each class, at least one sample, at most all but one), the probe is then refitted on the
whole training split with that C and evaluated on val. Features are standardised with the training
split's statistics first (L-BFGS converges in far fewer steps on standardised inputs).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))  # 1e-4 ... 1e2
DEFAULT_C = 1.0  # used when every class has a single training sample (nothing to hold out)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray, k: int) -> float:
    """Percentage of rows whose label is among the ``k`` highest-scoring ``classes``."""
    k = min(k, scores.shape[1])
    top = classes[np.argsort(-scores, axis=1)[:, :k]]
    return float(100.0 * (top == labels[:, None]).any(axis=1).mean())


def _holdout(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out rows: ``fraction`` of each class, at least 1, keeping at least 1 to train."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            continue
        n = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        mask[rng.choice(idx, size=n, replace=False)] = True
    return mask


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, warm: LogisticRegression | None = None):
    clf = warm or LogisticRegression(solver="lbfgs", max_iter=max_iter, warm_start=True, tol=1e-4)
    clf.set_params(C=c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # n_iter is reported instead
        clf.fit(x, y)
    return clf


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                 grid: tuple[float, ...] = C_GRID, holdout: float = 0.2, seed: int = 0, max_iter: int = 1000) -> dict:
    """Fit and evaluate the probe; returns top-1/top-5 on val (percent), the chosen C and the search."""
    scaler = StandardScaler().fit(train_x)
    xt, xv = scaler.transform(train_x).astype(np.float32), scaler.transform(val_x).astype(np.float32)
    mask = _holdout(train_y, holdout, seed)
    search: dict[str, float] = {}
    if mask.any() and len(np.unique(train_y[~mask])) > 1:
        warm = None
        for c in sorted(grid):  # small C first: each fit warm-starts from the previous (smoother) solution
            warm = _fit(xt[~mask], train_y[~mask], c, max_iter, warm)
            search[f"{c:g}"] = float(100.0 * (warm.predict(xt[mask]) == train_y[mask]).mean())
        best = max(search.values())
        chosen = min(float(c) for c, acc in search.items() if acc == best)  # ties: the stronger regularisation
    else:
        chosen = DEFAULT_C
    clf = _fit(xt, train_y, chosen, max_iter)
    scores = clf.decision_function(xv)
    if scores.ndim == 1:  # two classes: one margin
        scores = np.stack([-scores, scores], axis=1)
    return {
        "top1": topk_accuracy(scores, val_y, clf.classes_, 1),
        "top5": topk_accuracy(scores, val_y, clf.classes_, 5),
        "C": chosen, "C_search": search, "holdout_samples": int(mask.sum()), "train_samples": int(len(train_y)),
        "val_samples": int(len(val_y)), "n_iter": int(np.max(clf.n_iter_)),
    }


__all__ = ["C_GRID", "linear_probe", "topk_accuracy"]
