"""SysNoise (Wang et al. 2023): how much a classifier's predictions move when deployment differs from training.

The reference is the training pipeline's eval transform: PIL decode, PIL resize of the short side with the
recipe's interpolation, centre crop, normalise, fp32. Each variant changes one thing and is compared with
the reference on the same samples: Δtop-1 (variant − reference, percentage points) and the prediction
flip rate (share of samples whose top-1 class changes). Input variants also report how far their pixels
are from the reference crop.

Axes and variants:
  decoder       the same JPEG bytes through OpenCV, torchvision.io (CPU; nvJPEG on CUDA), Pillow's own
                YCbCr->RGB conversion, and libjpeg-turbo's fast integer IDCT and plain (non-"fancy")
                chroma upsampling (those two need the optional ``simplejpeg``). Lossless data (PNG, ...) is
                re-encoded as JPEG at ``jpeg_quality`` first and the decoder reference is PIL on those bytes.
  resize        PIL / OpenCV / torch x nearest, bilinear, bicubic, area, lanczos (torch: antialias on/off).
  colour        RGB<->BGR mix-up, YUV 4:4:4 and 4:2:0 (I420) round trips through OpenCV (colour models only).
  precision     fp16 and bf16 inference (the model and input cast; autocast where a cast op is missing),
                plus any model passed in ``extra_models`` (e.g. an INT8 model from foundation.quant).
  architecture  ``ceil_mode`` flipped on every pooling layer; ``align_corners`` flipped on every
                interpolation (nn.Upsample and F.interpolate calls) - "not_applicable" when the model has none.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import io
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from evaluation.robustness import (
    NoSamples,
    Progress,
    add_common_arguments,
    batched,
    centre_crop,
    evaluate_readable,
    open_cli_run,
    pil_decode,
    predict,
    resize_size,
    to_input,
    write_cli_report,
)

AXES: tuple[str, ...] = ("decoder", "resize", "colour", "precision", "architecture")
DECODERS: tuple[str, ...] = ("opencv", "torchvision", "torchvision_cuda", "pil_ycbcr", "turbo_fastdct",
                             "turbo_fastupsample")
RESIZE_METHODS: dict[str, tuple[str, ...]] = {
    "pil": ("nearest", "bilinear", "bicubic", "area", "lanczos"),
    "opencv": ("nearest", "bilinear", "bicubic", "area", "lanczos"),
    "torch": ("nearest", "bilinear", "bicubic", "area"),
}
COLOURS: tuple[str, ...] = ("bgr", "yuv444", "yuv420")
PRECISIONS: tuple[str, ...] = ("fp16", "bf16")
ARCHITECTURE: tuple[str, ...] = ("ceil_mode", "align_corners")

# recipe interpolation (timm / torchvision names) -> our method names
_RECIPE_METHOD = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "box": "area",
                  "lanczos": "lanczos", "hamming": "hamming", "random": "bilinear"}
_PIL_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "area": Image.BOX, "lanczos": Image.LANCZOS, "hamming": Image.HAMMING}
_CV_FLAGS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
             "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}
_COLOUR_ONLY_DECODERS = frozenset({"pil_ycbcr", "turbo_fastupsample"})


class NotApplicable(Exception):
    """A variant that cannot differ from the reference for this model or data (reported, not an error)."""


class Unavailable(Exception):
    """A variant whose library or device is missing here."""


# --------------------------------------------------------------------------------------------------
# decoders


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def to_jpeg(data: bytes, in_chans: int, quality: int) -> bytes:
    """Re-encode (lossless) image bytes as a JPEG in the model's mode, with PIL's defaults (4:2:0 for colour)."""
    buf = io.BytesIO()
    pil_decode(data, in_chans).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode(data: bytes, in_chans: int, decoder: str = "pil") -> np.ndarray:
    """Encoded bytes -> uint8 (H, W, C) in the model's mode (C = in_chans) with the named decoder."""
    grey = in_chans == 1
    if decoder == "pil":
        arr = np.asarray(pil_decode(data, in_chans))
    elif decoder == "opencv":
        # default flags, as deployed code calls it: this also applies EXIF orientation (PIL does not)
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
        if arr is None:
            raise ValueError("OpenCV could not decode the image")
        arr = arr if grey else cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    elif decoder in ("torchvision", "torchvision_cuda"):
        arr = _torchvision_decode(data, grey, cuda=decoder == "torchvision_cuda")
    elif decoder == "pil_ycbcr":
        if grey:
            raise NotApplicable("no chroma in single-channel images")
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and img.mode == "RGB":
            img.draft("YCbCr", img.size)  # libjpeg stops at YCbCr; Pillow's own matrix converts to RGB
            arr = np.asarray(img.convert("RGB"))
        else:  # grey or CMYK JPEGs have no YCbCr step: decoded as PIL does
            arr = np.asarray(pil_decode(data, in_chans))
    elif decoder in ("turbo_fastdct", "turbo_fastupsample"):
        try:
            import simplejpeg
        except ImportError:
            raise Unavailable("pip install simplejpeg") from None
        if decoder == "turbo_fastupsample" and grey:
            raise NotApplicable("no chroma upsampling in single-channel images")
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if grey else "RGB",
                                     fastdct=decoder == "turbo_fastdct",
                                     fastupsample=decoder == "turbo_fastupsample")
    else:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {('pil',) + DECODERS}")
    arr = np.ascontiguousarray(arr)
    return arr[..., None] if arr.ndim == 2 else arr


