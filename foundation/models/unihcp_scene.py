"""UniHCP's scene pipeline as one tensor module (and one ONNX graph): detection → top-down person crops →
pose / parsing / attributes / ReID per person, every output in the scene's pixels.

``UniHCPScene`` takes a scene image (1, 3, H, W), RGB in [0, 1] (``ToTensor``'s range; each task normalises
with its own mean / std inside), and returns a tuple of fixed-shape tensors (``output_names()`` order):

- ``boxes`` (K, 4) x0, y0, x1, y1 in scene pixels, ``scores`` (K,), ``valid`` (K,) bool: the detector's K best
  boxes after NMS (IoU 0.5), best first. K = ``max_people`` (or the detector's query count when smaller) is
  fixed, so a box that NMS suppressed or that scores under ``score_threshold`` is flagged ``valid = False``
  rather than removed; rows after the first invalid one are invalid too.
- per person task ``name``: ``name.box`` (K, 4) the crop box that task saw; then pose ``name.keypoints`` (K, J, 3)
  (x, y in scene pixels, visibility), parsing ``name.probs`` (K, C, h, w) (sigmoid(class) · sigmoid(mask) at
  the task's input size over its crop box; argmax over C is the label), attributes ``name.logits`` (K, A),
  ReID ``name.feature`` (K, D), L2-normalised.

The crop protocol is the released code's top-down one (``_xywh2cs`` of its COCO pose data, ``use_udp: True``):
the box's centre is kept, its shorter side grown so that w / h equals the task's input aspect, both sides
× ``BOX_PADDING`` (1.25), and the crop is UDP's warp (the box's centre at the input's centre, its width over the
input's w − 1 pixel steps), sampled bilinearly by ``torchvision.ops.roi_align`` (``aligned=True``, one sample
per output pixel: the affine warp's point sampling; black outside the image). Keypoints come back through the
warp's inverse. The detector's input is the scene letterboxed to its input size (``letterbox_image``'s scale
and offset) by the same sampling. ``foundation predict --mode
scene`` runs this module, so the CLI and the exported graph compute the same people.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from foundation.models.unihcp_export import UniHCPDeploy

BOX_PADDING = 1.25  # top-down crops: the box grown about its centre (the release's COCO pose _box2cs padding)
PERSON_KINDS = ("pose", "parsing", "attributes", "reid")
PERSON_OUTPUTS = {"pose": "keypoints", "parsing": "probs", "attributes": "logits", "reid": "feature"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def expand_boxes(boxes: Tensor, aspect: float, padding: float = BOX_PADDING) -> Tensor:
    """Boxes (K, 4) x0, y0, x1, y1 → the release's top-down crop boxes: centre kept, the shorter side grown so
    that width / height = ``aspect``, then both × ``padding`` (sides under one pixel count as one)."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    w, h = torch.maximum(w, h * aspect), torch.maximum(h, w / aspect)
    half = torch.stack([w, h], 1) * (padding / 2)
    return torch.cat([c - half, c + half], 1)


def sample_region(image: Tensor, regions: Tensor, size: tuple[int, int]) -> Tensor:
    """(1, 3, H, W) image → (K, 3, h, w): output pixel (i, j) is the bilinear sample at the centre of its cell of
    region k (x0, y0, x1, y1, continuous pixel coordinates: pixel i covers [i, i + 1)), 0 outside the image —
    ``roi_align(aligned=True)`` with one sample per output pixel, an affine warp's point sampling."""
    from torchvision.ops import roi_align

    rois = torch.cat([torch.zeros_like(regions[:, :1]), regions], 1)
    return roi_align(image, rois, size, spatial_scale=1.0, sampling_ratio=1, aligned=True)


