"""UniHCP's scene pipeline as one graph (issue 24, items 3 and 7): the release's top-down crop geometry; the
``UniHCPScene`` module (detection → K fixed person boxes → per-task crops → pose / parsing / attributes /
ReID) exported to ONNX and run in onnxruntime equals PyTorch; ``foundation predict --mode scene`` and the graph
``foundation export --format unihcp_scene`` writes give the same people on the same image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from foundation.models.unihcp_scene import (BOX_PADDING, IMAGENET_MEAN, IMAGENET_STD, NormalisedTask, UniHCPScene,
                                            crop_boxes, expand_boxes, letterbox_geometry, sample_region)
from test_unihcp_deploy import _net  # the same random tiny networks

# each task at its own input, the encoders' position grids resampled to it (as the release's are)
SIZES = {"detection": (32, 48), "pose": (32, 24), "parsing": (32, 32), "attributes": (32, 16), "reid": (32, 16)}
SCENE = (90, 160)  # (H, W)
# FP32 onnxruntime vs PyTorch: scene-pixel outputs (boxes, keypoints ~100 px) relative, the rest ~1 absolute;
# measured: boxes / keypoints 1.5e-5 px, parsing probabilities 2.4e-6, attribute logits 3.3e-6, ReID 1.3e-6
RTOL, ATOL = 1e-5, 1e-4


def _tasks() -> dict:
    """``{name: (UniHCPTask, DataConfig)}`` of the five kinds on random tiny networks (no checkpoint needed)."""
    from foundation.config import DataConfig, UniHCPConfig
    from foundation.data.humans import COCO_KEYPOINTS
    from foundation.tasks.unihcp import (UniHCPAttributes, UniHCPDetection, UniHCPParsing, UniHCPPose,
                                         UniHCPReID)

    metas = {"pose": {"keypoint_names": list(COCO_KEYPOINTS), "skeleton": [[0, 1], [5, 6]]},
             "parsing": {"class_names": [f"c{i}" for i in range(5)]},
             "attributes": {"attribute_names": [f"a{i}" for i in range(7)]}, "reid": {}, "detection": {}}
    classes = {"pose": UniHCPPose, "parsing": UniHCPParsing, "attributes": UniHCPAttributes, "reid": UniHCPReID,
               "detection": UniHCPDetection}
    out = {}
    for i, (kind, cls) in enumerate(classes.items()):
        task = cls(_net(kind, seed=i), UniHCPConfig(), {"kind": kind, **metas[kind]}).eval()
        out[kind] = (task, DataConfig(human=True, image_size=list(SIZES[kind])))
    return out


def _scene(max_people: int = 20, shared: bool = False) -> UniHCPScene:
    """Five tasks on their own random networks, or (``shared``) on one encoder and decoder, as a checkpoint's are."""
    from foundation.models.unihcp_export import UniHCPDeploy

    def wrap(kind: str, seed: int) -> NormalisedTask:
        return NormalisedTask(UniHCPDeploy(_net(kind, 0 if shared else seed), SIZES[kind]), IMAGENET_MEAN,
                              IMAGENET_STD)

    people = {k: wrap(k, i) for i, k in enumerate(("pose", "parsing", "attributes", "reid"))}
    return UniHCPScene(wrap("detection", 4), people, max_people=max_people)


def test_crop_boxes_follow_the_released_top_down_protocol():
    # _box2cs: centre kept, the short side grown to the input aspect (w / h), then x1.25
    box = torch.tensor([[10.0, 20.0, 50.0, 100.0]])  # 40 x 80, centre (30, 60)
    for aspect, (w, h) in ((0.75, (60, 80)), (2.0, (160, 80)), (0.5, (40, 80))):
        x0, y0, x1, y1 = expand_boxes(box, aspect)[0].tolist()
        assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((30, 60))
        assert (x1 - x0, y1 - y0) == pytest.approx((w * BOX_PADDING, h * BOX_PADDING))
    # the UDP crop: the box's ends on the output's first and last pixel centres (an integer box of w - 1 steps is
    # an exact pixel copy), a bilinear blend for a half-pixel shift, black outside the image
    image = torch.rand(1, 3, 12, 16)
    crop = crop_boxes(image, torch.tensor([[2.0, 3.0, 8.0, 7.0]]), (5, 7))
    torch.testing.assert_close(crop[0], image[0, :, 3:8, 2:9])
    half = crop_boxes(image, torch.tensor([[2.5, 3.0, 8.5, 7.0]]), (5, 7))
    torch.testing.assert_close(half[0], (image[0, :, 3:8, 2:9] + image[0, :, 3:8, 3:10]) / 2)
    outside = crop_boxes(image, torch.tensor([[-20.0, -20.0, -10.0, -10.0]]), (4, 4))
    assert (outside == 0).all()
    # a region in continuous coordinates (the letterbox's): the whole image at its own size is the image
    torch.testing.assert_close(sample_region(image, torch.tensor([[0.0, 0.0, 16.0, 12.0]]), (12, 16))[0], image[0])
    # the letterbox geometry is evaluation's (foundation.data.human_transforms.letterbox_image)
    from foundation.config import DataConfig
    from foundation.data.human_transforms import letterbox_image

    for size in ((32, 48), (32, 32)):
        _, s, offset = letterbox_image(Image.new("RGB", (160, 90)), DataConfig(human=True, image_size=list(size)))
        assert letterbox_geometry(160, 90, size) == pytest.approx((s, *offset))


