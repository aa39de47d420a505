"""Robustness of a classifier: ImageNet-C corruptions (error, CE, mCE, relative mCE) and FGSM/PGD attacks.

Entry points:
  - ``evaluate_robustness(model, samples, ...) -> dict``: plain Python, JSON-able result.
  - ``compute_ce(...)``: the CE / mCE / relative mCE arithmetic of Hendrycks & Dietterich (2019).
  - ``add_cli(sub)``: the ``foundation eval robustness`` command (JSON + HTML/Markdown report + plots).

The evaluation pipeline mirrors the recipe's eval transform (timm's: resize the short side to
``floor(image_size / crop_pct)``, centre crop, to tensor, normalise); corruptions are applied to the uint8
centre crop, before the tensor conversion, as ImageNet-C corrupts the 224-px crop. This module also
holds the pipeline and CLI plumbing that ``evaluation.sysnoise`` shares.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from evaluation.adversarial import AdversarialMeter, Attack, Normalized, default_attacks
from evaluation.corruptions import ALL_CORRUPTIONS, EXTRA, IMAGENET_C, SEVERITIES, applicable, corrupt, frost_source

class NoSamples(ValueError):
    """The sample iterator yielded nothing (empty split, every image unreadable)."""


def no_samples_error(spec: str, split: str, bad: list[str]):
    """The user-facing error (exit 2) for an evaluation that found no readable sample."""
    from foundation.data import DataError

    unreadable = f" ({len(bad)} unreadable, e.g. {bad[0]})" if bad else ""
    return DataError(f"{spec}: no samples to evaluate in split {split!r}{unreadable}; check --data and --split")


IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# the eval pipeline, split where corruptions and deployment variants plug in


def normalisation(in_chans: int, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The recipe's mean/std; None means ImageNet's (averaged over RGB for one channel)."""
    def resolve(values, default):
        if values is not None:
            return tuple(float(v) for v in values)
        return (float(np.mean(default)),) if in_chans == 1 else default
    return resolve(mean, IMAGENET_DEFAULT_MEAN), resolve(std, IMAGENET_DEFAULT_STD)


def pil_decode(data: bytes, in_chans: int) -> Image.Image:
    """Encoded bytes -> PIL image in the model's mode (L or RGB), as ``foundation.data.transforms.decode_image``."""
    img = Image.open(io.BytesIO(data))
    img.load()
    mode = "L" if in_chans == 1 else "RGB"
    if img.mode != mode:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        img = img.convert(mode)
    return img


def resize_size(height: int, width: int, image_size: int, crop_pct: float = 1.0) -> tuple[int, int]:
    """(h, w) after torchvision's ``Resize(floor(image_size / crop_pct))``: the short side gets that length."""
    short = math.floor(image_size / crop_pct)
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's ``CenterCrop`` on an (H, W, C) array (the resize makes it at least ``size``)."""
    h, w = image.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top : top + size, left : left + size]


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    modes = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
             "bicubic": InterpolationMode.BICUBIC, "box": InterpolationMode.BOX,
             "hamming": InterpolationMode.HAMMING, "lanczos": InterpolationMode.LANCZOS,
             "random": InterpolationMode.BILINEAR}  # timm's eval transform maps "random" to bilinear
    if name not in modes:
        raise ValueError(f"unknown interpolation {name!r}; choose from {sorted(modes)}")
    return modes[name]


def eval_crop(image: Image.Image, image_size: int, crop_pct: float = 1.0,
              interpolation: str = "bicubic") -> np.ndarray:
    """The geometric part of the eval transform on a PIL image -> uint8 (H, W, C) crop."""
    import torchvision.transforms.functional as TF

    h, w = resize_size(image.height, image.width, image_size, crop_pct)
    resized = TF.resize(image, [h, w], interpolation=_interp(interpolation))
    arr = np.asarray(resized)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return centre_crop(arr, image_size)


