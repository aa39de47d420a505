"""k-NN classifier on frozen features: the training-free baseline.

Cosine similarity, the k = 20 nearest training samples, each voting for its class with weight
exp(similarity / T) (T = 0.07), as in Wu et al. 2018 / DINO. scikit-learn's brute-force
``KNeighborsClassifier`` with the cosine metric does the search; the vote weight is its ``weights``
callable on the cosine distance d = 1 - similarity.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from foundation.adapt.probe import classification_metrics


def _vote_weights(distances: np.ndarray, temperature: float) -> np.ndarray:
    return np.exp((1.0 - distances) / temperature)  # exp(cos_sim / T)


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *, k: int = 20,
                 temperature: float = 0.07) -> dict:
    """Top-1 / top-5 / mean per-class recall (%) of the temperature-weighted cosine k-NN vote on val."""
    k_used = min(k, len(train_y))
    clf = KNeighborsClassifier(n_neighbors=k_used, metric="cosine", algorithm="brute",
                               weights=partial(_vote_weights, temperature=temperature))
    clf.fit(train_x, train_y)
    scores = clf.predict_proba(val_x)
    return {**classification_metrics(scores, val_y, clf.classes_), "k": k_used, "temperature": temperature,
            "train_samples": int(len(train_y)), "val_samples": int(len(val_y))}


__all__ = ["knn_classify"]
