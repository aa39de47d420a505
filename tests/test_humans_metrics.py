"""Human-centric metrics against pycocotools or hand computations on a few crafted predictions."""

from __future__ import annotations

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch

from evaluation.human.attributes import attribute_metrics
from evaluation.human.detection import (
    JI_THRESHOLDS, crowdhuman_ap, detection_metrics, jaccard_index, log_average_miss_rate,
)
from evaluation.human.parsing import ParsingMeter, confusion_matrix, parsing_metrics
from evaluation.human.pose import MPII_EXCLUDED, head_size_from_box, keypoint_ap, oks, pckh
from evaluation.human.reid import evaluate_reid, evaluate_reid_reference, pairwise_distance
from foundation.data.humans import COCO_KEYPOINTS, COCO_SIGMAS

# ---------------------------------------------------------------------------------------------- pose


def _coco_gt(people: list[np.ndarray], area: float) -> dict:
    anns = []
    for i, kps in enumerate(people):
        x0, y0 = kps[:, :2].min(0)
        x1, y1 = kps[:, :2].max(0)
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": area,
                     "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                     "keypoints": kps.ravel().tolist(), "num_keypoints": int((kps[:, 2] > 0).sum())})
    return {"images": [{"id": 1, "width": 640, "height": 480, "file_name": "a.jpg"}], "annotations": anns,
            "categories": [{"id": 1, "name": "person", "keypoints": COCO_KEYPOINTS, "skeleton": []}]}


def _person(rng, cx: float) -> np.ndarray:
    kps = np.zeros((17, 3))
    kps[:, 0] = cx + rng.uniform(-30, 30, 17)
    kps[:, 1] = 200 + rng.uniform(-80, 80, 17)
    kps[:, 2] = 2
    return kps


def _result(kps: np.ndarray, score: float) -> dict:
    flat = np.concatenate([kps[:, :2], np.ones((17, 1))], 1).ravel().tolist()
    return {"image_id": 1, "category_id": 1, "keypoints": flat, "score": score}


def test_keypoint_ap_known_oks():
    rng = np.random.default_rng(0)
    gt_kps = _person(rng, 200)
    area = 5000.0
    gt = _coco_gt([gt_kps], area)
    assert keypoint_ap(gt, [_result(gt_kps, 1.0)])["AP"] == pytest.approx(1.0)
    # move every keypoint so that its similarity is exactly 0.62: OKS 0.62 passes 0.50, 0.55, 0.60 of the
    # ten thresholds 0.50:0.05:0.95 → AP = AR = 3/10
    sig = np.asarray(COCO_SIGMAS)
    d = np.sqrt(-math.log(0.62) * 2 * area * (2 * sig) ** 2)
    angle = rng.uniform(0, 2 * math.pi, 17)
    pred = gt_kps.copy()
    pred[:, 0] += d * np.cos(angle)
    pred[:, 1] += d * np.sin(angle)
    assert oks(pred, gt_kps, area) == pytest.approx(0.62, abs=1e-9)
    stats = keypoint_ap(gt, [_result(pred, 1.0)])
    assert stats["AP"] == pytest.approx(0.3, abs=1e-9) and stats["AR"] == pytest.approx(0.3, abs=1e-9)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == pytest.approx(0.0)

    # our OKS equals pycocotools' computeOks
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([_result(pred, 1.0)]), "keypoints")
        ev.params.imgIds = [1]
        ev._prepare()
        ref = ev.computeOks(1, 1)
    assert ref[0, 0] == pytest.approx(oks(pred, gt_kps, area), abs=1e-12)


