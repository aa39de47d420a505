"""Linear probe on frozen features, with its weight decay chosen as CLIP_benchmark chooses it.

The protocol of LAION's CLIP_benchmark (``clip_benchmark/metrics/linear_probe.py``), itself OpenAI's
CLIP paper (A.3) with a torch linear layer in place of scikit-learn's L-BFGS:

- features L2-normalised (CLIP_benchmark's ``--normalize``, on by default);
- a ``torch.nn.Linear`` trained with cross-entropy by AdamW (lr 0.1), batch 64, 10 epochs, a cosine
  learning-rate schedule without warm-up, the layer initialised and the batches shuffled from ``seed``;
- the weight decay searched over 97 log-spaced values from 1e-6 to 1e2: first the 7 values 1e-6, 1e-4.67,
  ..., 1e2 (every 16th), then around the best one at distances 8, 4, 2, 1 grid steps (left, best, right;
  the first best in that order wins, so a tie keeps the weaker decay), each value scored by top-1 on a
  validation split;
- the probe refitted with the chosen value and evaluated on the test data (our ``val`` split).

Where we differ on purpose: the validation split is held out *from the training subset* (``holdout`` of
each class, seeded, at least one sample and one left to train) and the refit uses train + val, i.e. the
whole subset, in every case. CLIP_benchmark searches on a validation split of the full training set and
refits on train + val only for full-data probes (its few-shot probe is refitted on the K shots alone,
after a search that saw many more labels); ELEVATER (``MERGE_TRAIN_VAL_FINAL_RUN``) holds the validation
split out of the few-shot subset and merges it back, as here, so a K-shot result never uses more than K
labels per class. With one sample per class nothing can be held out and the decay is 0 (CLIP_benchmark's
choice without a validation split).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

WD_GRID = tuple(float(v) for v in np.logspace(-6, 2, 97))  # CLIP_benchmark's wd_list
COARSE_POINTS = 7  # first pass: every 16th value of the grid (np.logspace(-6, 2, 7))
REFINE_SPANS = (8, 4, 2, 1)  # then left / best / right at these distances (grid steps)
NO_SEARCH_WD = 0.0  # nothing to hold out (one sample per class): CLIP_benchmark's value without a val split
LR, EPOCHS, BATCH_SIZE = 0.1, 10, 64  # CLIP_benchmark's --fewshot_lr, --fewshot_epochs, --batch_size


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray, k: int) -> float:
    """Percentage of rows whose label is among the ``k`` highest-scoring ``classes``."""
    k = min(k, scores.shape[1])
    top = classes[np.argsort(-scores, axis=1)[:, :k]]
    return float(100.0 * (top == labels[:, None]).any(axis=1).mean())


def mean_per_class_recall(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Balanced accuracy (%): the mean over the classes present in ``labels`` of their recall (scikit-learn's
    ``balanced_accuracy_score``, as CLIP_benchmark reports it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true": expected here
        return float(100.0 * balanced_accuracy_score(labels, predictions))


def classification_metrics(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> dict:
    """top-1, top-5 and mean per-class recall (all %) of ``scores`` (N, C) over ``classes``."""
    predictions = classes[np.argmax(scores, axis=1)]
    return {"top1": topk_accuracy(scores, labels, classes, 1), "top5": topk_accuracy(scores, labels, classes, 5),
            "mean_per_class_recall": mean_per_class_recall(labels, predictions), "num_classes": int(len(classes))}


def search_weight_decay(score: Callable[[float], float], grid: tuple[float, ...] = WD_GRID,
                        coarse: int = COARSE_POINTS, spans: tuple[int, ...] = REFINE_SPANS) -> tuple[float, dict]:
    """CLIP_benchmark's coarse-to-fine search: the weight decay of ``grid`` with the highest ``score`` found by
    scoring ``coarse`` evenly spaced values, then left / best / right around the best at each of ``spans``.

    Returns the chosen value and ``{value: score}`` for every value scored (each at most once, in order).
    """
    scored: dict[int, float] = {}

    def peak(indices: list[int]) -> int:
        best = indices[0]
        for i in indices:
            if i not in scored:
                scored[i] = float(score(grid[i]))
            if scored[i] > scored[best]:  # strictly better: the first best (weaker decay on a tie) stays
                best = i
        return best

    stride = (len(grid) - 1) // (coarse - 1)
    best = peak(list(range(0, len(grid), stride))[:coarse])
    for span in spans:
        best = peak([max(best - span, 0), best, min(best + span, len(grid) - 1)])
    return grid[best], {grid[i]: s for i, s in scored.items()}


def train_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, *, lr: float = LR,
                 epochs: int = EPOCHS, batch_size: int = BATCH_SIZE, seed: int = 0) -> tuple[nn.Linear, int]:
    """A linear layer trained on (x, y) as CLIP_benchmark's ``train``: AdamW, cross-entropy, cosine lr without
    warm-up over every step, shuffled batches. Returns the layer and the number of rows one epoch saw."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the layer's initialisation from the seed, the global RNG untouched
        torch.manual_seed(seed)
        model = nn.Linear(x.shape[1], num_classes).to(x.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        seen = 0
        for idx in torch.randperm(len(x), generator=generator).to(x.device).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])  # (B, C) logits
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(idx)
    return model, seen


