"""Human-centric metrics, scored the way each field's papers do (see docs/human_centric.md).

pose: COCO keypoint AP/AR by OKS (pycocotools' COCOeval) and PCKh; parsing: mIoU and pixel accuracy from
a confusion matrix; attributes: mA and instance accuracy / precision / recall / F1; ReID: CMC and mAP
with the Market-1501 protocol; detection: AP@0.5 (COCO 101 points), MR^-2 and CrowdHuman's JI.
"""

from evaluation.human.attributes import attribute_metrics
from evaluation.human.detection import detection_metrics
from evaluation.human.parsing import ParsingMeter, confusion_matrix, parsing_metrics
from evaluation.human.pose import keypoint_ap, oks, pckh
from evaluation.human.reid import evaluate_reid, pairwise_distance

__all__ = ["ParsingMeter", "attribute_metrics", "confusion_matrix", "detection_metrics", "evaluate_reid",
           "keypoint_ap", "oks", "pairwise_distance", "parsing_metrics", "pckh"]