def to_pixels(batch: np.ndarray | Sequence[np.ndarray]) -> Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1], as ``ToTensor`` computes it."""
    t = torch.from_numpy(np.stack(list(batch)))  # a fresh, writable (B, H, W, C) array
    return t.permute(0, 3, 1, 2).contiguous().float().div(255)


def to_input(batch: np.ndarray | Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, H, W, C) -> the normalised (B, C, H, W) tensor the model takes (``ToTensor`` + ``Normalize``)."""
    x = to_pixels(batch)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, device: torch.device | str) -> Tensor:
    """Top-1 class indices (on CPU)."""
    return model(x.to(device)).float().argmax(1).cpu()


def batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _as_crop(image: Image.Image | np.ndarray, image_size: int, in_chans: int, crop_pct: float,
             interpolation: str) -> np.ndarray:
    if isinstance(image, np.ndarray):
        arr = image[..., None] if image.ndim == 2 else image
        if arr.shape[:2] == (image_size, image_size) and arr.shape[2] == in_chans and arr.dtype == np.uint8:
            return arr
        image = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    image = image.convert("L" if in_chans == 1 else "RGB")
    return eval_crop(image, image_size, crop_pct, interpolation)


# --------------------------------------------------------------------------------------------------
# corruption errors and CE / mCE


def resolve_corruptions(names: Sequence[str]) -> list[str]:
    """Expand 'all' | 'imagenet-c' | 'extra' | 'none' and check names (a typo fails with a suggestion)."""
    import difflib

    groups = {"all": ALL_CORRUPTIONS, "imagenet-c": IMAGENET_C, "extra": EXTRA, "none": ()}
    out: list[str] = []
    for name in names:
        if name in groups:
            out += [n for n in groups[name] if n not in out]
        elif name in ALL_CORRUPTIONS:
            if name not in out:
                out.append(name)
        else:
            close = difflib.get_close_matches(name, list(ALL_CORRUPTIONS) + list(groups), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown corruption {name!r}{hint}; "
                             f"choose from {list(groups)} or {list(ALL_CORRUPTIONS)}")
    return out


# Relative CE needs the reference to lose at least this many points of top-1 per severity on average.
REL_CE_MIN_DEGRADATION = 1.0


def compute_ce(
    errors: dict[str, Sequence[float]],
    clean_error: float,
    reference_errors: dict[str, Sequence[float] | float],
    reference_clean_error: float | None = None,
    severities: Sequence[int] = SEVERITIES,
) -> dict:
    """Corruption Error, normalised by a reference model (Hendrycks & Dietterich 2019), all in percent.

    CE_c = Σ_s E_s,c / Σ_s E^ref_s,c and relative CE_c = Σ_s (E_s,c − E_clean) / Σ_s (E^ref_s,c − E^ref_clean),
    summed over the evaluated ``severities``. mCE and relative mCE average them over the ImageNet-C
    corruptions present in both (the 4 extra ones get a CE but stay out of the mean, as in the paper);
    a relative CE is undefined (None) and left out where the reference degrades by less than
    ``REL_CE_MIN_DEGRADATION`` points per severity: a denominator of a few images makes the ratio noise
    (one run here read −1625% for zoom blur, where the reference lost 0.16 points).
    A reference entry may be one number per severity (all 5, or exactly the evaluated ones) or a single
    number: the mean over severities 1-5 (the usual published form), which needs all 5 evaluated.
    """
    ce: dict[str, float | None] = {}
    rel: dict[str, float | None] = {}
    for name, errs in errors.items():
        if name not in reference_errors:
            continue
        ref = _reference_sum(name, reference_errors[name], severities)
        ce[name] = 100.0 * sum(errs) / ref if ref > 0 else None
        if reference_clean_error is None:
            rel[name] = None
        else:
            denom = ref - len(severities) * reference_clean_error
            defined = denom >= REL_CE_MIN_DEGRADATION * len(severities)
            rel[name] = 100.0 * (sum(errs) - len(severities) * clean_error) / denom if defined else None
    in_mean = [n for n in IMAGENET_C if n in ce and ce[n] is not None]
    rel_in_mean = [n for n in in_mean if rel.get(n) is not None]
    return {
        "ce": ce,
        "relative_ce": rel,
        "mce": float(np.mean([ce[n] for n in in_mean])) if in_mean else None,
        "relative_mce": float(np.mean([rel[n] for n in rel_in_mean])) if rel_in_mean else None,
        "mce_corruptions": in_mean,
        "relative_mce_corruptions": rel_in_mean,  # relative CE is undefined where the reference loses nothing
        "missing_in_reference": [n for n in errors if n not in reference_errors],
    }


