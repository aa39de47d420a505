"""Training-time and CLI evaluations of UniHCP's five tasks with the human-centric metrics
(evaluation/human/): ``fn(model, loader, device, all_reduce, max_batches) -> dict[str, float]``.

``model`` is a task's ``UniHCPNet``; ``loader`` yields ``data.human`` batches (evaluation transform:
letterboxed, no augmentation), whose ``scale``/``offset`` map predictions back to source pixels.
Metrics are computed on rank 0's gather of every rank's predictions when several ranks evaluate
(per-sample results are gathered as objects; sums through ``all_reduce``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from evaluation.human import attribute_metrics, detection_metrics, evaluate_reid, keypoint_ap, oks, pairwise_distance
from evaluation.human.parsing import ParsingMeter, parsing_metrics
from evaluation.human.pose import crops_to_coco
from foundation.losses.unihcp import heatmap_peaks, parsing_prediction


def _gather(obj):
    """Every rank's ``obj`` (a list) joined, when a process group is up; else ``obj``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return [x for part in out for x in part]


def _batches(model: nn.Module, loader: Iterable[dict], device, max_batches: int | None):
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images = batch["image"].to(device, non_blocking=True)
        yield model(images)[-1], batch["targets"], tuple(images.shape[-2:])


def flip_back(maps: Tensor, pairs: list, stride: float) -> Tensor:
    """Heatmaps (B, K, h, w) predicted on the mirrored input → the original input's: left/right joints
    swapped by ``pairs`` and mirrored about the image's centre (not the map's): the value at map column u
    is the mirrored map's at w - 1/stride - u (bilinear; a joint at input pixel x sits at x / stride)."""
    b, k, h, w = maps.shape
    perm = list(range(k))
    for a, c in pairs:
        perm[a], perm[c] = c, a
    maps = maps[:, perm]
    src = w - 1.0 / stride - torch.arange(w, dtype=maps.dtype)
    gx = (2 * src / max(w - 1, 1) - 1).expand(h, w)
    gy = (2 * torch.arange(h, dtype=maps.dtype) / max(h - 1, 1) - 1)[:, None].expand(h, w)
    grid = torch.stack([gx, gy], -1)[None].expand(b, h, w, 2).to(maps.device)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _to_source(xy: Tensor, targets: dict) -> Tensor:
    """Input pixels (B, N, 2) → source pixels through each sample's letterbox map."""
    return (xy - targets["offset"][:, None].to(xy)) / targets["scale"][:, None, None].to(xy)


def _keypoints_to_source(xy: Tensor, targets: dict) -> Tensor:
    """Keypoints (B, K, 2) at input pixel centres → source pixel centres: through the inverse of each top-down
    crop's affine (``data.pose_crop: top_down``), else through the letterbox's scale and offset."""
    if "affine" in targets:
        m = targets["affine"].to(torch.float64)  # (B, 2, 3): source → input
        src = torch.linalg.solve(m[:, :, :2], (xy.to(torch.float64) - m[:, None, :, 2]).transpose(1, 2))
        return src.transpose(1, 2).to(xy.dtype)
    return _to_source(xy + 0.5, targets) - 0.5  # the letterbox's map is written for pixel edges


@torch.no_grad()
def evaluate_pose(model: nn.Module, loader: Iterable[dict], device="cpu",
                  all_reduce: Callable[[Tensor], Tensor] = lambda t: t, max_batches: int | None = None,
                  flip_test: bool = True) -> dict:
    """COCO keypoint AP/AR (OKS, top-down on the crops) from heatmap peaks; ``vis_acc`` of the visibility logits.
    ``flip_test`` (as COCO results are reported, and the release's tester): the heatmaps and visibility are
    averaged with those of the mirrored crop (``flip_back``), when the model knows its left/right joint
    pairs (``keypoint_flip_pairs``, set by the pose task)."""
    was = model.training
    model.eval()
    pairs = getattr(model, "keypoint_flip_pairs", None) if flip_test else None
    labels, results, vis_hits, vis_n = [], [], 0, 0
    for i_batch, batch in enumerate(loader):
        if max_batches is not None and i_batch >= max_batches:
            break
        images = batch["image"].to(device, non_blocking=True)
        out, t, size = model(images)[-1], batch["targets"], images.shape[-1]  # width: one stride for both axes
        maps = out["maps"].float().cpu()
        vis = out["logits"].float().cpu().sigmoid()
        if pairs is not None:
            mirrored = model(images.flip(-1))[-1]
            maps = (maps + flip_back(mirrored["maps"].float().cpu(), pairs, size / maps.shape[-1])) / 2
            perm = list(range(vis.shape[1]))
            for a, c in pairs:
                perm[a], perm[c] = c, a
            vis = (vis + mirrored["logits"].float().cpu().sigmoid()[:, perm]) / 2
        xy, val = heatmap_peaks(maps, size / maps.shape[-1])
        src = _keypoints_to_source(xy, t)  # the decoder put keypoints on pixel centres
        for i in range(len(maps)):
            labels.append({"keypoints": t["src_keypoints"][i].tolist(), "box": t["box"][i].tolist(),
                           "area": float(t["area"][i])})
            kps = torch.cat([src[i], val[i, :, None].clamp(min=0)], 1)
            results.append({"keypoints": kps.flatten().tolist(), "score": float(val[i].clamp(min=0).mean() * vis[i].mean())})
        known = t["keypoints"][..., 2] > 0
        vis_hits += int(((vis > 0.5) == known).sum())
        vis_n += known.numel()
    labels, results = _gather(labels), _gather(results)
    model.train(was)
    if not labels:
        return {"AP": 0.0, "samples": 0}
    gt = crops_to_coco(labels)
    for i, r in enumerate(results):
        r.update(image_id=i, category_id=1)
    k = len(labels[0]["keypoints"])
    sigmas = None if k == 17 else [0.05] * k
    metrics = keypoint_ap(gt, results, sigmas)
    # mean OKS of each crop's prediction with its person: moves before AP does (AP needs OKS >= 0.5)
    mean_oks = float(np.mean([oks(np.asarray(r["keypoints"]).reshape(-1, 3)[:, :2], np.asarray(lab["keypoints"]),
                                  lab["area"], sigmas) for r, lab in zip(results, labels)]))
    return {**metrics, "OKS": mean_oks, "vis_acc": vis_hits / max(vis_n, 1), "flip_test": float(pairs is not None),
            "samples": len(labels)}