def test_keypoint_ap_ranking():
    """Two people; a false positive scored above the one correct detection: precision 1/2 up to recall 1/2
    → AP = 51 × 0.5 / 101 (COCO's 101 recall points 0, 0.01, ..., 0.5 reach it)."""
    rng = np.random.default_rng(1)
    a, b = _person(rng, 150), _person(rng, 450)
    gt = _coco_gt([a, b], 6000.0)
    far = a.copy()
    far[:, 1] += 250  # nowhere near anybody
    stats = keypoint_ap(gt, [_result(far, 0.95), _result(a, 0.9)])
    assert stats["AP"] == pytest.approx(51 * 0.5 / 101, abs=1e-9)
    assert stats["AR"] == pytest.approx(0.5)


def test_pckh_hand_computed():
    gt = np.zeros((2, 3, 2))
    pred = np.zeros((2, 3, 2))
    head = head_size_from_box(np.array([[0, 0, 30, 40], [0, 0, 60, 80]]))  # 0.6 × diagonal: 30, 60
    assert head.tolist() == pytest.approx([30.0, 60.0])
    pred[0, :, 0] = [10, 15, 16]  # threshold 0.5 × 30 = 15: correct, correct (equal), wrong
    pred[1, :, 1] = [29, 31, 100]  # threshold 30: correct, wrong, (not visible)
    visible = np.array([[True, True, True], [True, True, False]])
    out = pckh(pred, gt, visible, head)
    assert out["PCKh"] == pytest.approx(3 / 5)
    assert out["per_joint"] == pytest.approx([1.0, 0.5, 0.0])


# ---------------------------------------------------------------------------------------------- parsing


