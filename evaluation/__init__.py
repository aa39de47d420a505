"""Evaluations. Training-time ones live in EVALS: fn(model, loader, device, all_reduce) -> dict."""

from evaluation.classification import evaluate_classification
from evaluation.retrieval import evaluate_retrieval
from evaluation.zeroshot import evaluate_zeroshot

EVALS = {
    "classification": evaluate_classification,
    "zeroshot": evaluate_zeroshot,
    "retrieval": evaluate_retrieval,
}