def _reference_sum(name: str, ref: Sequence[float] | float, severities: Sequence[int]) -> float:
    if isinstance(ref, (int, float)):
        if sorted(severities) != list(SEVERITIES):
            raise ValueError(f"reference error for {name!r} is one number (the mean over severities 1-5); "
                             f"evaluate all 5 severities or give one number per severity")
        return float(ref) * len(SEVERITIES)
    ref = [float(v) for v in ref]
    if len(ref) == len(SEVERITIES):
        return sum(ref[s - 1] for s in severities)
    if len(ref) == len(severities):
        return sum(ref)
    raise ValueError(f"reference errors for {name!r} have {len(ref)} entries; expected 5 or {len(severities)}")


def load_reference_errors(path: str | Path) -> tuple[dict, float | None]:
    """Reference errors (percent) from a JSON file: this command's own ``robustness.json`` (e.g. from the
    reference checkpoint), or ``{"clean_error": 23.9, "errors": {"gaussian_noise": [..5..] | mean, ...}}``."""
    data = json.loads(Path(path).read_text())
    if "corruptions" in data and isinstance(data["corruptions"], dict) and "error" in data["corruptions"]:
        errors, clean = data["corruptions"]["error"], data.get("clean_error")
    elif "errors" in data:
        errors, clean = data["errors"], data.get("clean_error")
    else:
        raise ValueError(f"{path}: expected a robustness.json or {{'clean_error': .., 'errors': {{name: [..]}}}}")
    values = [v for e in errors.values() for v in (e if isinstance(e, list) else [e])]
    if values and max(values) <= 1.0:
        raise ValueError(f"{path}: reference errors look like fractions (all <= 1); give them in percent")
    return errors, clean


# --------------------------------------------------------------------------------------------------
# evaluation


def _corrupt_stack(job: tuple[np.ndarray, str, tuple[int, ...], tuple[int, ...]]) -> np.ndarray:
    image, name, severities, seed = job
    return np.stack([corrupt(image, name, s, seed) for s in severities])


@dataclass
class _Counts:
    total: int = 0
    clean: int = 0
    corrupted: dict = field(default_factory=dict)  # (name, severity) -> correct