def test_scene_crop_is_the_training_pose_crop():
    """The scene's pose crop of a detected box is the crop the paper recipe trains and evaluates pose on
    (``data.pose_crop: top_down``: ``top_down_box`` + UDP's ``top_down_matrix`` through cv2.warpAffine), and its
    keypoint map is that matrix's inverse."""
    import cv2

    from foundation.data.human_transforms import top_down_box, top_down_matrix
    from foundation.models.unihcp_scene import crop_frame

    yy, xx = np.mgrid[0:90, 0:160].astype(np.float32)
    image = np.stack([np.sin(xx / 7) * np.cos(yy / 5), xx / 160, (yy / 90) ** 2], -1).astype(np.float32)
    out_hw = (32, 24)
    for x, y, w, h in ((40.0, 10.0, 30.0, 70.0), (100.5, 30.25, 50.0, 20.0), (-5.0, 50.0, 30.0, 60.0)):
        cx, cy, bw, bh = top_down_box([x, y, w, h], out_hw[1] / out_hw[0])
        m = top_down_matrix((cx, cy), (bw, bh), out_hw)
        ref = cv2.warpAffine(image, m, (out_hw[1], out_hw[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=0)
        box = expand_boxes(torch.tensor([[x, y, x + w, y + h]]), out_hw[1] / out_hw[0])
        assert box[0].tolist() == pytest.approx([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], abs=1e-4)
        ours = crop_boxes(torch.from_numpy(image).permute(2, 0, 1)[None], box, out_hw)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-4)  # measured: 2e-6, the edges and the outside included
        centre, step = crop_frame(box, out_hw)
        p = np.array([[0.0, 0.0], [23.0, 31.0], [7.5, 12.25]])  # input pixels -> scene, against the inverse
        scene = centre.numpy() + (p - [(out_hw[1] - 1) / 2, (out_hw[0] - 1) / 2]) * step.numpy()
        inv = cv2.invertAffineTransform(m)
        np.testing.assert_allclose(scene, p @ inv[:, :2].T + inv[:, 2], atol=1e-4)


def test_scene_graph_in_onnxruntime_equals_pytorch(tmp_path):
    from foundation.models.unihcp_scene import export_scene_onnx
    from foundation.quant.onnx_export import ort_session

    scene = _scene()
    image = torch.rand(1, 3, *SCENE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a threshold between the 2nd and 3rd best scores: some rows valid, some not
        scene.score_threshold = float(scene.detect(image)[1][1:3].mean())
    path = export_scene_onnx(scene, tmp_path / "scene.onnx", SCENE)
    with torch.no_grad():
        ref = scene(image)
    got = ort_session(path).run(None, {"image": image.numpy()})
    names = scene.output_names()
    assert names[:3] == ["boxes", "scores", "valid"] and "pose.keypoints" in names and "reid.feature" in names
    k = scene.max_people
    assert k == 16  # min(max_people, the detector's queries): a fixed count
    for name, a, b in zip(names, ref, got):
        assert tuple(a.shape) == b.shape and a.shape[0] == k, name
        if a.dtype == torch.bool:
            assert np.array_equal(a.numpy(), b), name
        else:
            torch.testing.assert_close(torch.from_numpy(b), a, rtol=RTOL, atol=ATOL, msg=name)
    boxes, scores, valid = ref[:3]
    assert valid.any() and not valid.all()  # the threshold flags rows; nothing is removed
    assert int(valid.sum()) == 2 and (scores[valid] >= scene.score_threshold).all() and (scores[:-1] >= scores[1:])[valid[:-1]].all()
    # every person's skeleton lies in its own pose crop (scene pixels), whose centre is its box's
    crop, kps = ref[names.index("pose.box")], ref[names.index("pose.keypoints")]
    torch.testing.assert_close((crop[:, :2] + crop[:, 2:]) / 2, (boxes[:, :2] + boxes[:, 2:]) / 2)
    margin = (crop[:, 2] - crop[:, 0])[:, None] / 23 * 2  # a heatmap cell (stride 2): the peak's quarter-pixel shift
    assert (kps[..., 0] >= crop[:, None, 0] - margin).all() and (kps[..., 0] <= crop[:, None, 2] + margin).all()
    torch.testing.assert_close(ref[names.index("reid.feature")].norm(dim=1), torch.ones(k))


def test_scene_graph_stores_the_shared_network_once(tmp_path):
    """Each task's deploy copies the shared encoder and decoder; the exporter keeps one of each equal
    initializer (torch.onnx deduplicates them), so a ViT-B scene holds its encoder once, not five times."""
    import onnx
    from onnx import numpy_helper

    from foundation.models.unihcp_scene import export_scene_onnx
    from foundation.quant.onnx_export import ort_session

    scene = _scene(shared=True)
    path = export_scene_onnx(scene, tmp_path / "scene.onnx", SCENE)
    inits = onnx.load(path).graph.initializer
    contents = [(i.data_type, tuple(i.dims), numpy_helper.to_array(i).tobytes()) for i in inits]
    assert len(set(contents)) == len(contents)
    copies = sum(p.numel() for p in scene.parameters())
    stored = sum(numpy_helper.to_array(i).size for i in inits)
    assert stored < 0.5 * copies, (stored, copies)
    image = torch.rand(1, 3, *SCENE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = scene(image)
    for name, a, b in zip(scene.output_names(), ref, ort_session(path).run(None, {"image": image.numpy()})):
        if a.dtype != torch.bool:
            torch.testing.assert_close(torch.from_numpy(b), a, rtol=RTOL, atol=ATOL, msg=name)


def test_predict_scene_cli_equals_the_exported_graph(tmp_path, monkeypatch, capsys):
    """The same image through ``foundation predict --mode scene`` and through ``scene.onnx`` (written by
    ``foundation export --format unihcp_scene``) in onnxruntime: the same people, within the graph's tolerance."""
    import foundation.predict as predict
    from foundation.cli import main as cli
    from foundation.quant.onnx_export import ort_session

    tasks = _tasks()
    monkeypatch.setattr(predict, "unihcp_tasks", lambda checkpoint, device="cpu": (tasks, None))
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (*SCENE, 3), dtype=np.uint8))
    picture.save(tmp_path / "scene.png")
    graph = tmp_path / "graph"
    assert cli(["export", "--checkpoint", "ckpt", "--format", "unihcp_scene", "--out", str(graph), "--scene-size",
                str(SCENE[0]), str(SCENE[1]), "--score-threshold", "0.3"]) == 0
    info = json.loads((graph / "scene.json").read_text())
    assert info["input"]["shape"] == [1, 3, *SCENE] and info["tasks"]["pose"]["output"] == "pose.keypoints"
    assert max(info["onnxruntime_max_abs_diff"].values()) < 1e-3
    assert sorted(p.name for p in graph.iterdir()) == ["scene.json", "scene.onnx"]  # no pickle, nothing else
    capsys.readouterr()
    assert cli(["predict", "--checkpoint", "ckpt", "--image", str(tmp_path / "scene.png"), "--mode", "scene",
                "--out", str(tmp_path / "pred")]) == 0
    summary = json.loads((tmp_path / "pred" / "prediction.json").read_text())
    people = summary["people"]

    x = predict.image_tensor(Image.open(tmp_path / "scene.png"))
    outs = dict(zip(info["outputs"], ort_session(graph / "scene.onnx").run(None, {"image": x.numpy()})))
    valid = outs["valid"]
    assert len(people) == int(valid.sum()) > 1
    np.testing.assert_allclose([p["box"] for p in people], outs["boxes"][valid], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose([p["score"] for p in people], outs["scores"][valid], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose([p["keypoints"] for p in people], outs["pose.keypoints"][valid], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose([p["crops"]["parsing"] for p in people], outs["parsing.box"][valid], rtol=RTOL,
                               atol=ATOL)
    probs = 1 / (1 + np.exp(-outs["attributes.logits"][valid]))
    np.testing.assert_allclose([list(p["attributes"].values()) for p in people], probs, rtol=RTOL, atol=ATOL)
    emb = np.load(tmp_path / "pred" / "reid_embeddings.npy", allow_pickle=False)
    np.testing.assert_allclose(emb[[p["reid_embedding_row"] for p in people]], outs["reid.feature"][valid],
                               rtol=RTOL, atol=ATOL)
    labels = outs["parsing.probs"][valid].argmax(1)
    assert [p["parsing_classes_present"] for p in people] == [sorted(set(np.unique(lab).tolist()) - {0})
                                                              for lab in labels]
    # a checkpoint without a detection task cannot make a scene graph: one line, exit 2
    monkeypatch.setattr(predict, "unihcp_tasks", lambda checkpoint, device="cpu": (
        {"pose": tasks["pose"]}, None))
    assert cli(["export", "--checkpoint", "ckpt", "--format", "unihcp_scene", "--out", str(tmp_path / "g2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a detection task" in err[0]