@torch.no_grad()
def _scores(model: nn.Linear, x: torch.Tensor) -> np.ndarray:
    return model(x).float().cpu().numpy()


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


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                 holdout: float = 0.2, seed: int = 0, lr: float = LR, epochs: int = EPOCHS,
                 batch_size: int = BATCH_SIZE, normalize: bool = True, device: str = "cpu") -> dict:
    """Search the weight decay on a held-out part of the training data, refit on all of it, evaluate on val.

    Returns top-1 / top-5 / mean per-class recall on val (%), the chosen ``weight_decay``, ``wd_search``
    (every value scored and its held-out top-1), the grid, the settings, and how many rows each fit used.
    """
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    xt, xv = torch.as_tensor(train_x, dtype=torch.float32), torch.as_tensor(val_x, dtype=torch.float32)
    if normalize:
        xt, xv = F.normalize(xt, dim=-1), F.normalize(xv, dim=-1)
    xt, xv, yt = xt.to(device), xv.to(device), torch.as_tensor(train_y, dtype=torch.long, device=device)
    settings = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed}
    mask = _holdout(train_y, holdout, seed)
    fit, held = torch.as_tensor(~mask, device=device), torch.as_tensor(mask, device=device)
    search: dict[float, float] = {}
    search_rows = 0
    if mask.any() and len(np.unique(train_y[~mask])) > 1:
        classes = np.arange(num_classes)

        def score(wd: float) -> float:
            nonlocal search_rows
            model, search_rows = train_linear(xt[fit], yt[fit], num_classes, wd, **settings)
            return topk_accuracy(_scores(model, xt[held]), train_y[mask], classes, 1)

        chosen, search = search_weight_decay(score)
    else:
        chosen = NO_SEARCH_WD
    model, refit_rows = train_linear(xt, yt, num_classes, chosen, **settings)  # train + val
    return {
        **classification_metrics(_scores(model, xv), val_y, np.arange(num_classes)),
        "weight_decay": chosen, "wd_search": {f"{wd:.4g}": acc for wd, acc in search.items()},
        "wd_grid": {"start": WD_GRID[0], "stop": WD_GRID[-1], "num": len(WD_GRID), "coarse": COARSE_POINTS,
                    "refine_spans": list(REFINE_SPANS)},
        "lr": lr, "epochs": epochs, "batch_size": batch_size, "normalized": normalize,
        "holdout_samples": int(mask.sum()), "search_train_samples": search_rows, "refit_samples": refit_rows,
        "train_samples": int(len(train_y)), "val_samples": int(len(val_y)),
    }


__all__ = ["WD_GRID", "classification_metrics", "linear_probe", "mean_per_class_recall", "search_weight_decay",
           "topk_accuracy", "train_linear"]