def evaluate_robustness(
    model: nn.Module,
    samples: Iterable[tuple[Image.Image | np.ndarray, int]],
    *,
    image_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    corruptions: Sequence[str] = ALL_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    attacks: Sequence[Attack] = (),
    adv_max_samples: int | None = None,
    reference_errors: dict | None = None,
    reference_clean_error: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Clean accuracy, accuracy/error per corruption and severity, CE/mCE when reference errors are given,
    and adversarial robustness per attack. All numbers in percent; the result is JSON-able.

    ``samples``: (image, label) pairs; an image is a PIL image (any size; the eval transform's resize and
    crop are applied) or a uint8 array already at ``image_size``. Corruption ``c`` of sample ``i`` uses
    seed (seed, i, index of c), the same for every severity. Adversarial examples are computed on the
    first ``adv_max_samples`` samples (all when None)."""
    start = time.perf_counter()
    model.eval()
    device = torch.device(device)
    corruptions = list(corruptions)
    skipped = [c for c in corruptions if not applicable(c, in_chans)]
    active = [c for c in corruptions if c not in skipped]
    severities = tuple(int(s) for s in severities)
    pixel_model = Normalized(model, mean, std).to(device).eval()
    meter = AdversarialMeter(attacks) if attacks else None
    counts = _Counts(corrupted={(c, s): 0 for c in active for s in severities})
    # forkserver: workers start from a clean interpreter, not a fork of one holding torch/OpenMP threads
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) if workers > 0 else None
    try:
        for b, batch in enumerate(batched(samples, batch_size)):
            crops = [_as_crop(img, image_size, in_chans, crop_pct, interpolation) for img, _ in batch]
            labels = torch.tensor([int(y) for _, y in batch])
            first = counts.total
            counts.total += len(batch)
            counts.clean += int((predict(model, to_input(crops, mean, std), device) == labels).sum())
            for c in active:
                cid = ALL_CORRUPTIONS.index(c)
                jobs = [(crop, c, severities, (seed, first + i, cid)) for i, crop in enumerate(crops)]
                stacks = list(pool.map(_corrupt_stack, jobs, chunksize=8) if pool else map(_corrupt_stack, jobs))
                for j, s in enumerate(severities):
                    x = to_input([st[j] for st in stacks], mean, std)
                    counts.corrupted[(c, s)] += int((predict(model, x, device) == labels).sum())
            if meter is not None and (adv_max_samples is None or meter.samples < adv_max_samples):
                take = len(batch) if adv_max_samples is None else min(len(batch), adv_max_samples - meter.samples)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
                meter.update(pixel_model, to_pixels(crops[:take]).to(device), labels[:take].to(device), gen)
            if progress is not None:
                progress(len(batch))
    finally:
        if pool is not None:
            pool.shutdown()
    if counts.total == 0:
        raise NoSamples("no samples to evaluate")

    n = counts.total
    acc = {c: [100.0 * counts.corrupted[(c, s)] / n for s in severities] for c in active}
    err = {c: [100.0 - a for a in acc[c]] for c in active}
    clean_acc = 100.0 * counts.clean / n
    in_c = [c for c in IMAGENET_C if c in err]
    result = {
        "samples": n,
        "clean_accuracy": clean_acc,
        "clean_error": 100.0 - clean_acc,
        "corruptions": {
            "severities": list(severities),
            "accuracy": acc,
            "error": err,
            "mean_error": {c: float(np.mean(e)) for c, e in err.items()},
            "mean_corruption_error": float(np.mean([np.mean(err[c]) for c in in_c])) if in_c else None,
            "not_applicable": skipped,
            # what frost blends in: ImageNet-C's photographs (package imagecorruptions) or the generated texture
            "frost_source": frost_source() if "frost" in active else None,
        },
        "mce": None,
        "adversarial": meter.result() if meter is not None else None,
        "settings": {
            "image_size": image_size, "in_chans": in_chans, "mean": list(mean), "std": list(std),
            "crop_pct": crop_pct, "interpolation": interpolation, "seed": seed,
        },
    }
    if reference_errors is not None:
        result["mce"] = compute_ce(err, 100.0 - clean_acc, reference_errors, reference_clean_error, severities)
    result["wall_s"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------------
# CLI plumbing shared with evaluation.sysnoise


@dataclass
class EvalSetup:
    """What a CLI evaluation needs from a checkpoint and its recipe."""

    model: nn.Module
    recipe: object  # foundation.config.Recipe
    checkpoint: Path
    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str
    device: torch.device


def add_common_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by `foundation train`")
    p.add_argument("--data", default=None, help="validation shards (default: the recipe's data.val)")
    p.add_argument("--split", default="val", help="split to read when --data is a manifest (default: val)")
    p.add_argument("--out", default=None, help=f"output directory (default: <run dir>/eval/{name})")
    p.add_argument("--max-samples", type=_positive_int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--task", help="which task of a multi-task run to evaluate (its head on the shared backbone)")
    p.add_argument("--wandb", action="store_true", help="also log the figures and tables to W&B")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_setup(checkpoint: str | Path, device: str = "auto", ema: bool = False, data_spec: str | None = None,
               task: str | None = None) -> EvalSetup:
    """The model in eval mode plus the data settings of its recipe (a run directory means its newest checkpoint).

    A CLIP/DeCLIP checkpoint becomes a zero-shot classifier over the class names in the manifest of
    ``data_spec`` (default: the recipe's ``data.val``)."""
    from foundation.data.transforms import normalization
    from foundation.engine.checkpoint import load_model
    from foundation.models.dual_encoder import DualEncoder

    dev = resolve_device(device)
    model, recipe = load_model(checkpoint, device=str(dev), ema=ema, task=task)
    model.eval()
    if isinstance(model, DualEncoder):
        from evaluation.zeroshot import ZeroShotClassifier
        from foundation.data import DataError
        from foundation.data.shards import class_names

        spec = data_spec or checkpoint_data(recipe)
        names = class_names(spec) if spec else None
        if not names:
            raise DataError(f"{checkpoint} is a dual encoder: it is evaluated as a zero-shot classifier, which needs "
                            f"class names in the manifest of the data ({spec or 'no --data and no data.val'})")
        model = ZeroShotClassifier(model, names, device=dev).eval()
    data = recipe.data
    mean, std = normalization(data)
    return EvalSetup(model, recipe, Path(checkpoint), data.image_size, data.in_chans, mean, std,
                     data.augment.crop_pct, data.augment.interpolation, dev)


def checkpoint_data(recipe) -> str | None:
    """The checkpoint recipe's ``data.val`` when no ``--data`` is given: local paths only (a checkpoint is data
    someone else may have written; a ``pipe:`` or URL source in it would run or fetch something)."""
    from foundation.data import local_spec

    return local_spec(recipe.data.val, "the checkpoint's data.val") if recipe.data.val else None


def default_out_dir(setup: EvalSetup, name: str) -> Path:
    """``<run dir>/eval/<name>``: the run dir holds ``checkpoints/step_N``; --checkpoint may name either. A bare
    checkpoint directory (moved out of its run) is its own run dir: never the recipe's ``output_dir``, which the
    checkpoint's author chose (docs/trust.md)."""
    path = setup.checkpoint.resolve()
    if path.parent.name == "checkpoints":
        run_dir = path.parent.parent
    else:
        run_dir = path
    return run_dir / "eval" / name


def image_bytes(sample: dict, image_key: str) -> tuple[bytes, str] | None:
    """The first present extension of ``image_key`` ("jpg;jpeg;png;webp") -> (bytes, extension)."""
    for ext in image_key.split(";"):
        if ext in sample:
            return sample[ext], ext
    return None


@dataclass
class RawSample:
    key: str
    data: bytes
    ext: str
    label: int


def iter_raw(spec: str, split: str, image_key: str, label_key: str, max_samples: int | None,
             bad: list[str]) -> Iterator[RawSample]:
    """Validation samples as encoded bytes + label; malformed ones are skipped and their keys appended to ``bad``."""
    from foundation.data.shards import iter_raw_samples

    n = 0
    for sample in iter_raw_samples(spec, split=split):
        if max_samples is not None and n >= max_samples:
            return
        found = image_bytes(sample, image_key)
        try:
            label = int(sample[label_key].decode() if isinstance(sample[label_key], bytes) else sample[label_key])
        except (KeyError, ValueError):
            found = None
        if found is None:
            bad.append(str(sample.get("__key__", "?")))
            continue
        n += 1
        yield RawSample(str(sample.get("__key__", n)), found[0], found[1], label)


def check_pipeline(setup: EvalSetup, data: bytes) -> bool | None:
    """Whether this module's reference pipeline gives the training eval transform's tensor, bit for bit
    (None when the data package's transforms are not importable)."""
    try:
        from foundation.data.transforms import build_eval_transform, decode_image
    except ImportError:
        return None
    theirs = build_eval_transform(setup.recipe.data)(decode_image(data, setup.in_chans))
    crop = eval_crop(pil_decode(data, setup.in_chans), setup.image_size, setup.crop_pct, setup.interpolation)
    ours = to_input([crop], setup.mean, setup.std)[0]
    return bool(theirs.shape == ours.shape and torch.equal(theirs.float(), ours))


def evaluate_readable(setup: EvalSetup, spec: str, args: argparse.Namespace, desc: str,
                      decode: Callable[[bytes], object], evaluate: Callable[[Iterator, Progress], dict]) -> dict:
    """``evaluate(samples, progress)`` over the samples of ``spec`` whose image decodes (``decode(bytes)`` is what
    a sample carries; one that raises is skipped and counted, never fatal), plus where the figures come from."""
    bad: list[str] = []
    first: list[bytes] = []

    def samples() -> Iterator[tuple[object, int]]:
        for raw in iter_raw(spec, args.split, setup.recipe.data.image_key, setup.recipe.data.label_key,
                            args.max_samples, bad):
            try:
                item = decode(raw.data)
            except Exception:  # a corrupt image is skipped and counted, never fatal
                bad.append(raw.key)
                continue
            if not first:
                first.append(raw.data)
            yield item, raw.label

    bar = Progress(args.max_samples, desc, args.quiet)
    try:
        result = evaluate(samples(), bar)
    except NoSamples:
        raise no_samples_error(spec, args.split, bad) from None
    finally:
        bar.close()
    result["checkpoint"] = str(setup.checkpoint)
    result["data"] = spec
    result["skipped_samples"] = {"count": len(bad), "keys": bad[:20]}
    result["pipeline_matches_training"] = check_pipeline(setup, first[0]) if first else None
    return result


def open_cli_run(args: argparse.Namespace, name: str) -> tuple[EvalSetup, str, Path] | None:
    """The checkpoint, the data it is evaluated on and the output directory of ``foundation eval <name>``;
    None (after an ``error:`` line) when there is no data to evaluate on."""
    setup = load_setup(args.checkpoint, args.device, args.ema, args.data, args.task)
    spec = args.data or checkpoint_data(setup.recipe)
    if not spec:
        print("error: no --data given and the recipe has no data.val", file=sys.stderr)
        return None
    out = Path(args.out) if args.out else default_out_dir(setup, name)
    out.mkdir(parents=True, exist_ok=True)
    return setup, spec, out


def write_cli_report(result: dict, out: Path, args: argparse.Namespace, setup: EvalSetup, name: str,
                     write_report: Callable[[dict, Path], object], mismatch_warning: str) -> None:
    """Warn when the reference pipeline is not the training one, write the report (+ W&B), say where it is."""
    from evaluation.report import log_to_wandb

    if result["pipeline_matches_training"] is False:
        print(f"warning: {mismatch_warning}", file=sys.stderr)
    files = write_report(result, out)
    if args.wandb:
        log_to_wandb(result, files, kind=name, recipe=setup.recipe)
    print(f"{name} report: {out / 'report.html'}")


class Progress:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, total: int | None, desc: str, quiet: bool):
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            # delay: a command that fails at once (no shards, no sample) prints its error line and no bar
            self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, delay=1.0)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_eps(text: str) -> float:
    """'0.0157', '4/255' -> float in pixel units."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None


# --------------------------------------------------------------------------------------------------
# `foundation eval robustness`


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add the ``robustness`` sub-command to ``foundation eval``."""
    p = sub.add_parser(
        "robustness",
        help="ImageNet-C corruptions (error, CE, mCE) and FGSM/PGD robustness of a classifier",
        description="Accuracy under the 15 ImageNet-C corruptions + 4 extra at severities 1-5, CE/mCE against "
                    "a reference, and adversarial robustness (share of clean-correct samples that stay correct) "
                    "under FGSM/PGD. Writes robustness.json, report.html, report.md and PNG plots to --out.",
    )
    add_common_arguments(p, "robustness")
    p.add_argument("--corruptions", nargs="+", default=["all"],
                   help="corruption names, or all | imagenet-c | extra | none (default: all)")
    p.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), choices=SEVERITIES)
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference", metavar="CKPT",
                     help="reference checkpoint for CE/mCE (evaluated on the same samples)")
    ref.add_argument("--reference-errors", metavar="JSON",
                     help="reference errors in percent: a robustness.json or {clean_error, errors: {name: [5] | mean}}")
    p.add_argument("--attacks", nargs="+", default=["fgsm", "pgd"], choices=["fgsm", "pgd", "none"])
    p.add_argument("--eps", nargs="*", type=parse_eps, default=[1 / 255, 2 / 255, 4 / 255],
                   help="L∞ radii in pixel units, e.g. 1/255 2/255 4/255 (default)")
    p.add_argument("--eps-l2", nargs="*", type=parse_eps, default=[], help="L2 radii in pixel units, e.g. 0.25 0.5")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--pgd-step-size", type=float, default=None,
                   help="PGD step as a fraction of eps (default 2.5 / steps)")
    p.add_argument("--no-random-start", action="store_true", help="start PGD at the clean image")
    p.add_argument("--adv-max-samples", type=int, default=None,
                   help="attack only the first N of the evaluated samples (attacks cost steps x forward+backward)")
    p.add_argument("--workers", type=int, default=0, help="processes that compute corruptions (default: in-process)")
    p.set_defaults(func=run_cli)