def crop_boxes(image: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """The release's top-down crop (UDP, ``use_udp: True``): box k's centre at the output's centre, its sides
    spanning the output's first to last pixel centre (w − 1 steps), so output pixel j samples the scene at
    ``centre + (j − (w − 1) / 2) · step`` with ``step = box width / (w − 1)`` (pixel-index coordinates, as the
    release reads a box's numbers); bilinear, black outside the image. (1, 3, H, W), (K, 4) → (K, 3, h, w)."""
    h, w = size
    centre, step = crop_frame(boxes, size)
    half = step * torch.tensor([w / 2, h / 2], dtype=boxes.dtype, device=boxes.device)
    return sample_region(image, torch.cat([centre + 0.5 - half, centre + 0.5 + half], 1), size)


def crop_frame(boxes: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Centre (K, 2) and per-axis step (K, 2) of ``crop_boxes``' map: input pixel p ↦ centre + (p − (size − 1) / 2)
    · step in the scene (x, y; pixel-index coordinates)."""
    h, w = size
    steps = torch.tensor([max(w - 1, 1), max(h - 1, 1)], dtype=boxes.dtype, device=boxes.device)
    return (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / steps


def letterbox_geometry(width: int, height: int, size: tuple[int, int]) -> tuple[float, float, float]:
    """Scale and offset (s, ox, oy) of evaluation's letterbox of a (width, height) image into ``size`` (h, w):
    input = source × s + offset (``foundation.data.human_transforms.letterbox_image``)."""
    th, tw = size
    s = th / max(width, height) if th == tw else min(th / height, tw / width)
    return s, (tw - s * width) / 2, (th - s * height) / 2


def heatmap_peaks(maps: Tensor, stride: float) -> tuple[Tensor, Tensor]:
    """``foundation.losses.unihcp.heatmap_peaks`` with gathers an ONNX graph holds: the peak of each heatmap
    (B, J, h, w) with the quarter-pixel shift toward the higher neighbour → input pixels (B, J, 2), values."""
    h, w = maps.shape[-2:]
    flat = maps.flatten(2)
    val, idx = flat.max(-1)
    x, y = idx % w, idx // w

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat.gather(-1, (yy * w + xx)[..., None])[..., 0]

    dx = at(y, (x + 1).clamp(max=w - 1)) - at(y, (x - 1).clamp(min=0))
    dy = at((y + 1).clamp(max=h - 1), x) - at((y - 1).clamp(min=0), x)
    xy = torch.stack([x.float() + 0.25 * torch.sign(dx), y.float() + 0.25 * torch.sign(dy)], -1)
    return xy * stride, val


class NormalisedTask(nn.Module):
    """A task's deploy network on [0, 1] RGB input: ``(x - mean) / std`` first, as its data pipeline does."""

    def __init__(self, deploy: UniHCPDeploy, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.deploy = deploy
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32)[:, None, None])
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32)[:, None, None])

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.deploy((x - self.mean) / self.std)


