"""Evaluations. Training-time ones live in EVALS: fn(model, loader, device, all_reduce) -> dict."""

from evaluation.classification import evaluate_classification

EVALS = {
    "classification": evaluate_classification,
}