def _evaluate_checkpoint(setup: EvalSetup, args: argparse.Namespace, attacks: list[Attack], spec: str,
                         reference_errors=None, reference_clean=None, desc: str = "robustness") -> dict:
    from foundation.data.transforms import decode_image

    def evaluate(samples: Iterator[tuple[Image.Image, int]], progress: Progress) -> dict:
        return evaluate_robustness(
            setup.model, samples,
            image_size=setup.image_size, in_chans=setup.in_chans, mean=setup.mean, std=setup.std,
            crop_pct=setup.crop_pct, interpolation=setup.interpolation,
            corruptions=resolve_corruptions(args.corruptions), severities=args.severities, attacks=attacks,
            adv_max_samples=args.adv_max_samples, reference_errors=reference_errors,
            reference_clean_error=reference_clean, batch_size=args.batch_size, seed=args.seed,
            device=setup.device, workers=args.workers, progress=progress,
        )

    return evaluate_readable(setup, spec, args, desc, lambda data: decode_image(data, setup.in_chans), evaluate)


def run_cli(args: argparse.Namespace) -> int:
    """``foundation eval robustness`` on a classifier: evaluate, then write JSON + report + plots (+ W&B with
    --wandb). foundation/cli.py hands a UniHCP checkpoint to evaluation/unihcp_robustness.py, which builds on
    this module."""
    from evaluation.report import write_robustness_report
    try:
        corruptions = resolve_corruptions(args.corruptions)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opened = open_cli_run(args, "robustness")
    if opened is None:
        return 2
    setup, spec, out = opened
    names = [] if "none" in args.attacks else args.attacks
    attacks = default_attacks(args.eps, args.eps_l2, args.pgd_steps, args.pgd_step_size,
                              not args.no_random_start, names)

    ref_errors = ref_clean = None
    reference = None
    if args.reference_errors:
        try:
            ref_errors, ref_clean = load_reference_errors(args.reference_errors)
        except (OSError, ValueError) as e:
            print(f"error: --reference-errors: {e}", file=sys.stderr)
            return 2
    elif args.reference:
        ref_setup = load_setup(args.reference, args.device, data_spec=args.data)  # its own size and stats
        ref_args = argparse.Namespace(**{**vars(args), "corruptions": corruptions})
        reference = _evaluate_checkpoint(ref_setup, ref_args, [], args.data or checkpoint_data(ref_setup.recipe),
                                         desc="reference")
        ref_errors, ref_clean = reference["corruptions"]["error"], reference["clean_error"]
        (out / "reference_robustness.json").write_text(json.dumps(reference, indent=2))

    result = _evaluate_checkpoint(setup, args, attacks, spec, ref_errors, ref_clean)
    if reference is not None:
        result["reference"] = {"checkpoint": reference["checkpoint"], "clean_error": reference["clean_error"],
                               "error": reference["corruptions"]["error"], "wall_s": reference["wall_s"]}
    elif args.reference_errors:
        result["reference"] = {"errors_file": str(args.reference_errors), "clean_error": ref_clean}
    write_cli_report(result, out, args, setup, "robustness", write_robustness_report,
                     "the evaluation pipeline does not reproduce the recipe's eval transform bit for bit")
    _print_summary(result)
    return 0


def _print_summary(result: dict) -> None:
    print(f"clean accuracy {result['clean_accuracy']:.2f}% on {result['samples']} samples "
          f"({result['wall_s']:.1f} s)")
    if result["corruptions"]["mean_corruption_error"] is not None:
        print(f"mean corruption error (unnormalised) {result['corruptions']['mean_corruption_error']:.2f}%")
    if result.get("mce") and result["mce"]["mce"] is not None:
        rel = result["mce"]["relative_mce"]
        print(f"mCE {result['mce']['mce']:.2f}%" + (f", relative mCE {rel:.2f}%" if rel is not None else ""))
    if result.get("adversarial"):
        for row in result["adversarial"]["attacks"]:
            print(f"{row['attack']:4s} {row['norm']:4s} eps={row['eps']:.4f}: robustness {row['robustness']:.2f}%")
