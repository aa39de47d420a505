"""Evaluations. Training-time ones live in EVALS: fn(model, loader, device, all_reduce) -> dict."""

from evaluation.classification import evaluate_classification
from evaluation.human_evals import (
    evaluate_attributes, evaluate_detection, evaluate_parsing, evaluate_pose, evaluate_reid_queries,
)
from evaluation.retrieval import evaluate_retrieval
from evaluation.zeroshot import evaluate_zeroshot

EVALS = {
    "classification": evaluate_classification,
    "zeroshot": evaluate_zeroshot,
    "retrieval": evaluate_retrieval,
    "unihcp_pose": evaluate_pose,
    "unihcp_parsing": evaluate_parsing,
    "unihcp_attributes": evaluate_attributes,
    "unihcp_reid": evaluate_reid_queries,
    "unihcp_detection": evaluate_detection,
}