def _torchvision_decode(data: bytes, grey: bool, cuda: bool) -> np.ndarray:
    with warnings.catch_warnings():  # deprecated in favour of TorchCodec, still what deployed code calls
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        mode = ImageReadMode.GRAY if grey else ImageReadMode.RGB
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if not cuda:
            return decode_image(t, mode=mode).permute(1, 2, 0).numpy()
        if not torch.cuda.is_available():
            raise Unavailable("needs CUDA (nvJPEG)")
        if not is_jpeg(data):
            raise NotApplicable("nvJPEG decodes JPEG only")
        return decode_jpeg(t, mode=mode, device="cuda").cpu().permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------------------------------
# resizers and colour conversions


def resize_variants() -> list[tuple[str, str, bool | None]]:
    """(library, method, antialias) for every resize variant; antialias is None where it is not a choice."""
    out: list[tuple[str, str, bool | None]] = []
    for lib, methods in RESIZE_METHODS.items():
        for method in methods:
            if lib == "torch" and method in ("bilinear", "bicubic"):
                out += [(lib, method, False), (lib, method, True)]
            else:
                out.append((lib, method, None))
    return out


def resize_name(lib: str, method: str, antialias: bool | None) -> str:
    return f"{lib}-{method}" + ("" if antialias is None else ("-aa" if antialias else "-noaa"))


def resize(image: np.ndarray, height: int, width: int, lib: str, method: str,
           antialias: bool | None = None) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (height, width, C) with one library's interpolation."""
    if lib == "pil":
        img = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        out = np.asarray(img.resize((width, height), _PIL_FILTERS[method]))
    elif lib == "opencv":
        out = cv2.resize(image, (width, height), interpolation=_CV_FLAGS[method])
    elif lib == "torch":
        x = torch.tensor(image).permute(2, 0, 1)[None].float()
        kwargs = {}
        if method in ("bilinear", "bicubic"):
            kwargs = {"align_corners": False, "antialias": bool(antialias)}
        y = F.interpolate(x, size=(height, width), mode=method, **kwargs)
        out = y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    else:
        raise ValueError(f"unknown resize library {lib!r}; choose from {list(RESIZE_METHODS)}")
    return out[..., None] if out.ndim == 2 else out


def eval_crop_with(image: np.ndarray, image_size: int, crop_pct: float, lib: str, method: str,
                   antialias: bool | None = None) -> np.ndarray:
    """The eval transform's geometry (short side to floor(size / crop_pct), centre crop) with any resizer."""
    h, w = resize_size(image.shape[0], image.shape[1], image_size, crop_pct)
    return centre_crop(resize(image, h, w, lib, method, antialias), image_size)