def test_parsing_confusion_miou():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 1]])  # the 255 pixel is not counted whatever is predicted
    conf = confusion_matrix(pred, gt, 4)
    assert conf.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = parsing_metrics(conf, ["bg", "a", "b", "never"])
    # IoU: bg 2/(3+3-2)=1/2, a 2/(2+3-2)=2/3, b 1/(2+1-1)=1/2, "never" undefined (left out)
    assert m["IoU"] == {"bg": pytest.approx(0.5), "a": pytest.approx(2 / 3), "b": pytest.approx(0.5), "never": None}
    assert m["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)
    meter = ParsingMeter(4)
    meter.update(pred, gt)
    meter.update(gt[:, :2], gt[:, :2])  # 4 more correct bg/bg/bg/b pixels
    assert meter.result()["pixel_accuracy"] == pytest.approx(9 / 11)


# ---------------------------------------------------------------------------------------------- attributes


def test_attribute_metrics_hand_computed():
    gt = np.array([[1, 0, -1], [1, 1, 0], [0, 0, 1], [0, 1, 1]])
    pred = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    m = attribute_metrics(pred, gt, attribute_names=["hat", "bag", "coat"])
    # attr 0: pos 2 (tp 1), neg 2 (tn 1) → 0.5; attr 1: pos 2 (tp 2), neg 2 (tn 1) → 0.75;
    # attr 2 (row 0 unknown): pos 2 (tp 1), neg 1 (tn 1) → 0.75
    assert m["per_attribute_mA"] == {"hat": pytest.approx(0.5), "bag": pytest.approx(0.75), "coat": pytest.approx(0.75)}
    assert m["mA"] == pytest.approx((0.5 + 0.75 + 0.75) / 3)
    # instances (the unknown entry of row 0 counts nowhere): row0 gt{0} pred{0,1}: acc 1/2 p 1/2 r 1
    # row1 gt{0,1} pred{1}: acc 1/2 p 1 r 1/2; row2 gt{2} pred{2}: 1 1 1; row3 gt{1,2} pred{0,1}: 1/3 1/2 1/2
    assert m["accuracy"] == pytest.approx((0.5 + 0.5 + 1 + 1 / 3) / 4)
    assert m["precision"] == pytest.approx((0.5 + 1 + 1 + 0.5) / 4)
    assert m["recall"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert m["F1"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 0.5) / 4)
    # scores with a threshold give the same as the labels they threshold to
    assert attribute_metrics(pred * 0.8 + 0.1, gt)["mA"] == pytest.approx(m["mA"])


# ---------------------------------------------------------------------------------------------- ReID


def test_reid_market_protocol_hand_computed():
    # query: id 1, camera 1. Gallery by distance: [id1 cam1 (same camera: removed), id2, id-1 (junk: removed),
    # id1 cam2, id0 (distractor, stays), id1 cam3]
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    g_pids = np.array([1, 2, -1, 1, 0, 1])
    g_cams = np.array([1, 2, 3, 2, 1, 3])
    out = evaluate_reid(dist, np.array([1]), g_pids, np.array([1]), g_cams, max_rank=4)
    # kept ranking: id2, id1(c2), id0, id1(c3) → first match at rank 2; AP = (1/2 + 2/4) / 2
    assert out["rank1"] == 0.0 and "rank5" not in out  # max_rank 4: no rank-5 figure
    assert out["cmc"] == [0.0, 1.0, 1.0, 1.0]
    assert out["mAP"] == pytest.approx(0.5)
    ref = evaluate_reid_reference(dist, np.array([1]), g_pids, np.array([1]), g_cams, max_rank=4)
    assert ref["cmc"] == out["cmc"] and ref["mAP"] == pytest.approx(out["mAP"])
    # without the same-camera exclusion the id1/cam1 image would be rank 1: check it is what makes rank1 0
    out2 = evaluate_reid(dist, np.array([1]), g_pids, np.array([5]), g_cams, max_rank=4)
    assert out2["rank1"] == 1.0
    # a query whose only matches are in its own camera is not valid
    out3 = evaluate_reid(np.vstack([dist, dist]), np.array([1, 2]), g_pids, np.array([1, 2]), g_cams)
    assert out3["valid_queries"] == 1 and out3["mAP"] == pytest.approx(0.5)


def test_reid_vectorised_equals_reference():
    rng = np.random.default_rng(0)
    ids = 40
    centres = rng.normal(size=(ids, 16))
    q_pids = rng.integers(1, ids, 60)
    g_pids = np.concatenate([rng.integers(0, ids, 500), -np.ones(30, int)])
    q_feat = centres[q_pids] + rng.normal(scale=0.8, size=(60, 16))
    g_feat = centres[np.maximum(g_pids, 0)] + rng.normal(scale=0.8, size=(530, 16))
    q_cams, g_cams = rng.integers(1, 7, 60), rng.integers(1, 7, 530)
    for metric in ("euclidean", "cosine", "ties"):
        dist = pairwise_distance(q_feat, g_feat, "cosine" if metric == "ties" else metric)
        if metric == "ties":  # many equal distances: both rank them by gallery index
            dist = np.round(dist * 20) / 20
        ours = evaluate_reid(dist, q_pids, g_pids, q_cams, g_cams, chunk=7)
        ref = evaluate_reid_reference(dist, q_pids, g_pids, q_cams, g_cams)
        assert ours["valid_queries"] == ref["valid_queries"] and ours["valid_queries"] > 50
        np.testing.assert_allclose(ours["cmc"], ref["cmc"], rtol=0, atol=1e-12)
        assert ours["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
        assert 0.05 < ours["mAP"] < 0.95  # neither trivial nor hopeless: the comparison means something
    d = pairwise_distance(q_feat[:3], g_feat[:4])
    assert d == pytest.approx(np.linalg.norm(q_feat[:3, None] - g_feat[None, :4], axis=-1), abs=1e-4)


# ---------------------------------------------------------------------------------------------- detection


def _coco_bbox_ap50(images: list[dict]) -> float:
    """pycocotools' COCOeval (bbox, IoU 0.5, all areas, 1000 detections) with ignore regions as iscrowd."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns, dets = [], []
    for i, im in enumerate(images, 1):
        for box in im["gt_boxes"]:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": list(box),
                         "area": box[2] * box[3], "iscrowd": 0})
        for box in im.get("ignore", []):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": list(box),
                         "area": box[2] * box[3], "iscrowd": 1})
        for box, s in zip(im["dt_boxes"], im["dt_scores"]):
            dets.append({"image_id": i, "category_id": 1, "bbox": list(box), "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": [{"id": i + 1} for i in range(len(images))], "annotations": anns,
                        "categories": [{"id": 1, "name": "person"}]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.maxDets = [1000]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    return float(ev.eval["precision"][0, :, 0, 0, 0].mean())


def _det_images() -> list[dict]:
    return [
        {"gt_boxes": [[10, 10, 20, 40], [50, 10, 20, 40]], "ignore": [[100, 0, 50, 50]],
         "dt_boxes": [[11, 11, 20, 40], [102, 5, 20, 30], [52, 30, 20, 40], [200, 200, 10, 10]],
         "dt_scores": [0.9, 0.95, 0.8, 0.7]},  # tp, in the ignore region (ignored), IoU 1/3 (fp), fp
        {"gt_boxes": [[0, 0, 10, 20]], "ignore": [],
         "dt_boxes": [[0, 0, 10, 20], [0, 1, 10, 20]], "dt_scores": [0.6, 0.85]},  # duplicate: one is an fp
    ]


def test_detection_ap_against_cocoeval_with_ignore_region():
    images = _det_images()
    ours = detection_metrics(images)
    assert ours["AP50"] == pytest.approx(_coco_bbox_ap50(images), abs=1e-12)
    # by hand: in score order (ignored one dropped) 0.9 tp, 0.85 tp, 0.8 fp, 0.7 fp, 0.6 fp; 3 gt boxes
    # precision envelope 1 up to recall 2/3 → 67 of the 101 recall points → AP = 67/101
    assert ours["AP50"] == pytest.approx(67 / 101)
    # without the ignore region the 0.95 detection is a false positive ranked first
    no_ignore = [{**im, "ignore": []} for im in images]
    assert detection_metrics(no_ignore)["AP50"] == pytest.approx(_coco_bbox_ap50(no_ignore), abs=1e-12)
    assert detection_metrics(no_ignore)["AP50"] < ours["AP50"]


def test_miss_rate_and_ji_hand_computed():
    # MR^-2: 2 images, 4 gt; detections in score order tp, fp, tp → fppi 0, .5, .5; miss .75, .75, .5
    tp, fp = np.array([True, False, True]), np.array([False, True, False])
    mr = log_average_miss_rate(tp, fp, n_gt=4, n_images=2)
    # refs 10^-2 .. 10^-0.25 ≤ 0.5 up to 10^-0.5=0.316: the first 7 refs (≤ 0.316) see fppi 0 → 0.75;
    # CrowdHuman's rule: at each ref, the first point whose fppi reaches it: refs up to 10^-0.5 = 0.316
    # → the fp (fppi .5, miss .75); 0.562 and 1 are never reached → the last point (miss .5)
    assert mr == pytest.approx(math.exp((7 * math.log(0.75) + 2 * math.log(0.5)) / 9))
    # fp then tp on one image: fppi reaches 1 at the fp already, so every ref reads miss rate 1 there
    # (reading the last point with fppi ≤ ref instead would give the tp's 0.5 at ref 1)
    assert log_average_miss_rate(np.array([False, True]), np.array([True, False]), n_gt=2, n_images=1) == 1.0
    # MR through detection_metrics: one image, detections 0.9 (IoU exactly 0.5: a tp for COCO's AP, a miss
    # for CrowdHuman's strict > 0.5) → AP 1, and MR from [fp] → miss rate 1
    exact = [{"gt_boxes": [[0, 0, 10, 10]], "dt_boxes": [[0, 0, 10, 5]], "dt_scores": [0.9]}]
    m = detection_metrics(exact)
    assert m["AP50"] == pytest.approx(1.0) and m["MR-2"] == pytest.approx(1.0)
    images = _det_images()
    ji = jaccard_index(images, score_thresholds=(0.0, 0.75))
    # thr 0: image 1 keeps 3 dts (one in the ignore region dropped), 1 match → 1/(2+3-1)=1/4;
    #        image 2: 2 dts, 1 match → 1/(1+2-1) = 1/2 → mean 3/8
    # thr .75: image 1: 2 dts (0.9, 0.8), 1 match → 1/3; image 2: 1 dt (0.85, IoU 19/21), 1 match → 1
    assert ji["per_threshold"][0.0] == pytest.approx(3 / 8)
    assert ji["per_threshold"][0.75] == pytest.approx((1 / 3 + 1) / 2)
    assert ji["JI"] == pytest.approx(2 / 3) and ji["JI_score_threshold"] == 0.75
    # one-to-one by maximum cardinality: A overlaps X and Y, B only X → A-Y and B-X, k = 2 (a weight-greedy
    # pairing A-X, the best IoU, would leave B unmatched)
    two = [{"gt_boxes": [[0, 0, 10, 10], [3, 0, 10, 10]], "ignore": [],
            "dt_boxes": [[1, 0, 10, 10], [-2, 0, 10, 10]], "dt_scores": [0.9, 0.9]}]
    assert jaccard_index(two, score_thresholds=(0.0,))["JI"] == pytest.approx(1.0, abs=1e-5)
    # an undetected person inside an ignore region is not counted as missed
    hidden = [{"gt_boxes": [[0, 0, 10, 10], [50, 50, 4, 4]], "ignore": [[48, 48, 10, 10]],
               "dt_boxes": [[0, 0, 10, 10]], "dt_scores": [0.9]}]
    assert jaccard_index(hidden, score_thresholds=(0.0,))["JI"] == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------- evaluation paths (oracles)


class _Scripted(torch.nn.Module):
    """A stand-in UniHCPNet: each call returns the next scripted output (the last layer only)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, images):
        self.i += 1
        return [self.outputs[self.i - 1]]


def test_detection_eval_path_crowdhuman_rules_by_hand():
    """Known boxes through evaluate_detection: input pixels -> source pixels (scale 0.5, offset (0, 10)),
    clipping to the image, the 0.05 score threshold, CrowdHuman's AP / MR-2 / JI computed by hand."""
    from evaluation.human_evals import evaluate_detection

    size, s, off = 100.0, 0.5, torch.tensor([0.0, 10.0])
    gt = np.array([[0, 40, 40, 60], [100, 20, 40, 80], [150, 60, 30, 60]], np.float64)  # A, B, C (x, y, w, h)
    # q0 runs off the left edge: unclipped IoU with A is exactly 0.5 (a miss under "> 0.5"), clipped it is A;
    # q1 overlaps nothing; q2 is B; q3 is C but scores under 0.05
    src = torch.tensor([[-20, 40, 40, 100], [60, 120, 90, 150], [100, 20, 140, 100], [150, 60, 180, 120]], dtype=torch.float32)
    scores = torch.tensor([0.95, 0.65, 0.35, 0.04])
    inp = src.view(-1, 2, 2) * s + off  # source -> input pixels
    inp = inp.view(-1, 4)
    cxcywh = torch.stack([(inp[:, 0] + inp[:, 2]) / 2, (inp[:, 1] + inp[:, 3]) / 2, inp[:, 2] - inp[:, 0],
                          inp[:, 3] - inp[:, 1]], 1) / size
    out = {"logits": torch.logit(scores)[None], "boxes": cxcywh[None]}
    batch = {"image": torch.zeros(1, 3, 100, 100),
             "targets": {"offset": off[None], "scale": torch.tensor([s]), "size": torch.tensor([[160, 200]]),
                         "src_boxes": [gt], "src_ignore": [np.zeros((0, 4))]}}
    res = evaluate_detection(_Scripted([out]), [batch])
    # score order A (tp), q1 (fp), B (tp); recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3; trapezoid from the first
    assert res["AP"] == pytest.approx((1 / 3) * (1 / 2 + 2 / 3) / 2)
    # one image: fppi 0, 1, 1 -> every reference (<= 1) first reached at the fp, miss rate 2/3
    assert res["MR-2"] == pytest.approx(2 / 3)
    # JI: thresholds 0.1-0.3 keep 3 boxes, 2 matched: 2 / (3 + 3 - 2); 0.4-0.6: 1 / (3 + 2 - 1); 0.7-0.9: 1 / 3
    assert res["JI"] == pytest.approx(0.5, abs=1e-5) and res["JI_score_threshold"] == pytest.approx(0.1)
    # every box >= 0.0 kept: C found too -> the area gains (1/3)(2/3 + 3/4)/2
    res0 = evaluate_detection(_Scripted([out]), [batch], score_threshold=0.0)
    assert res0["AP"] == pytest.approx((1 / 3) * (1 / 2 + 2 / 3) / 2 + (1 / 3) * (2 / 3 + 3 / 4) / 2)


def test_jaccard_index_divides_by_every_image():
    # CrowdHuman divides the summed ratios by the number of images: an image with no boxes at all adds 0
    one = [{"gt_boxes": [[0, 0, 10, 10]], "dt_boxes": [[0, 0, 10, 10]], "dt_scores": [0.9]}]
    assert jaccard_index(one)["JI"] == pytest.approx(1.0, abs=1e-5)
    assert jaccard_index(one + [{"gt_boxes": [], "dt_boxes": [], "dt_scores": []}])["JI"] == pytest.approx(0.5, abs=1e-5)
    assert JI_THRESHOLDS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def test_crowdhuman_ap_skips_images_without_annotations():
    # an image with neither person nor ignore region: CrowdHuman's compare_caltech returns nothing for it,
    # so its detections are not false positives there (COCO's AP50 counts them)
    images = [{"gt_boxes": [[0, 0, 10, 10]], "dt_boxes": [[0, 0, 10, 10]], "dt_scores": [0.5]},
              {"gt_boxes": [], "dt_boxes": [[0, 0, 10, 10]], "dt_scores": [0.9]}]
    m = detection_metrics(images)
    assert crowdhuman_ap(np.array([True, False]), np.array([False, True]), 1) == pytest.approx(0.0)
    assert m["AP"] == pytest.approx(0.0)  # a single point: no area under CrowdHuman's trapezoid
    assert m["AP50"] < 1.0 and m["MR-2"] == pytest.approx(0.0, abs=1e-4)


def test_pckh_mpii_mean_leaves_out_pelvis_and_thorax():
    gt = np.zeros((1, 16, 2))
    pred = np.zeros((1, 16, 2))
    pred[0, [6, 7, 0], 0] = 100.0  # pelvis, thorax and the right ankle wrong
    out = pckh(pred, gt, np.ones((1, 16), bool), np.array([10.0]))
    assert out["PCKh"] == pytest.approx(13 / 14) and out["PCKh_all"] == pytest.approx(13 / 16)
    assert MPII_EXCLUDED == (6, 7)
    assert pckh(pred, gt, np.ones((1, 16), bool), np.array([10.0]), excluded=())["PCKh"] == pytest.approx(13 / 16)


def test_reid_eval_path_market_protocol_by_hand():
    """Known features through evaluate_reid_queries: L2-normalised, query/gallery split by ``split``, the
    same-identity same-camera gallery image left out (Market-1501)."""
    from evaluation.human_evals import evaluate_reid_queries

    def unit(deg):
        r = math.radians(deg)
        return [math.cos(r), math.sin(r)]

    # rows: (angle, pid, camid, split 1 = query / 2 = gallery)
    rows = [(0, 1, 0, 1), (90, 2, 0, 1),  # queries q1, q2
            (10, 3, 1, 2), (20, 1, 1, 2), (0, 1, 0, 2), (90, 2, 1, 2), (180, 4, 1, 2)]  # g4 (wrong), g1,
    # g3 (junk: q1's camera), g2, g5 (far)
    feats = torch.tensor([unit(a) for a, *_ in rows]) * 7.0  # the scale must not matter
    out = {"feature": feats}
    batch = {"image": torch.zeros(len(rows), 3, 8, 8),
             "targets": {"pid": torch.tensor([r[1] for r in rows]), "camid": torch.tensor([r[2] for r in rows]),
                         "split": torch.tensor([r[3] for r in rows])}}
    res = evaluate_reid_queries(_Scripted([out]), [batch])
    # q1: g3 is junk, g4 (10 deg) ranks before g1 (20 deg): AP 1/2, rank-1 miss; q2: g2 first, AP 1
    assert res["rank1"] == pytest.approx(0.5) and res["rank5"] == pytest.approx(1.0)
    assert res["mAP"] == pytest.approx(0.75)
    assert (res["queries"], res["gallery"]) == (2, 5)


def test_pose_flip_test_mirrors_back_and_swaps_joints():
    """evaluate_pose's flip test: the direct prediction says nothing (zero maps), the mirrored crop's prediction
    is exact for the mirrored joints (left/right swapped). Averaged after flip_back, every joint lands on its
    own ground truth: AP 1; without the flip test, AP ~0; without the swap the two side joints trade places."""
    from evaluation.human_evals import evaluate_pose, flip_back
    from foundation.losses.unihcp import heatmap_peaks, heatmap_targets

    size, pairs = 64, [[1, 2]]
    kps = torch.tensor([[[30.0, 12.0, 2], [20.0, 28.0, 2], [45.0, 32.0, 2]],
                        [[33.0, 12.0, 2], [14.0, 40.0, 2], [50.0, 44.0, 2]]])  # nose, left, right (input px)
    mirrored = kps.clone()
    mirrored[..., 0] = size - 1 - kps[..., 0]
    mirrored = mirrored[:, [0, 2, 1]]  # the mirrored image's "left" joint is the original right one
    maps, _ = heatmap_targets(kps, (16, 16), 4.0, 1.5)
    mirrored_maps, _ = heatmap_targets(mirrored, (16, 16), 4.0, 1.5)
    back, _ = heatmap_peaks(flip_back(mirrored_maps, pairs, 4.0), 4.0)
    # input pixels: the same peaks up to the decoder's quarter-pixel shift (the flipped map is resampled by 0.75 px)
    assert torch.allclose(back, heatmap_peaks(maps, 4.0)[0], atol=2.0)

    images = torch.rand(2, 3, size, size)

    class Scripted(torch.nn.Module):
        keypoint_flip_pairs = pairs

        def forward(self, x):
            is_mirror = torch.equal(x, images.flip(-1))
            return [{"maps": mirrored_maps if is_mirror else torch.zeros_like(maps), "logits": torch.full((2, 3), 5.0)}]

    boxes = torch.tensor([[10.0, 5.0, 40.0, 35.0], [10.0, 5.0, 44.0, 45.0]])
    targets = {"keypoints": kps, "src_keypoints": kps, "box": boxes, "area": boxes[:, 2] * boxes[:, 3],
               "offset": torch.zeros(2, 2), "scale": torch.ones(2)}
    batch = {"image": images, "targets": targets}
    res = evaluate_pose(Scripted(), [batch])
    assert res["flip_test"] == 1.0 and res["AP"] == pytest.approx(1.0) and res["OKS"] > 0.95
    off = evaluate_pose(Scripted(), [batch], flip_test=False)
    assert off["flip_test"] == 0.0 and off["AP"] < 0.1
    Scripted.keypoint_flip_pairs = []  # mirrored back but not swapped: the side joints trade places
    assert evaluate_pose(Scripted(), [batch])["OKS"] < 0.9