class UniHCPScene(nn.Module):
    """Detection → top-down crops → person tasks, as fixed-shape tensors (see the module docstring).
    ``detector`` may be None (``people`` only: the boxes come from elsewhere)."""

    def __init__(self, detector: NormalisedTask | None, people: dict[str, NormalisedTask], max_people: int = 20,
                 score_threshold: float = 0.3, nms_iou: float = 0.5, padding: float = BOX_PADDING):
        super().__init__()
        bad = {n: t.deploy.kind for n, t in people.items() if t.deploy.kind not in PERSON_KINDS}
        if bad:
            raise ValueError(f"UniHCPScene: person tasks must be {PERSON_KINDS}; got {bad}")
        if detector is not None and detector.deploy.kind != "detection":
            raise ValueError(f"UniHCPScene: the detector is a {detector.deploy.kind!r} task")
        self.detector = detector
        self.people = nn.ModuleDict(people)
        self.score_threshold, self.nms_iou, self.padding = float(score_threshold), float(nms_iou), float(padding)
        self.max_people = max_people if detector is None else min(max_people, detector.deploy.num_queries)
        self.eval()

    def output_names(self) -> list[str]:
        names = ["boxes", "scores", "valid"]
        for name, task in self.people.items():
            names += [f"{name}.box", f"{name}.{PERSON_OUTPUTS[task.deploy.kind]}"]
        return names

    def detect(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(1, 3, H, W) → boxes (K, 4) in scene pixels, scores (K,), valid (K,): the K best after NMS."""
        from torchvision.ops import nms

        assert self.detector is not None, "UniHCPScene.detect: built without a detector"
        height, width = image.shape[-2:]
        th, tw = self.detector.deploy.image_size
        s, ox, oy = letterbox_geometry(int(width), int(height), (th, tw))
        # the letterbox is the crop of the source region the detector's input covers
        region = torch.tensor([[-ox / s, -oy / s, (tw - ox) / s, (th - oy) / s]], dtype=image.dtype, device=image.device)
        logits, cxcywh = self.detector(sample_region(image, region, (th, tw)))
        scores = logits[0].sigmoid()
        scale = torch.tensor([tw, th], dtype=image.dtype, device=image.device)
        centre, size = cxcywh[0, :, :2] * scale, cxcywh[0, :, 2:] * scale
        offset = torch.tensor([ox, oy], dtype=image.dtype, device=image.device)
        boxes = torch.cat([centre - size / 2 - offset, centre + size / 2 - offset], 1) / s
        keep = nms(boxes, scores, self.nms_iou)
        kept = torch.zeros_like(scores).scatter(0, keep, torch.ones_like(keep, dtype=scores.dtype)) > 0
        ranked = torch.where(kept, scores, scores - 2.0)  # suppressed boxes after every kept one
        top = ranked.topk(self.max_people).indices
        scores = scores[top]
        return boxes[top], scores, kept[top] & (scores >= self.score_threshold)

    def person_outputs(self, image: Tensor, boxes: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Each person task on each box's crop: ``{name: (crop boxes (K, 4), output)}`` (module docstring)."""
        out = {}
        for name, task in self.people.items():
            kind, (h, w) = task.deploy.kind, task.deploy.image_size
            crop = expand_boxes(boxes, w / h, self.padding)
            res = task(crop_boxes(image, crop, (h, w)))
            if kind == "pose":
                logits, maps = res
                xy, _ = heatmap_peaks(maps, w / maps.shape[-1])
                centre, step = crop_frame(crop, (h, w))
                middle = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=xy.dtype, device=xy.device)
                xy = centre[:, None] + (xy - middle) * step[:, None]  # input pixels -> scene pixels (UDP's inverse)
                value = torch.cat([xy, logits.sigmoid()[..., None]], -1)
            elif kind == "parsing":
                logits, maps = res
                maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)
                value = logits.sigmoid()[..., None, None] * maps.sigmoid()
            elif kind == "attributes":
                value = res[0]
            else:
                value = F.normalize(res[0], dim=1)
            out[name] = (crop, value)
        return out

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        boxes, scores, valid = self.detect(image)
        outs: list[Tensor] = [boxes, scores, valid]
        for crop, value in self.person_outputs(image, boxes).values():
            outs += [crop, value]
        return tuple(outs)


def scene_from_tasks(tasks: dict, max_people: int = 20, score_threshold: float = 0.3,
                     nms_iou: float = 0.5) -> UniHCPScene:
    """A ``UniHCPScene`` of ``{name: (UniHCPTask, DataConfig)}``: its detection task (at most one; none gives a
    module without ``detect``) and its person tasks, each at its DataConfig's input size and normalisation."""
    detector, people = None, {}
    for name, (task, data) in tasks.items():
        wrapped = NormalisedTask(UniHCPDeploy(task.model, data.image_size), data.mean or IMAGENET_MEAN,
                                 data.std or IMAGENET_STD)
        if task.kind == "detection":
            if detector is not None:
                raise ValueError("a scene graph takes one detection task; this checkpoint has several")
            detector = wrapped
        elif task.kind in PERSON_KINDS:
            people[name] = wrapped
    return UniHCPScene(detector, people, max_people, score_threshold, nms_iou)


ONNX_OPSET = 17  # RoiAlign's half-pixel (aligned=True) mode needs opset 16


@torch.no_grad()
def export_scene_onnx(scene: UniHCPScene, path, image_size: tuple[int, int]) -> str:
    """The scene module as one FP32 ONNX graph: input ``image`` (1, 3, H, W) at ``image_size`` (H, W), RGB in
    [0, 1]; outputs named ``scene.output_names()``, all of fixed shape."""
    import warnings
    from pathlib import Path

    if scene.detector is None:
        raise ValueError("a scene graph needs a detection task")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, *image_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(scene.eval(), (example,), str(path), input_names=["image"],
                          output_names=scene.output_names(), opset_version=ONNX_OPSET, dynamo=False)
    return str(path)


__all__ = ["BOX_PADDING", "NormalisedTask", "UniHCPScene", "crop_boxes", "crop_frame", "expand_boxes",
           "export_scene_onnx", "heatmap_peaks", "letterbox_geometry", "sample_region", "scene_from_tasks"]