@torch.no_grad()
def to_source_maps(maps: Tensor, scale: float, offset: Tensor, src_hw: tuple[int, int],
                   size: int | tuple[int, int]) -> Tensor:
    """Maps (C, h, w) over a ``size``-square (or (height, width)) letterboxed input → (C, H, W) at the source
    resolution: each source pixel centre read (bilinear) at its place in the input (input = scale * (x + 0.5)
    + offset - 0.5)."""
    hh, ww = src_hw
    in_h, in_w = (size, size) if isinstance(size, int) else size
    xs = scale * (torch.arange(ww, dtype=torch.float32) + 0.5) + float(offset[0]) - 0.5
    ys = scale * (torch.arange(hh, dtype=torch.float32) + 0.5) + float(offset[1]) - 0.5
    gx = (2 * (xs + 0.5) / in_w - 1)[None, :].expand(hh, ww)  # align_corners=False over the input's extent
    gy = (2 * (ys + 0.5) / in_h - 1)[:, None].expand(hh, ww)
    grid = torch.stack([gx, gy], -1)[None].to(maps)
    return F.grid_sample(maps[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


@torch.no_grad()
def evaluate_parsing(model: nn.Module, loader: Iterable[dict], device="cpu",
                     all_reduce: Callable[[Tensor], Tensor] = lambda t: t, max_batches: int | None = None) -> dict:
    """mIoU, pixel accuracy, mean class accuracy at the original resolution (``src_label_map``: the mask
    logits read at each source pixel, as LIP / CIHP are scored); on the letterboxed maps (padding ignored)
    when the batches have no source maps (``original_resolution`` says which)."""
    was = model.training
    model.eval()
    meter = None
    n, original = 0, True
    for out, t, size in _batches(model, loader, device, max_batches):
        if meter is None:
            meter = ParsingMeter(out["maps"].shape[1])
        src_maps = t.get("src_label_map")
        original = original and src_maps is not None
        if src_maps is None:
            maps = F.interpolate(out["maps"].float(), size=size, mode="bilinear", align_corners=False)
            pred = parsing_prediction(out["logits"].float(), maps).cpu().numpy()
            pairs = zip(pred, t["label_map"].numpy())
        else:
            pairs = []
            for i, g in enumerate(src_maps):
                maps = to_source_maps(out["maps"][i].float().cpu(), float(t["scale"][i]), t["offset"][i],
                                      tuple(g.shape), size)
                pred = parsing_prediction(out["logits"][i : i + 1].float().cpu(), maps[None])[0].numpy()
                pairs.append((pred, np.asarray(g, np.int64)))
        for p, g in pairs:
            meter.update(p, g)
            n += 1
    model.train(was)
    if meter is None:
        return {"mIoU": 0.0, "samples": 0}
    conf = all_reduce(torch.from_numpy(meter.conf).to(device)).cpu().numpy()
    n = int(all_reduce(torch.tensor(float(n), device=device)).item())
    res = parsing_metrics(conf)
    return {k: v for k, v in res.items() if isinstance(v, (int, float))} | {
        "samples": n, "original_resolution": float(original)}


@torch.no_grad()
def evaluate_attributes(model: nn.Module, loader: Iterable[dict], device="cpu",
                        all_reduce: Callable[[Tensor], Tensor] = lambda t: t, max_batches: int | None = None) -> dict:
    """mA and instance accuracy / precision / recall / F1 (logits > 0 = present)."""
    was = model.training
    model.eval()
    preds, gts = [], []
    for out, t, _ in _batches(model, loader, device, max_batches):
        preds.extend((out["logits"].float().cpu() > 0).numpy().astype(np.int8).tolist())
        gts.extend(t["attributes"].numpy().tolist())
    preds, gts = _gather(preds), _gather(gts)
    model.train(was)
    if not preds:
        return {"mA": 0.0, "samples": 0}
    res = attribute_metrics(np.asarray(preds, np.int8), np.asarray(gts))
    return {k: float(v) for k, v in res.items() if isinstance(v, (int, float, np.floating))} | {"samples": len(preds)}


@torch.no_grad()
def evaluate_reid_queries(model: nn.Module, loader: Iterable[dict], device="cpu",
                          all_reduce: Callable[[Tensor], Tensor] = lambda t: t, max_batches: int | None = None) -> dict:
    """CMC rank-1/5/10 and mAP (Market-1501 protocol) of the L2-normalised pre-BN features; query and
    gallery are the samples whose ``split`` says so (a ReID shard set's ``val`` spec reads both)."""
    was = model.training
    model.eval()
    rows = []
    for out, t, _ in _batches(model, loader, device, max_batches):
        feats = F.normalize(out["feature"].float(), dim=1).cpu().numpy()
        for f, pid, cam, split in zip(feats, t["pid"].tolist(), t["camid"].tolist(), t["split"].tolist()):
            rows.append((f, pid, cam, split))
    rows = _gather(rows)
    model.train(was)
    q = [r for r in rows if r[3] == 1]
    g = [r for r in rows if r[3] == 2]
    if not q or not g:
        return {"rank1": 0.0, "mAP": 0.0, "queries": len(q), "gallery": len(g)}
    dist = pairwise_distance(np.stack([r[0] for r in q]), np.stack([r[0] for r in g]))
    res = evaluate_reid(dist, np.array([r[1] for r in q]), np.array([r[1] for r in g]), np.array([r[2] for r in q]),
                        np.array([r[2] for r in g]))
    return {k: float(v) for k, v in res.items() if k in ("rank1", "rank5", "rank10", "mAP", "valid_queries")} | {
        "queries": len(q), "gallery": len(g)}


def _detection_batches(model: nn.Module, loader: Iterable[dict], device, max_batches: int | None):
    """``(last layer's output, targets, (B, 2) input size of each image)``. With per-image sizes (``data.resize``:
    the ``input_hw`` target) a batch padded to its largest image runs one image at a time at its own size, so
    the boxes do not depend on the batch an image shares (the release evaluates with batch 1)."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images, t = batch["image"], batch["targets"]
        own = t.get("input_hw")
        if own is None or bool((own == torch.tensor(images.shape[-2:])).all()):
            images = images.to(device, non_blocking=True)
            yield model(images)[-1], t, torch.tensor(images.shape[-2:]).expand(len(images), 2)
            continue
        outs = [model(images[j:j + 1, :, :h, :w].to(device, non_blocking=True))[-1]
                for j, (h, w) in enumerate(own.tolist())]
        yield {k: torch.cat([o[k] for o in outs]) for k in ("logits", "boxes")}, t, own


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: Iterable[dict], device="cpu",
                       all_reduce: Callable[[Tensor], Tensor] = lambda t: t, max_batches: int | None = None,
                       score_threshold: float = 0.05) -> dict:
    """CrowdHuman's AP, MR-2 and JI (and COCO's AP50) of every box scoring ≥ ``score_threshold`` (the
    release's ``pos_thr``; no top-k: crowded images keep their recall), in source pixels, clipped to the
    image as CrowdHuman's evaluator clips them. Per-image sizes (``data.resize``): each image at its own size."""
    from torchvision.ops import box_convert

    was = model.training
    model.eval()
    images = []
    for out, t, size in _detection_batches(model, loader, device, max_batches):
        scores = out["logits"].float().sigmoid().cpu()
        scale = size.flip(1).repeat(1, 2).float()[:, None]  # (B, 1, 4) [w, h, w, h]: [0, 1] per axis -> pixels
        boxes = box_convert(out["boxes"].float().cpu() * scale, "cxcywh", "xyxy")  # input pixels
        src = _to_source(boxes.view(len(boxes), -1, 2), t).view_as(boxes)
        for i in range(len(scores)):
            top = torch.nonzero(scores[i] >= score_threshold).flatten()
            h, w = (float(v) for v in t["size"][i])
            b = src[i, top]
            b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
            images.append({"dt_boxes": torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1).numpy(),
                           "dt_scores": scores[i, top].numpy(), "gt_boxes": np.asarray(t["src_boxes"][i]).reshape(-1, 4),
                           "ignore": np.asarray(t["src_ignore"][i]).reshape(-1, 4)})
    images = _gather(images)
    model.train(was)
    if not images:
        return {"AP": 0.0, "samples": 0}
    res = detection_metrics(images)
    return {k: float(v) for k, v in res.items() if isinstance(v, (int, float))} | {"samples": len(images)}


__all__ = ["evaluate_attributes", "evaluate_detection", "flip_back", "evaluate_parsing", "evaluate_pose", "evaluate_reid_queries"]