def convert_colour(image: np.ndarray, variant: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> the same picture after a deployment colour slip."""
    if image.shape[2] != 3:
        raise NotApplicable("single-channel model")
    if variant == "bgr":
        return np.ascontiguousarray(image[..., ::-1])
    if variant == "yuv444":
        return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2YUV), cv2.COLOR_YUV2RGB)
    if variant == "yuv420":
        h, w = image.shape[:2]
        padded = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # I420 needs even sides
        yuv = cv2.cvtColor(padded, cv2.COLOR_RGB2YUV_I420)
        return cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)[:h, :w]
    raise ValueError(f"unknown colour variant {variant!r}; choose from {COLOURS}")


# --------------------------------------------------------------------------------------------------
# model variants


def flip_ceil_mode(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` with ``ceil_mode`` flipped on every pooling layer that has one, and their count."""
    flipped = copy.deepcopy(model)
    n = 0
    for module in flipped.modules():
        if isinstance(getattr(module, "ceil_mode", None), bool):
            module.ceil_mode = not module.ceil_mode
            n += 1
    return flipped, n


_ALIGNABLE = ("linear", "bilinear", "bicubic", "trilinear")


@contextmanager
def flipped_align_corners() -> Iterator[list[int]]:
    """Inside, every ``F.interpolate`` call (nn.Upsample goes through it) with a mode that has
    ``align_corners`` runs with it flipped (None counts as False). Yields a one-element call counter."""
    original = F.interpolate
    signature = inspect.signature(original)
    calls = [0]

    def interpolate(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["mode"] in _ALIGNABLE:
            bound.arguments["align_corners"] = not bool(bound.arguments["align_corners"])
            calls[0] += 1
        return original(*bound.args, **bound.kwargs)

    F.interpolate = interpolate
    try:
        yield calls
    finally:
        F.interpolate = original


class _ModelVariant:
    """Predicts with a changed model or numeric format; decides on the first batch how it can run."""

    def __init__(self, name: str, model: nn.Module, device: torch.device):
        self.name, self.model, self.device = name, model, device
        self.runner: Callable[[Tensor], Tensor] | None = None
        self.mode = ""

    def _setup(self, x: Tensor) -> None:
        if self.name in PRECISIONS:
            dtype = torch.float16 if self.name == "fp16" else torch.bfloat16
            cast = copy.deepcopy(self.model).to(dtype).eval()
            try:
                with torch.no_grad():
                    cast(x[:1].to(self.device, dtype))
                self.runner, self.mode = (lambda t: cast(t.to(self.device, dtype))), "cast"
                return
            except (RuntimeError, NotImplementedError) as e:
                first_error = str(e).splitlines()[0]
            del cast

            def autocast(t: Tensor) -> Tensor:
                with torch.autocast(self.device.type, dtype=dtype):
                    return self.model(t.to(self.device))

            with torch.no_grad():
                autocast(x[:1])
            self.runner, self.mode = autocast, f"autocast (cast failed: {first_error})"
        elif self.name == "ceil_mode":
            flipped, n = flip_ceil_mode(self.model)
            if n == 0:
                raise NotApplicable("no pooling layer with ceil_mode")
            self.runner, self.mode = (lambda t: flipped(t.to(self.device))), f"{n} pooling layers flipped"
        elif self.name == "align_corners":
            with torch.no_grad(), flipped_align_corners() as calls:
                self.model(x[:1].to(self.device))
            if calls[0] == 0:
                raise NotApplicable("no interpolation with align_corners in the forward pass")

            def run(t: Tensor) -> Tensor:
                with flipped_align_corners():
                    return self.model(t.to(self.device))

            self.runner, self.mode = run, f"{calls[0]} interpolation calls per forward flipped"
        else:  # a model from extra_models, e.g. INT8
            self.runner, self.mode = (lambda t: self.model(t.to(self.device))), "extra model"

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        if self.runner is None:
            self._setup(x)
        return self.runner(x).float().argmax(1).cpu()


# --------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class _Tally:
    axis: str
    name: str
    status: str = "ok"
    note: str = ""
    n: int = 0
    correct: int = 0
    flips: int = 0
    abs_diff: float = 0.0
    changed: int = 0
    values: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, pred: Tensor, labels: Tensor, ref_pred: Tensor, crops=None, ref_crops=None) -> None:
        self.n += len(labels)
        self.correct += int((pred == labels).sum())
        self.flips += int((pred != ref_pred).sum())
        if crops:
            a = np.stack(crops).astype(np.int16)
            b = np.stack(ref_crops).astype(np.int16)
            d = np.abs(a - b)
            self.abs_diff += float(d.sum())
            self.changed += int((d > 0).sum())
            self.values += d.size

    def fail(self, status: str, note: str) -> None:
        self.status, self.note = status, note

    def row(self, ref_top1: float) -> dict:
        out = {"axis": self.axis, "name": self.name, "status": self.status, "note": self.note}
        if self.status == "ok" and self.n:
            top1 = 100.0 * self.correct / self.n
            out.update(top1=top1, delta_top1=top1 - ref_top1, flip_rate=100.0 * self.flips / self.n, samples=self.n)
            if self.values:
                out.update(pixel_mean_abs_diff=self.abs_diff / self.values,
                           pixel_changed=100.0 * self.changed / self.values)
                if self.changed == 0 and not out["note"]:
                    out["note"] = "pixel-identical to the reference on this data"
        return {**out, **self.extra}


def _decoder_batch(t: _Tally, jpegs: list[bytes], labels: Tensor, ref_pred: Tensor, ref_crops: list[np.ndarray],
                   in_chans: int, crop: Callable, model: nn.Module, mean, std, device) -> None:
    """One batch through decoder ``t.name``. An image it cannot decode counts as a wrong, flipped prediction
    (deployed, it would get none) and is left out of the pixel statistics."""
    crops, ok = [], []
    for i, data in enumerate(jpegs):
        try:
            crops.append(crop(decode(data, in_chans, t.name)))
            ok.append(i)
        except (NotApplicable, Unavailable):
            raise
        except Exception as e:
            t.extra["decode_failures"] = t.extra.get("decode_failures", 0) + 1
            t.extra.setdefault("first_failure", f"{type(e).__name__}: {e}")
            crops.append(ref_crops[i])  # placeholder; its prediction is overwritten below
    pred = predict(model, to_input(crops, mean, std), device)
    failed = [i for i in range(len(jpegs)) if i not in ok]
    pred[failed] = -1
    t.add(pred, labels, ref_pred, [crops[i] for i in ok], [ref_crops[i] for i in ok])


def evaluate_sysnoise(
    model: nn.Module,
    samples: Iterable[tuple[bytes, int]],
    *,
    image_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    axes: Sequence[str] = AXES,
    jpeg_quality: int = 90,
    extra_models: dict[str, nn.Module] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Top-1 of the reference pipeline and Δtop-1 / flip rate / pixel difference of every variant.

    ``samples``: (encoded image bytes, label). Returns a JSON-able dict; ``variants`` is a list of rows
    with ``axis``, ``name``, ``status`` (ok | not_applicable | unavailable | error) and the metrics."""
    start = time.perf_counter()
    for axis in axes:
        if axis not in AXES:
            raise ValueError(f"unknown SysNoise axis {axis!r}; choose from {AXES}")
    model.eval()
    device = torch.device(device)
    ref_method = _RECIPE_METHOD.get(interpolation)
    if ref_method is None:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {sorted(_RECIPE_METHOD)}")

    def crop(arr: np.ndarray, lib: str = "pil", method: str = ref_method, aa: bool | None = None) -> np.ndarray:
        return eval_crop_with(arr, image_size, crop_pct, lib, method, aa)

    tallies: list[_Tally] = []
    if "decoder" in axes:
        tallies += [_Tally("decoder", d) for d in DECODERS]
    if "resize" in axes:
        tallies += [_Tally("resize", resize_name(*v), extra={"library": v[0], "method": v[1], "antialias": v[2]})
                    for v in resize_variants() if (v[0], v[1]) != ("pil", ref_method)]
    if "colour" in axes:
        tallies += [_Tally("colour", c) for c in COLOURS]
    variants: dict[str, _ModelVariant] = {}
    if "precision" in axes:
        for p in PRECISIONS:
            tallies.append(_Tally("precision", p))
            variants[p] = _ModelVariant(p, model, device)
    for name, extra in (extra_models or {}).items():
        tallies.append(_Tally("precision", name))
        variants[name] = _ModelVariant(name, extra.eval(), device)
    if "architecture" in axes:
        for a in ARCHITECTURE:
            tallies.append(_Tally("architecture", a))
            variants[a] = _ModelVariant(a, model, device)

    n = ref_correct = dref_correct = reencoded = 0
    for batch in batched(samples, batch_size):
        labels = torch.tensor([int(y) for _, y in batch])
        decoded = [decode(data, in_chans, "pil") for data, _ in batch]
        ref_crops = [crop(a) for a in decoded]
        ref_x = to_input(ref_crops, mean, std)
        ref_pred = predict(model, ref_x, device)
        n += len(batch)
        ref_correct += int((ref_pred == labels).sum())
        jpegs = dref_crops = dref_pred = None
        if "decoder" in axes:
            jpegs = [data if is_jpeg(data) else to_jpeg(data, in_chans, jpeg_quality) for data, _ in batch]
            reencoded += sum(not is_jpeg(data) for data, _ in batch)
            dref_crops = [crop(decode(j, in_chans, "pil")) for j in jpegs]
            dref_pred = predict(model, to_input(dref_crops, mean, std), device)
            dref_correct += int((dref_pred == labels).sum())
        for t in tallies:
            if t.status != "ok":
                continue
            try:
                if t.axis == "decoder":
                    _decoder_batch(t, jpegs, labels, dref_pred, dref_crops, in_chans, crop, model, mean, std, device)
                elif t.axis == "resize":
                    crops = [crop(a, t.extra["library"], t.extra["method"], t.extra["antialias"]) for a in decoded]
                    t.add(predict(model, to_input(crops, mean, std), device), labels, ref_pred, crops, ref_crops)
                elif t.axis == "colour":
                    crops = [crop(convert_colour(a, t.name)) for a in decoded]
                    t.add(predict(model, to_input(crops, mean, std), device), labels, ref_pred, crops, ref_crops)
                else:
                    v = variants[t.name]
                    t.add(v.predict(ref_x), labels, ref_pred)
                    t.extra["mode"] = v.mode
            except NotApplicable as e:
                t.fail("not_applicable", str(e))
            except Unavailable as e:
                t.fail("unavailable", str(e))
            except Exception as e:  # a deployment variant that crashes is a finding, not a reason to stop
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if t.axis == "architecture":  # e.g. a stem pooling that now yields more tokens than pos-embeds
                    why = f"the model does not run with {t.name} flipped, so such a deployment fails: {why}"
                t.fail("error", why)
        if progress is not None:
            progress(len(batch))
    if n == 0:
        raise NoSamples("no samples to evaluate")

    ref_top1 = 100.0 * ref_correct / n
    rows = []
    for t in tallies:
        base = 100.0 * dref_correct / n if t.axis == "decoder" else ref_top1
        rows.append(t.row(base))
    result = {
        "samples": n,
        "reference": {
            "top1": ref_top1,
            "pipeline": f"PIL decode, PIL {ref_method} resize to floor({image_size}/{crop_pct}), "
                        f"centre crop {image_size}, fp32",
        },
        "variants": rows,
        "settings": {"image_size": image_size, "in_chans": in_chans, "mean": list(mean), "std": list(std),
                     "crop_pct": crop_pct, "interpolation": interpolation, "axes": list(axes),
                     "jpeg_quality": jpeg_quality, "device": str(device)},
    }
    if "decoder" in axes:
        result["decoder_reference"] = {
            "top1": 100.0 * dref_correct / n,
            "reencoded_as_jpeg": reencoded,
            "jpeg_quality": jpeg_quality,
            "note": "decoder variants are compared with PIL decoding the same JPEG bytes",
        }
    result["wall_s"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------------
# `foundation eval sysnoise`


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add the ``sysnoise`` sub-command to ``foundation eval``."""
    p = sub.add_parser(
        "sysnoise",
        help="prediction changes under deployment differences: decoder, resize, colour, precision, pooling",
        description="Runs the validation images through deployment variants of the training eval pipeline and "
                    "reports Δtop-1 and the prediction-flip rate against it. Writes sysnoise.json, report.html, "
                    "report.md and a bar plot to --out.",
    )
    add_common_arguments(p, "sysnoise")
    p.add_argument("--axes", nargs="+", default=list(AXES), choices=AXES)
    p.add_argument("--jpeg-quality", type=int, default=90,
                   help="quality for re-encoding lossless images before the decoder comparison (default 90)")
    p.add_argument("--int8", metavar="QUANT_DIR",
                   help="a quantized checkpoint written by `foundation quantize`: adds its row (simulated) to the "
                        "precision axis, and a row for its onnxruntime deployment when it was exported with --onnx")
    p.set_defaults(func=run_cli)


def _int8_model(path: str | None, device) -> dict[str, nn.Module] | None:
    if not path:
        return None
    from foundation.quant.runner import load_quantized

    models = {"int8": load_quantized(path, device)}
    onnx_path = Path(path) / "model.onnx"
    if onnx_path.is_file():  # exported with --onnx: the deployed model in onnxruntime gets its own row
        from foundation.quant.onnx_export import OnnxRuntimeModel

        models["int8_onnxruntime"] = OnnxRuntimeModel(onnx_path)
    return models


def run_cli(args: argparse.Namespace) -> int:
    """``foundation eval sysnoise`` on a classifier: evaluate, then write JSON + report + plot (+ W&B with
    --wandb). foundation/cli.py hands a UniHCP checkpoint to evaluation/unihcp_robustness.py, which builds on
    this module."""
    from evaluation.report import write_sysnoise_report
    opened = open_cli_run(args, "sysnoise")
    if opened is None:
        return 2
    setup, spec, out = opened

    def readable(data: bytes) -> bytes:  # the variants decode the bytes themselves
        pil_decode(data, setup.in_chans)
        return data

    def evaluate(samples: Iterator[tuple[bytes, int]], progress: Progress) -> dict:
        return evaluate_sysnoise(
            setup.model, samples, image_size=setup.image_size, in_chans=setup.in_chans, mean=setup.mean,
            std=setup.std, crop_pct=setup.crop_pct, interpolation=setup.interpolation, axes=args.axes,
            jpeg_quality=args.jpeg_quality, batch_size=args.batch_size, device=setup.device, progress=progress,
            extra_models=_int8_model(args.int8, setup.device),
        )

    result = evaluate_readable(setup, spec, args, "sysnoise", readable, evaluate)
    write_cli_report(result, out, args, setup, "sysnoise", write_sysnoise_report,
                     "the SysNoise reference does not reproduce the recipe's eval transform bit for bit")
    print(f"reference top-1 {result['reference']['top1']:.2f}% on {result['samples']} samples "
          f"({result['wall_s']:.1f} s)")
    for row in result["variants"]:
        if row["status"] == "ok":
            print(f"  {row['axis']:12s} {row['name']:22s} Δtop-1 {row['delta_top1']:+6.2f}  "
                  f"flips {row['flip_rate']:5.2f}%")
        else:
            print(f"  {row['axis']:12s} {row['name']:22s} {row['status']}: {row['note']}")
    return 0
