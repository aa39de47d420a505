"""Robustness and SysNoise of a UniHCP task, each task scored with its own metric.

``foundation eval robustness --checkpoint RUN --task pose --data SHARDS`` (and ``eval sysnoise``) come here
when the checkpoint is a UniHCP run. The network is the task's ``UniHCPDeploy`` (the tensor seam of
foundation/models/unihcp_export.py); the metric is the task's ``unihcp_*`` evaluation (evaluation/human_evals.py):
pose OKS AP (and mean OKS), parsing mIoU, attributes mA, ReID mAP / rank-1, detection CrowdHuman AP / MR-2.

Corruptions: the 19 ImageNet-C corruptions (evaluation/corruptions.py) applied to the *source* image,
before the letterbox, every sample with its own seed; the targets are the clean sample's (the corruptions
move no pixel's meaning). Adversarial: FGSM / PGD (L∞, pixel space, the normalisation inside the attacked
function) up the task's own training loss on the letterboxed input — ReID, whose evaluation images are
identities the classifier never saw, maximises the distance of the query's feature from its clean feature
(gallery images are not attacked).

SysNoise: decoder (the source re-encoded as JPEG at ``jpeg_quality``, decoded by PIL = reference, OpenCV,
torchvision), resize (the letterbox's resize by PIL / OpenCV / torch × interpolation, reference: PIL
bilinear; the affine warp of training is a separate, reported row ``pipeline``), colour (BGR mix-up, YUV
round trips) and precision (bf16 / fp16 inference). Each row: the metric and its change from the reference.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from foundation.data import DataError, local_spec

PRIMARY = {"pose": "AP", "parsing": "mIoU", "attributes": "mA", "reid": "mAP", "detection": "AP"}
SECONDARY = {"pose": "OKS", "parsing": "pixel_accuracy", "attributes": "F1", "reid": "rank1", "detection": "MR-2"}
EVAL_FN = {"pose": "evaluate_pose", "parsing": "evaluate_parsing", "attributes": "evaluate_attributes",
           "reid": "evaluate_reid_queries", "detection": "evaluate_detection"}


def score(model: nn.Module, kind: str, batches, device="cpu") -> dict:
    """The task's evaluation (evaluation/human_evals.py) of ``model`` (``images -> [dict]``) on ``batches``."""
    import evaluation.human_evals as he

    return getattr(he, EVAL_FN[kind])(model, batches, device)


def _headline(kind: str, metrics: dict) -> dict:
    keys = (PRIMARY[kind], SECONDARY[kind])
    return {k: float(metrics[k]) for k in keys if k in metrics and metrics[k] is not None}


# --------------------------------------------------------------------------------------------------
# samples: raw shards → (optionally changed) source image → the evaluation decoding → batches


def _image_key(sample: dict, cfg) -> str:
    for k in (k for k in cfg.image_key.split(";") if k):
        if k in sample:
            return k
    raise KeyError(f"no image (looked for {cfg.image_key})")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class HumanSamples:
    """Re-iterable batches of a task's evaluation shards with a hook on each sample's source image:
    ``source(rgb uint8 (H, W, 3), index) -> rgb uint8`` changes the picture before the letterbox (the
    decoding is the evaluation's own, ``decode_human_sample``); ``letterbox(rgb, targets) -> (3, S, S)``
    replaces the letterbox itself. ``max_samples`` keeps the first N."""

    def __init__(self, spec: str, cfg, batch_size: int, split: str = "val", max_samples: int | None = None,
                 source: Callable[[np.ndarray, int], np.ndarray] | None = None,
                 letterbox: Callable[[np.ndarray, dict], Tensor] | None = None):
        self.spec, self.cfg, self.batch_size, self.split = spec, cfg, batch_size, split
        self.max_samples, self.source, self.letterbox = max_samples, source, letterbox

    def with_(self, **kw) -> HumanSamples:
        return HumanSamples(**{**dict(spec=self.spec, cfg=self.cfg, batch_size=self.batch_size, split=self.split,
                                      max_samples=self.max_samples, source=self.source,
                                      letterbox=self.letterbox), **kw})

    def __iter__(self) -> Iterator[dict]:
        from foundation.data.decode import BadSample, Decoder, collate, shard_targets
        from foundation.data.manifest import resolve_shards
        from foundation.data.tars import Reporter, shard_samples

        sources = resolve_shards(self.spec, self.split)
        urls = [u for s in sources for u in s]
        decoder = Decoder(self.cfg, shard_targets(self.cfg, sources, self.split), train=False)
        items: list[dict] = []
        n = 0
        for sample in shard_samples(urls, Reporter()):
            if self.max_samples is not None and n >= self.max_samples:
                break
            rgb = None
            if self.source is not None or self.letterbox is not None:
                key = _image_key(sample, self.cfg)
                with Image.open(io.BytesIO(sample[key])) as img:
                    rgb = np.asarray(img.convert("RGB"))
                if self.source is not None:
                    sample = {**sample, key: _png(np.ascontiguousarray(self.source(rgb, n)))}
            try:
                item = decoder(sample)
            except BadSample:
                continue
            if self.letterbox is not None:
                item["image"] = self.letterbox(rgb, item["targets"])
            items.append(item)
            n += 1
            if len(items) == self.batch_size:
                yield collate(items, None, eval_fields=True)
                items = []
        if items:
            yield collate(items, None, eval_fields=True)


