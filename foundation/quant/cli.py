"""``foundation quantize``: post-training quantization of a checkpoint, evaluation, ONNX deployment check.

    foundation quantize --checkpoint runs/x --data SHARDS [--val SHARDS] --method rtn --wbits 8 --abits 8 --onnx

``--method``, ``--wbits`` and ``--abits`` take comma-separated lists (bit lists are paired:
``--wbits 8,4 --abits 8,4`` → W8A8 and W4A4); every method runs at every pair. Writes, under ``--out``:
one quantized checkpoint per run (``<method>_w<W>a<A>[_os]_<backend>/``), its ``model.onnx`` with
``--onnx``, the FP32 and onnxruntime-``quantize_static`` baseline models, and ``results.json`` /
``results.md`` (rows merged with earlier runs into the same directory).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import Tensor

from foundation.quant.config import BACKENDS, QuantConfig, load_quant_config


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add the ``quantize`` sub-command to the ``foundation`` parser."""
    p = sub.add_parser("quantize", help="post-training quantization (RTN, AdaRound, BRECQ, QDrop) + onnxruntime check",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (step_N) or run directory")
    p.add_argument("--data", required=True, help="calibration shards (their train split): pattern, directory or manifest")
    p.add_argument("--val", help="evaluation shards (their val split); default: evaluate on the calibration images")
    p.add_argument("--method", help="rtn | adaround | brecq | qdrop, or a comma-separated list (default: recipe's)")
    p.add_argument("--wbits", help="weight bits 2-8, or a comma-separated list paired with --abits")
    p.add_argument("--abits", help="activation bits 2-8, or a comma-separated list paired with --wbits")
    p.add_argument("--backend", choices=sorted(BACKENDS), help="quantization scheme (default: academic)")
    p.add_argument("--recipe", help="quantization recipe, e.g. recipes/quant/w8a8.yaml (flags override it)")
    p.add_argument("--outlier-suppression", action="store_true", help="gamma migration + token-wise clipping")
    p.add_argument("--calib-images", type=int, help="calibration images (default 1024)")
    p.add_argument("--iters", type=int, help="reconstruction iterations per layer/block (default 20000)")
    p.add_argument("--batch-size", type=int, help="forward batch size for calibration and evaluation")
    p.add_argument("--val-images", type=int, help="evaluate on at most this many images")
    p.add_argument("--seed", type=int)
    p.add_argument("--task", help="which task of a multi-task run to quantize: the shared backbone with that task's "
                                  "head, calibrated and scored on that task's data (required on a multi-task run)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="output directory (default: runs/quant/<checkpoint name>)")
    p.add_argument("--onnx", action="store_true", help="export to ONNX (QDQ), run onnxruntime, compare; "
                                                      "plus onnxruntime quantize_static as the baseline")
    p.add_argument("--wandb", action="store_true", help="also log the results table to W&B (online when logged in, "
                                                       "else offline under --out)")
    p.set_defaults(func=cmd_quantize)


def _split_list(value: str | None, cast=str) -> list | None:
    return None if value is None else [cast(v.strip()) for v in str(value).split(",") if v.strip()]


def configs_from_args(args: argparse.Namespace) -> list[QuantConfig]:
    """One validated config per method × bit pair (``RecipeError`` on a bad value)."""
    from foundation.config import RecipeError

    base: dict = {}
    for key, value in (("backend", args.backend), ("calib_images", args.calib_images),
                       ("reconstruction.iters", args.iters), ("batch_size", args.batch_size), ("seed", args.seed)):
        if value is not None:
            base[key] = value
    if args.outlier_suppression:
        base["outlier.enabled"] = True
    methods = _split_list(args.method) or [None]
    try:
        wbits, abits = _split_list(args.wbits, int), _split_list(args.abits, int)
    except ValueError:
        given = " ".join(f"--{k} {v}" for k, v in (("wbits", args.wbits), ("abits", args.abits)) if v is not None)
        raise RecipeError(f"{given}: bit widths are integers, e.g. 4 or 4,8") from None
    if wbits and abits and len(wbits) != len(abits) and 1 not in (len(wbits), len(abits)):
        raise RecipeError(f"--wbits {args.wbits} and --abits {args.abits}: give lists of the same length (paired)")
    n = max(len(wbits or [0]), len(abits or [0]))
    pairs = [((wbits[i] if len(wbits) > 1 else wbits[0]) if wbits else None,
              (abits[i] if len(abits) > 1 else abits[0]) if abits else None) for i in range(n)]
    configs = []
    for method in methods:
        for w, a in pairs:
            over = dict(base)
            if method is not None:
                over["method"] = method
            if w is not None:
                over["wbits"] = w
            if a is not None:
                over["abits"] = a
            configs.append(load_quant_config(args.recipe, over))
    return configs


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _collect(loader, n: int, keys: tuple[str, str] = ("image", "label"), source: str = "") -> tuple[Tensor, Tensor]:
    """The first ``n`` samples' ``keys`` (images as float), e.g. images and labels, or images and tokens."""
    from foundation.data import DataError

    got: dict[str, list[Tensor]] = {k: [] for k in keys}
    seen = 0
    for batch in loader:
        for k in keys:
            if k not in batch:
                raise DataError(f"{source}: the calibration shards have no {k!r} for this model "
                                f"({'captions for the text tower' if k == 'tokens' else 'a missing key'})")
            got[k].append(batch[k][: n - seen])
        seen += got[keys[0]][-1].shape[0]
        if seen >= n:
            break
    if not seen:
        raise DataError(f"{source}: the calibration shards yielded no samples")
    first, second = (torch.cat(got[k]) for k in keys)
    return (first.float() if keys[0] == "image" else first), second


def _finish(args, configs, out: Path, rows: list[dict], name: str, fp_top1: float | None, split: str, recipe,
            calib_images: int) -> int:
    """Write results.json / results.md with the FP row first, print the table, log to W&B if asked."""
    from foundation.quant.report import markdown_table, write_results

    if fp_top1 is not None:
        rows.insert(0, _fp_row(name, fp_top1, split))
    json_path, md_path = write_results(out, rows)
    print(markdown_table(rows))
    print(f"results: {json_path} and {md_path}")
    _wandb(args, configs, rows, md_path, recipe, calib_images, split)
    return 0


def _fp_row(model: str, top1: float, split: str) -> dict:
    return {"model": model, "method": "fp32", "bits": "FP32", "backend": "", "outlier_suppression": False,
            "top1": top1, "top1_fp": top1, "agreement_fp": 1.0, "eval_split": split}


def _tag(cfg: QuantConfig) -> str:
    return f"{cfg.method}_w{cfg.wbits}a{cfg.abits}{'_os' if cfg.outlier.enabled else ''}_{cfg.backend}"


def cmd_quantize(args: argparse.Namespace) -> int:
    from foundation.data.shards import build_eval_loader
    from foundation.engine.checkpoint import load_model
    from foundation.quant.report import write_results
    from foundation.quant.runner import agreement, evaluate, quantize, save_quantized, top1

    configs = configs_from_args(args)
    from foundation.models.unihcp_export import is_unihcp_checkpoint

    if is_unihcp_checkpoint(args.checkpoint):  # one UniHCP task (--task), scored with its own metric
        from foundation.quant.unihcp import run_quantize_cli

        return run_quantize_cli(args, configs)
    device = _device(args.device)
    model, recipe = load_model(args.checkpoint, device=device, task=args.task)  # a multi-task run: one task's view
    out = Path(args.out) if args.out else (Path("runs") / "quant" / Path(args.checkpoint).resolve().name
                                           / (args.task or ""))
    from foundation.models.dual_encoder import DualEncoder

    if isinstance(model, DualEncoder):
        return _quantize_dual_encoder(args, configs, model, recipe, device, out)
    batch_size = configs[0].batch_size
    calib_n = max(c.calib_images for c in configs)
    calib, calib_labels = _collect(build_eval_loader(args.data, recipe.data, batch_size=batch_size, split="train"),
                                   calib_n, source=args.data)
    print(f"calibration: {calib.shape[0]} images from {args.data}")

    def batches():
        if args.val:
            for b in build_eval_loader(args.val, recipe.data, batch_size=batch_size, split="val"):
                yield b["image"].float(), b["label"]
        else:
            for i in range(0, calib.shape[0], batch_size):
                yield calib[i:i + batch_size], calib_labels[i:i + batch_size]

    split = "val" if args.val else "calibration (not held out)"
    arch = {"source": "recipe", "model": recipe.model.model_dump(mode="json"), "in_chans": recipe.data.in_chans}
    name = recipe.model.backbone + (f"[{args.task}]" if args.task else "")

    def on_device(m):
        return lambda x: m(x.to(device))

    rows = []
    fp_top1 = None
    example = calib[:1]
    if args.onnx:
        from foundation.quant.onnx_export import export_fp32_onnx, ort_predict, ort_quantize_static, ort_session

        t0 = time.perf_counter()
        fp32_path = export_fp32_onnx(model.cpu(), example, out / "fp32.onnx")
        ort_path = ort_quantize_static(fp32_path, calib[: configs[0].calib_images], out / "ort_int8.onnx")
        seconds = round(time.perf_counter() - t0, 2)
        model.to(device)
        ort_sess = ort_session(ort_path)
        preds, labels = evaluate(batches(), {"fp": on_device(model), "ort": lambda x: ort_predict(ort_sess, x)},
                                 args.val_images)
        fp_top1 = top1(preds["fp"], labels)
        rows.append({"model": name, "method": "ort_quantize_static", "bits": "W8A8", "backend": "onnxruntime",
                     "outlier_suppression": False, "top1": top1(preds["ort"], labels), "top1_fp": fp_top1,
                     "agreement_fp": agreement(preds["ort"], preds["fp"]), "ptq_seconds": seconds,
                     "eval_split": split, "eval_images": int(labels.numel()),
                     "onnx": {"deployment": "int8-qdq (onnxruntime quantize_static)", "path": str(ort_path)}})

    for cfg in configs:
        tag = _tag(cfg)
        print(f"== {tag}")
        qmodel, _, report = quantize(model, calib, cfg, log=print)
        save_quantized(qmodel, out / tag, arch, extra={"source_checkpoint": str(args.checkpoint), "report": report})
        predictors = {"fp": on_device(model), "q": on_device(qmodel)}
        onnx_info = None
        if args.onnx:
            from foundation.quant.onnx_export import export_onnx

            onnx_info = export_onnx(qmodel.cpu(), example, out / tag / "model.onnx")
            qmodel.to(device)
            sess = ort_session(onnx_info["path"])
            predictors["onnx"] = lambda x, sess=sess: ort_predict(sess, x)
        preds, labels = evaluate(batches(), predictors, args.val_images)
        fp_top1 = top1(preds["fp"], labels)
        row = {"model": name, "method": cfg.method, "bits": f"W{cfg.wbits}A{cfg.abits}", "backend": cfg.backend,
               "wbits": cfg.wbits, "abits": cfg.abits, "outlier_suppression": cfg.outlier.enabled,
               "top1": top1(preds["q"], labels), "top1_fp": fp_top1, "agreement_fp": agreement(preds["q"], preds["fp"]),
               "ptq_seconds": report["ptq_seconds"], "calib_images": report["calib_images"],
               "iters": cfg.reconstruction.iters if cfg.method != "rtn" else None,
               "eval_split": split, "eval_images": int(labels.numel()), "checkpoint": str(out / tag)}
        if onnx_info is not None:
            onnx_info["top1"] = top1(preds["onnx"], labels)
            onnx_info["agreement_sim"] = agreement(preds["onnx"], preds["q"])
            row["onnx"] = onnx_info
        rows.append(row)
        write_results(out, [_fp_row(name, fp_top1, split)] + rows)  # after every run: a crash keeps the rest
        print(f"   top-1 {100 * row['top1']:.2f} (FP {100 * fp_top1:.2f}), agreement {100 * row['agreement_fp']:.2f}, "
              f"PTQ {row['ptq_seconds']:.1f} s" + (f"; onnxruntime ({onnx_info['deployment']}) top-1 "
                                                   f"{100 * onnx_info['top1']:.2f}, agrees with simulation on "
                                                   f"{100 * onnx_info['agreement_sim']:.2f}%" if onnx_info else ""))
    return _finish(args, configs, out, rows, name, fp_top1, split, recipe, calib.shape[0])


def _wandb(args, configs, rows, md_path, recipe, calib_images: int, split: str) -> None:
    if args.wandb:
        from evaluation.report import log_to_wandb

        settings = {"methods": sorted({c.method for c in configs}), "backend": configs[0].backend,
                    "calib_images": calib_images, "eval_split": split, "data": args.data, "val": args.val}
        log_to_wandb({"checkpoint": str(args.checkpoint), "rows": rows, "settings": settings},
                     {"results_md": md_path}, kind="quantize", recipe=recipe)


class _TextSide:
    """What ``zeroshot_classifier`` needs of a model: ``tokenize`` and ``encode_text``, from a text tower."""

    def __init__(self, tower, tokenize, device):
        self.tower, self.tokenize, self.device = tower, tokenize, device

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        x = self.tower(tokens.to(self.device))
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def _quantize_dual_encoder(args, configs, model, recipe, device: str, out: Path) -> int:
    """CLIP / DeCLIP checkpoints: both towers are quantized with the same method and bits (Outlier
    Suppression applies to both transformers), calibrated on the shards' images and captions, and
    judged by zero-shot top-1 from the class names against the FP dual encoder."""
    import torch.nn.functional as F

    from evaluation.zeroshot import loader_class_names, zeroshot_classifier
    from foundation.data import DataError
    from foundation.data.captions import TEMPLATES
    from foundation.data.shards import build_eval_loader
    from foundation.models.dual_encoder import ImageTower, TextTower
    from foundation.quant.report import write_results
    from foundation.quant.runner import agreement, evaluate, quantize, save_quantized, top1

    batch_size = configs[0].batch_size
    calib_n = max(c.calib_images for c in configs)
    calib, calib_tokens = _collect(build_eval_loader(args.data, recipe.data, batch_size=batch_size, split="train",
                                                     tokenizer=model.tokenize), calib_n, ("image", "tokens"), args.data)
    print(f"calibration: {calib.shape[0]} images and captions from {args.data}")

    val_spec = args.val or args.data
    split = "val" if args.val else "train (not held out)"
    names = loader_class_names(build_eval_loader(val_spec, recipe.data, batch_size=batch_size,
                                                 split="val" if args.val else "train"))
    if not names:
        raise DataError(f"{val_spec}: zero-shot evaluation needs class names in the shards' manifest.json")

    def batches():
        for b in build_eval_loader(val_spec, recipe.data, batch_size=batch_size, split="val" if args.val else "train"):
            yield b["image"].float(), b["label"]

    def classifier(text_tower) -> Tensor:
        return zeroshot_classifier(_TextSide(text_tower, model.tokenize, device), names, TEMPLATES, device)

    def predictor(image_tower, weights: Tensor):
        return lambda x: F.normalize(image_tower(x.to(device)), dim=-1).float() @ weights

    fp_image, fp_text = ImageTower(model).eval(), TextTower(model).eval()
    with torch.no_grad():
        w_fp = classifier(fp_text)
    name = f"{recipe.model.backbone}+text"
    arch = {"source": "recipe_tower", "recipe": recipe.model_dump(mode="json")}
    rows, fp_top1 = [], None
    if args.onnx:  # onnxruntime's own quantize_static of both towers: the deployment baseline
        from foundation.quant.onnx_export import OnnxRuntimeModel, export_fp32_onnx, ort_quantize_static

        t0 = time.perf_counter()
        ort_towers = {}
        for side, tower, inputs in (("image", fp_image, calib), ("text", fp_text, calib_tokens)):
            fp32_path = export_fp32_onnx(tower.cpu(), inputs[:1], out / f"fp32_{side}.onnx")
            ort_path = ort_quantize_static(fp32_path, inputs[: configs[0].calib_images], out / f"ort_int8_{side}.onnx")
            ort_towers[side] = OnnxRuntimeModel(ort_path)
        seconds = round(time.perf_counter() - t0, 2)
        model.to(device)
        with torch.no_grad():
            w_ort = classifier(ort_towers["text"])
        preds, labels = evaluate(batches(), {"fp": predictor(fp_image, w_fp), "ort": predictor(ort_towers["image"], w_ort)},
                                 args.val_images)
        fp_top1 = top1(preds["fp"], labels)
        rows.append({"model": name, "method": "ort_quantize_static", "bits": "W8A8", "backend": "onnxruntime",
                     "outlier_suppression": False, "eval": "zero-shot", "top1": top1(preds["ort"], labels),
                     "top1_fp": fp_top1, "agreement_fp": agreement(preds["ort"], preds["fp"]), "ptq_seconds": seconds,
                     "eval_split": split, "eval_images": int(labels.numel()),
                     "onnx": {"deployment": "int8-qdq (onnxruntime quantize_static)",
                              "path": {k: v.path for k, v in ort_towers.items()}}})
    for cfg in configs:
        tag = _tag(cfg)
        print(f"== {tag}: image tower")
        q_image, _, rep_image = quantize(fp_image, calib, cfg, log=print)
        print(f"== {tag}: text tower")
        q_text, _, rep_text = quantize(fp_text, calib_tokens, cfg, log=print)
        extra = {"source_checkpoint": str(args.checkpoint)}
        save_quantized(q_image, out / tag / "image", {**arch, "tower": "image"}, extra={**extra, "report": rep_image})
        save_quantized(q_text, out / tag / "text", {**arch, "tower": "text"}, extra={**extra, "report": rep_text})
        with torch.no_grad():
            w_q = classifier(q_text)
        predictors = {"fp": predictor(fp_image, w_fp), "q": predictor(q_image, w_q),
                      "q_image": predictor(q_image, w_fp), "q_text": predictor(fp_image, w_q)}
        onnx_info = None
        if args.onnx:  # both towers deployed: zero-shot computed by onnxruntime end to end
            from foundation.quant.onnx_export import OnnxRuntimeModel, export_onnx

            onnx_info = {side: export_onnx(tower.cpu(), inputs[:1], out / tag / side / "model.onnx")
                         for side, tower, inputs in (("image", q_image, calib), ("text", q_text, calib_tokens))}
            q_image.to(device), q_text.to(device)
            ort_image, ort_text = (OnnxRuntimeModel(onnx_info[s]["path"]) for s in ("image", "text"))
            with torch.no_grad():
                w_onnx = classifier(ort_text)
            predictors["onnx"] = predictor(ort_image, w_onnx)
        preds, labels = evaluate(batches(), predictors, args.val_images)
        fp_top1 = top1(preds["fp"], labels)
        row = {"model": name, "method": cfg.method, "bits": f"W{cfg.wbits}A{cfg.abits}", "backend": cfg.backend,
               "wbits": cfg.wbits, "abits": cfg.abits, "outlier_suppression": cfg.outlier.enabled,
               "eval": "zero-shot", "top1": top1(preds["q"], labels), "top1_fp": fp_top1,
               "agreement_fp": agreement(preds["q"], preds["fp"]),
               "top1_image_tower_only": top1(preds["q_image"], labels),
               "top1_text_tower_only": top1(preds["q_text"], labels),
               "ptq_seconds": round(rep_image["ptq_seconds"] + rep_text["ptq_seconds"], 3),
               "calib_images": rep_image["calib_images"], "calib_captions": rep_text["calib_images"],
               "iters": cfg.reconstruction.iters if cfg.method != "rtn" else None,
               "outlier": {"image": {k: rep_image.get(k) for k in ("gamma_migration", "token_clipping")},
                           "text": {k: rep_text.get(k) for k in ("gamma_migration", "token_clipping")}},
               "eval_split": split, "eval_images": int(labels.numel()), "checkpoint": str(out / tag)}
        if onnx_info is not None:
            kinds = {i["deployment"] for i in onnx_info.values()}
            row["onnx"] = {"deployment": kinds.pop() if len(kinds) == 1 else "image: {}; text: {}".format(
                               onnx_info["image"]["deployment"], onnx_info["text"]["deployment"]),
                           "towers": onnx_info, "top1": top1(preds["onnx"], labels),
                           "agreement_sim": agreement(preds["onnx"], preds["q"])}
        rows.append(row)
        write_results(out, [_fp_row(name, fp_top1, split)] + rows)
        print(f"   zero-shot top-1 {100 * row['top1']:.2f} (FP {100 * fp_top1:.2f}; image tower alone "
              f"{100 * row['top1_image_tower_only']:.2f}, text tower alone {100 * row['top1_text_tower_only']:.2f}), "
              f"agreement {100 * row['agreement_fp']:.2f}, PTQ {row['ptq_seconds']:.1f} s"
              + (f"; onnxruntime ({row['onnx']['deployment']}) zero-shot top-1 {100 * row['onnx']['top1']:.2f}, "
                 f"agrees with simulation on {100 * row['onnx']['agreement_sim']:.2f}%" if onnx_info else ""))
    return _finish(args, configs, out, rows, name, fp_top1, split, recipe, calib.shape[0])