def _normalise(arr: np.ndarray, cfg) -> Tensor:
    from foundation.data.human_transforms import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(cfg.mean or IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(cfg.std or IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def mean_std(cfg) -> tuple[list[float], list[float]]:
    from foundation.data.human_transforms import IMAGENET_MEAN, IMAGENET_STD

    return list(cfg.mean or IMAGENET_MEAN), list(cfg.std or IMAGENET_STD)


def letterbox_resize(cfg, lib: str, method: str, antialias: bool | None = None):
    """A letterbox made by resizing the source to (round(h·s), round(w·s)) with one library's interpolation and
    pasting it at the rounded offset (the decoding's scale and offset)."""
    from evaluation.sysnoise import resize

    def fn(rgb: np.ndarray, targets: dict) -> Tensor:
        if "affine" in targets:
            raise ValueError("the SysNoise resize axis re-renders the letterbox; top-down pose crops "
                             "(data.pose_crop: top_down) are not a letterbox: run it with data.pose_crop=letterbox")
        s, (ox, oy) = float(targets["scale"]), (float(v) for v in targets["offset"])
        in_h, in_w = cfg.input_hw
        h, w = rgb.shape[:2]
        nh, nw = max(1, min(in_h, round(h * s))), max(1, min(in_w, round(w * s)))
        x0, y0 = max(0, min(in_w - nw, round(ox))), max(0, min(in_h - nh, round(oy)))
        canvas = np.zeros((in_h, in_w, 3), np.uint8)
        canvas[y0:y0 + nh, x0:x0 + nw] = resize(rgb, nh, nw, lib, method, antialias)
        return _normalise(canvas, cfg)

    return fn


# --------------------------------------------------------------------------------------------------
# the network


def load_unihcp(checkpoint, task: str | None = None, device: str = "cpu") -> tuple[dict, object]:
    """``{name: (UniHCPTask, DataConfig)}`` of a checkpoint's UniHCP tasks (``task`` keeps one), and its recipe;
    ``ValueError`` with the choices when ``task`` is not one of them."""
    from foundation.predict import unihcp_tasks

    tasks, recipe = unihcp_tasks(checkpoint, device)
    if task is not None:
        if task not in tasks:
            raise ValueError(f"--task {task!r}: this checkpoint's UniHCP tasks are {sorted(tasks)}")
        tasks = {task: tasks[task]}
    return tasks, recipe


def task_network(checkpoint, task: str | None, device="cpu", data: str | None = None):
    """(task name, UniHCPTask, DataConfig, UniHCPDeploy, TaskOutputs) of one UniHCP task of a checkpoint: ``task``,
    or without it the one whose kind (pose, parsing, ...) the shards ``data`` hold."""
    from foundation.models.unihcp_export import TaskOutputs, deploy_task

    tasks, _ = load_unihcp(checkpoint, task, device)
    if len(tasks) > 1 and data:
        kind = shards_kind(data)
        tasks = {n: v for n, v in tasks.items() if v[0].kind == kind} or tasks
    if len(tasks) > 1:
        raise ValueError(f"{checkpoint} holds several UniHCP tasks; choose one with --task ({', '.join(tasks)})")
    name, (t, data) = next(iter(tasks.items()))
    if data.resize is not None:  # the deploy seam is fixed-size: per-image detection sizes are letterboxed instead
        data = data.model_copy(update={"resize": None})
    t.eval()
    deploy = deploy_task(t, data).to(device).eval()
    return name, t, data, deploy, TaskOutputs(deploy, deploy.kind, deploy.keypoint_flip_pairs, module=deploy)


def shards_kind(spec: str) -> str | None:
    """The human-centric kind (pose, parsing, ...) of shards, from their manifest; None without one."""
    from foundation.data.humans import task_info
    from foundation.data.shards import read_manifest

    try:
        manifest = read_manifest(spec.split("::")[0])
    except Exception:  # noqa: BLE001 - no readable manifest: the caller asks for --task
        return None
    return task_info(manifest).get("kind") if manifest else None


# --------------------------------------------------------------------------------------------------
# adversarial


def task_loss(task, model: nn.Module, images: Tensor, targets: dict, clean_feature: Tensor | None = None) -> Tensor:
    """The task's training loss of ``model``'s output on ``images`` (ReID: the squared distance of the
    L2-normalised feature from ``clean_feature``, the ascent direction of a feature attack)."""
    out = model(images)[-1]
    if task.kind == "reid":
        f = torch.nn.functional.normalize(out["feature"].float(), dim=1)
        return (f - clean_feature).pow(2).sum()
    prepared = task.prepare({"image": images, "targets": targets}, out)
    return sum(task.layer_loss(out, prepared).values())


def attack_batch(task, model: nn.Module, batch: dict, cfg, attack: str, eps: float, steps: int = 10,
                 step_size: float | None = None, seed: int = 0) -> Tensor:
    """FGSM / PGD (L∞, ``eps`` in pixel units) on one batch's letterboxed images; returns normalised images."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in mean_std(cfg))
    dev = batch["image"].device
    mean, std = mean.to(dev), std.to(dev)
    pixels = (batch["image"] * std + mean).clamp(0, 1)
    mask = torch.ones(len(pixels), 1, 1, 1, device=dev)
    clean = None
    if task.kind == "reid":
        mask = (batch["targets"]["split"] == 1).float().view(-1, 1, 1, 1).to(dev)  # queries only
        with torch.no_grad():
            clean = torch.nn.functional.normalize(model(batch["image"])[-1]["feature"].float(), dim=1)
    targets = batch["targets"]
    if eps == 0:
        return batch["image"]
    n_steps, alpha = (1, eps) if attack == "fgsm" else (steps, step_size or 2.5 * eps / steps)
    g = torch.Generator().manual_seed(seed)
    delta = torch.zeros_like(pixels)
    if attack == "pgd":
        delta = (torch.rand(pixels.shape, generator=g) * 2 - 1).to(dev) * eps * mask
    for _ in range(n_steps):
        with torch.enable_grad():
            x = ((pixels + delta).clamp(0, 1)).detach().requires_grad_(True)
            loss = task_loss(task, model, (x - mean) / std, targets, clean)
            (grad,) = torch.autograd.grad(loss, x)
        delta = (delta + alpha * grad.sign() * mask).clamp(-eps, eps)
        delta = ((pixels + delta).clamp(0, 1) - pixels).detach()
    return ((pixels + delta).clamp(0, 1) - mean) / std


class _Adversarial:
    """Batches of ``samples`` with their images replaced by attacked ones."""

    def __init__(self, samples, task, model, cfg, attack, eps, steps, seed):
        self.args = (samples, task, model, cfg, attack, eps, steps, seed)

    def __iter__(self):
        samples, task, model, cfg, attack, eps, steps, seed = self.args
        dev = next(model.parameters()).device
        for i, batch in enumerate(samples):
            on_dev = {"image": batch["image"].to(dev), "targets": _to(batch["targets"], dev)}
            adv = attack_batch(task, model, on_dev, cfg, attack, eps, steps, seed=seed + i)
            yield {**batch, "image": adv.cpu()}  # the evaluations read the targets on the CPU


def _to(obj, device):
    """Tensors (in dicts and lists) on ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# robustness


def evaluate_unihcp_robustness(checkpoint, spec: str, task: str | None = None, *, split: str = "val",
                               corruptions: Sequence[str] = (), severities: Sequence[int] = (1, 2, 3, 4, 5),
                               attacks: Sequence[str] = ("fgsm", "pgd"), eps: Sequence[float] = (1 / 255, 4 / 255),
                               pgd_steps: int = 10, batch_size: int = 16, max_samples: int | None = None,
                               adv_max_samples: int | None = None, seed: int = 0, device="cpu",
                               log: Callable[[str], None] = lambda s: None, network: tuple | None = None) -> dict:
    """Clean, per-corruption × severity and adversarial metrics of one UniHCP task (JSON-able); ``network``: a
    ``task_network`` result already loaded."""
    from evaluation.corruptions import corrupt

    t0 = time.perf_counter()
    name, t, cfg, deploy, model = network or task_network(checkpoint, task, device)
    kind = t.kind
    samples = HumanSamples(spec, cfg, batch_size, split, max_samples)
    clean = score(model, kind, samples, device)
    log(f"{name} clean: {_headline(kind, clean)}")
    primary = PRIMARY[kind]
    table: dict[str, dict[str, dict]] = {}
    for c in corruptions:
        table[c] = {}
        for sev in severities:
            src = samples.with_(source=lambda rgb, i, c=c, sev=sev: corrupt(rgb, c, sev, (seed, i)))
            table[c][str(sev)] = _headline(kind, score(model, kind, src, device))
        log(f"{name} {c}: " + ", ".join(f"{s}: {v.get(primary, float('nan')):.3f}" for s, v in table[c].items()))
    per_corr = {c: float(np.mean([v[primary] for v in rows.values()])) for c, rows in table.items()}
    adversarial = []
    adv_samples = samples.with_(max_samples=adv_max_samples or max_samples)
    for attack in attacks:
        for e in eps:
            res = score(model, kind, _Adversarial(adv_samples, t, model, cfg, attack, e, pgd_steps, seed), device)
            adversarial.append({"attack": attack, "norm": "linf", "eps": e,
                                "steps": 1 if attack == "fgsm" else pgd_steps, **_headline(kind, res)})
            log(f"{name} {attack} eps={e:.4f}: {_headline(kind, res)}")
    mean_c = float(np.mean(list(per_corr.values()))) if per_corr else None
    return {"checkpoint": str(checkpoint), "task": name, "kind": kind, "data": spec, "metric": primary,
            "secondary_metric": SECONDARY[kind], "clean": _headline(kind, clean), "clean_full": clean,
            "corruptions": table, "corruption_mean": per_corr, "mean_corrupted": mean_c,
            "relative_robustness": (mean_c / clean[primary]) if mean_c is not None and clean.get(primary) else None,
            "adversarial": adversarial, "severities": list(severities),
            "corruption_input": "source image, before the letterbox", "wall_s": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------------
# SysNoise


def evaluate_unihcp_sysnoise(checkpoint, spec: str, task: str | None = None, *, split: str = "val",
                             axes: Sequence[str] = ("decoder", "resize", "colour", "precision"),
                             jpeg_quality: int = 90, batch_size: int = 16, max_samples: int | None = None,
                             device="cpu", extra_models: dict | None = None,
                             log: Callable[[str], None] = lambda s: None, network: tuple | None = None) -> dict:
    """The task's metric under each deployment variant, against its axis's reference (JSON-able)."""
    from evaluation.sysnoise import (COLOURS, NotApplicable, Unavailable, convert_colour, decode, resize_name,
                                     resize_variants)

    t0 = time.perf_counter()
    name, t, cfg, deploy, model = network or task_network(checkpoint, task, device)
    kind = t.kind
    primary = PRIMARY[kind]
    samples = HumanSamples(spec, cfg, batch_size, split, max_samples)
    pipeline = score(model, kind, samples, device)
    rows: list[dict] = []

    def row(axis: str, variant: str, fn, reference: dict | None):
        try:
            res = _headline(kind, fn())
            status = "ok"
        except (NotApplicable, Unavailable) as e:
            res, status = {}, f"{'not_applicable' if isinstance(e, NotApplicable) else 'unavailable'}: {e}"
        entry = {"axis": axis, "variant": variant, "status": status, **res}
        if reference is not None and primary in res and primary in reference:
            entry["delta"] = res[primary] - reference[primary]
        rows.append(entry)
        log(f"{name} {axis}/{variant}: {res} {status if status != 'ok' else ''}")
        return res

    if "decoder" in axes:
        def jpeg(rgb: np.ndarray) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=jpeg_quality)
            return buf.getvalue()

        ref = row("decoder", "pil (reference)", lambda: score(model, kind, samples.with_(
            source=lambda rgb, i: decode(jpeg(rgb), 3, "pil")), device), None)
        for dec in ("opencv", "torchvision", "pil_ycbcr"):
            row("decoder", dec, lambda dec=dec: score(model, kind, samples.with_(
                source=lambda rgb, i: decode(jpeg(rgb), 3, dec)), device), ref)
    if "resize" in axes:
        ref = row("resize", "pil-bilinear (reference)", lambda: score(model, kind, samples.with_(
            letterbox=letterbox_resize(cfg, "pil", "bilinear")), device), None)
        rows.append({"axis": "resize", "variant": "pipeline (affine warp, training's)", "status": "ok",
                     **_headline(kind, pipeline), "delta": pipeline[primary] - ref[primary]})
        for lib, method, aa in resize_variants():
            if (lib, method, aa) == ("pil", "bilinear", None):
                continue
            row("resize", resize_name(lib, method, aa), lambda lib=lib, method=method, aa=aa: score(
                model, kind, samples.with_(letterbox=letterbox_resize(cfg, lib, method, aa)), device), ref)
    ref = _headline(kind, pipeline)
    if "colour" in axes:
        for c in COLOURS:
            row("colour", c, lambda c=c: score(model, kind, samples.with_(
                source=lambda rgb, i: convert_colour(rgb, c)), device), ref)
    if "precision" in axes:
        from foundation.models.unihcp_export import TaskOutputs

        for dtype_name in ("bf16", "fp16"):
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]

            def run(dtype=dtype):
                import copy

                low = copy.deepcopy(deploy).to(dtype)
                try:
                    low(torch.zeros(1, 3, *cfg.input_hw, dtype=dtype, device=device))
                except RuntimeError as e:
                    raise Unavailable(f"{dtype} inference on {device}: {str(e).splitlines()[0]}") from None
                fn = lambda x: tuple(o.float() for o in low(x.to(dtype)))  # noqa: E731
                return score(TaskOutputs(fn, kind, deploy.keypoint_flip_pairs, module=low), kind, samples, device)

            row("precision", dtype_name, run, ref)
        for label, m in (extra_models or {}).items():
            row("precision", label, lambda m=m: score(m, kind, samples, device), ref)
    return {"checkpoint": str(checkpoint), "task": name, "kind": kind, "data": spec, "metric": primary,
            "reference": ref, "rows": rows, "jpeg_quality": jpeg_quality, "wall_s": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------------
# CLI tails: the robustness / sysnoise commands hand a UniHCP checkpoint here


def _out_dir(args, checkpoint, what: str, name: str) -> Path:
    if args.out:
        return Path(args.out)
    from foundation.checkpoint_io import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    run = path.parent.parent if path.parent.name == "checkpoints" else path
    return run / "eval" / f"{what}_{name}"


def _markdown_robustness(res: dict) -> str:
    m = res["metric"]
    lines = [f"# {res['task']} ({res['kind']}) robustness: {m}", "",
             f"clean {m} {res['clean'].get(m, float('nan')):.4f}; mean over corruptions and severities "
             f"{res['mean_corrupted'] if res['mean_corrupted'] is not None else float('nan'):.4f}", ""]
    if res["corruptions"]:
        sev = res["severities"]
        lines += ["| corruption | " + " | ".join(f"s{s}" for s in sev) + " | mean |", "|---" * (len(sev) + 2) + "|"]
        for c, rows in res["corruptions"].items():
            lines.append(f"| {c} | " + " | ".join(f"{rows[str(s)].get(m, float('nan')):.4f}" for s in sev)
                         + f" | {res['corruption_mean'][c]:.4f} |")
    if res["adversarial"]:
        lines += ["", "| attack | eps | " + m + " |", "|---|---|---|"]
        lines += [f"| {a['attack']} | {a['eps']:.4f} | {a.get(m, float('nan')):.4f} |" for a in res["adversarial"]]
    return "\n".join(lines) + "\n"


def _open_task(args, device: str):
    """(network, task name, data spec) of ``--checkpoint``'s ``--task`` on ``--data`` (default: the task's
    data.val); None after printing the one error line."""
    try:
        network = task_network(args.checkpoint, args.task, device, data=args.data)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    name, _, cfg, _, _ = network
    if not args.data and not cfg.val:
        print("error: no --data given and the task has no data.val", file=sys.stderr)
        return None
    try:  # the checkpoint's data.val: local paths only (a pipe: or URL source in it would run or fetch something)
        spec = args.data or local_spec(cfg.val, f"the checkpoint's tasks.{name}.data.val")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return network, name, spec


def run_robustness_cli(args) -> int:
    """``foundation eval robustness`` on a UniHCP checkpoint (flags as for a classifier; ``--task`` picks the task;
    ``--data`` defaults to the task's ``data.val``)."""
    from evaluation.robustness import resolve_corruptions, resolve_device

    try:
        corruptions = resolve_corruptions(args.corruptions)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = str(resolve_device(args.device))
    opened = _open_task(args, device)
    if opened is None:
        return 2
    network, name, spec = opened
    attacks = [] if "none" in args.attacks else list(args.attacks)
    res = evaluate_unihcp_robustness(
        args.checkpoint, spec, name, split=args.split, corruptions=corruptions, severities=args.severities,
        attacks=attacks, eps=args.eps or [], pgd_steps=args.pgd_steps, batch_size=min(args.batch_size, 64),
        max_samples=args.max_samples, adv_max_samples=args.adv_max_samples, seed=args.seed, device=device,
        log=(lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr)), network=network)
    out = _out_dir(args, args.checkpoint, "robustness", name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(res, indent=2, default=float))
    (out / "report.md").write_text(_markdown_robustness(res))
    print(_markdown_robustness(res))
    print(f"robustness report: {out / 'report.md'}")
    return 0


def run_sysnoise_cli(args) -> int:
    """``foundation eval sysnoise`` on a UniHCP checkpoint."""
    from evaluation.robustness import resolve_device

    device = str(resolve_device(args.device))
    opened = _open_task(args, device)
    if opened is None:
        return 2
    network, name, spec = opened
    axes = [a for a in getattr(args, "axes", None) or ("decoder", "resize", "colour", "precision")
            if a in ("decoder", "resize", "colour", "precision")]
    res = evaluate_unihcp_sysnoise(args.checkpoint, spec, name, split=args.split, axes=axes,
                                   jpeg_quality=getattr(args, "jpeg_quality", 90) or 90,
                                   batch_size=min(args.batch_size, 64), max_samples=args.max_samples, device=device,
                                   log=(lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr)),
                                   network=network)
    out = _out_dir(args, args.checkpoint, "sysnoise", name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sysnoise.json").write_text(json.dumps(res, indent=2, default=float))
    m = res["metric"]
    lines = [f"# {res['task']} ({res['kind']}) SysNoise: {m}", "", "| axis | variant | " + m + " | Δ |", "|---|---|---|---|"]
    for r in res["rows"]:
        val = f"{r[m]:.4f}" if m in r else r["status"]
        lines.append(f"| {r['axis']} | {r['variant']} | {val} | {r['delta']:+.4f} |" if "delta" in r else
                     f"| {r['axis']} | {r['variant']} | {val} | |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"sysnoise report: {out / 'report.md'}")
    return 0


__all__ = ["HumanSamples", "PRIMARY", "attack_batch", "evaluate_unihcp_robustness", "evaluate_unihcp_sysnoise",
           "letterbox_resize", "run_robustness_cli", "run_sysnoise_cli", "score", "task_loss", "task_network"]
