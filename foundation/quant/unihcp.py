"""Post-training quantization of a UniHCP task: ``foundation quantize --checkpoint RUN --task pose ...``.

The quantized network is the task's ``UniHCPDeploy`` in packed form (foundation/models/unihcp_export.py: one
tensor out, every attention projection an ``nn.Linear``), so the generic pipeline (foundation/quant/runner.py)
places quantizers on the ViT, the memory projection, the decoder and the interpreter units, and BRECQ / QDrop
reconstruct block by block over the encoder's ``Block``s and the decoder's ``DecoderBlock``s (one decoder
layer each). Not quantized: the neck's transposed convolutions and norms, attention matmuls / softmax
(float on dequantized values, as for every transformer here), and the precomputed positions (constants).

Calibration: ``--data``'s train split through the task's evaluation decoding (letterboxed, no augmentation)
— the human-centric loader the task trains from. Evaluation: ``--val``'s val split (default: the calibration
shards, ``--data``'s train split, not held out, as for every other checkpoint) with the task's own metric
(``unihcp_*``), FP32 and quantized side by side, and the relative error of the quantized outputs against the
FP ones.

Each quantized model's ``quant.json`` holds the checkpoint's resolved recipe (``arch.source: unihcp_task``), so
``load_quantized`` rebuilds it without the checkpoint or the shards.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from foundation.quant.config import QuantConfig


def calibration_images(spec: str, cfg, n: int, batch_size: int, split: str = "train") -> Tensor:
    """The first ``n`` letterboxed images of ``spec``'s ``split`` (a ReID ``Q::G`` spec: its first part)."""
    from foundation.data import DataError
    from foundation.data.shards import build_eval_loader

    got, seen = [], 0
    for batch in build_eval_loader(spec.split("::")[0], cfg, batch_size=batch_size, split=split):
        got.append(batch["image"][: n - seen].float())
        seen += got[-1].shape[0]
        if seen >= n:
            break
    if not seen:
        raise DataError(f"{spec}: no calibration images in split {split!r}")
    return torch.cat(got)


def quantize_task(deploy, calib: Tensor, cfg: QuantConfig, log=None):
    """(quantized packed network, report) of a ``UniHCPDeploy`` (packed mode is switched on in a copy)."""
    import copy

    from foundation.quant.runner import quantize

    packed = copy.deepcopy(deploy)
    packed.packed = True
    qmodel, _, report = quantize(packed, calib, cfg, log=log)
    return qmodel, packed, report


def outputs_fn(deploy, packed_model: nn.Module, device="cpu"):
    """``images -> tuple`` of a packed (quantized) network, unpacked with ``deploy``'s shapes."""
    return lambda x: deploy.unpack(packed_model(x.to(device)).float())


@torch.no_grad()
def relative_error(a: nn.Module, b: nn.Module, images: Tensor, batch_size: int = 16) -> float:
    """‖a(x) − b(x)‖ / ‖a(x)‖ over ``images`` (packed outputs)."""
    num = den = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        ya, yb = a(x).float(), b(x).float()
        num += float((ya - yb).pow(2).sum())
        den += float(ya.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def run_quantize_cli(args, configs: list[QuantConfig]) -> int:
    """``foundation quantize`` on a UniHCP checkpoint: every method × bits on one task (``--task``)."""
    from evaluation.unihcp_robustness import PRIMARY, SECONDARY, score, task_network
    from foundation.artefacts import load_artefact_recipe
    from foundation.checkpoint_io import resolve_checkpoint
    from foundation.config import recipe_dict
    from foundation.data.shards import build_eval_loader
    from foundation.models.unihcp_export import TaskOutputs
    from foundation.quant.runner import save_quantized

    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else (
        "cuda" if args.device == "auto" else args.device)
    try:
        name, task, cfg, deploy, fp_model = task_network(args.checkpoint, getattr(args, "task", None), device,
                                                         data=args.data)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    recipe = load_artefact_recipe(resolve_checkpoint(args.checkpoint))  # gated when task_network read it
    kind, metric, second = task.kind, PRIMARY[task.kind], SECONDARY[task.kind]
    batch_size = configs[0].batch_size
    calib = calibration_images(args.data, cfg, max(c.calib_images for c in configs), batch_size)
    print(f"calibration: {calib.shape[0]} images from {args.data} (train split)")
    # as `quantize --help` says and the classifier path does: without --val, the calibration shards (not held out)
    val_spec, val_split = (args.val, "val") if args.val else (args.data, "train")
    val = build_eval_loader(val_spec, cfg, batch_size=min(batch_size, 64), split=val_split)
    fp = score(fp_model, kind, val, device)
    out = Path(args.out) if args.out else Path("runs") / "quant" / f"{Path(args.checkpoint).resolve().name}_{name}"
    rows = [{"model": f"unihcp/{name}", "method": "fp32", "bits": "FP32", "metric": metric,
             "value": fp.get(metric), second: fp.get(second), "eval": val_spec}]
    print(f"FP32 {metric} {fp.get(metric):.4f} ({second} {fp.get(second, float('nan')):.4f})")
    if args.onnx:  # the FP32 graph: onnxruntime against PyTorch, output by output
        from foundation.models.unihcp_export import OUTPUTS, OrtTask, export_onnx

        path = export_onnx(deploy.cpu(), out / "fp32.onnx")
        deploy.to(device)
        x = calib[:16]
        with torch.no_grad():
            ref = [o.cpu() for o in deploy(x.to(device))]
        got = OrtTask(path)(x.cpu())
        rows[0]["onnx"] = {"path": path, "deployment": "fp32",
                           "max_abs_diff": {n: float((a - b).abs().max()) for n, a, b in zip(OUTPUTS[kind], got, ref)}}
        print(f"FP32 ONNX in onnxruntime: max |onnxruntime - PyTorch| {rows[0]['onnx']['max_abs_diff']}")
    onnx_rows = {}
    for qcfg in configs:
        tag = f"{qcfg.method}_w{qcfg.wbits}a{qcfg.abits}{'_os' if qcfg.outlier.enabled else ''}_{qcfg.backend}"
        print(f"== {name} {tag}")
        t0 = time.perf_counter()
        qmodel, packed_fp, report = quantize_task(deploy, calib.to(device), qcfg, log=print)
        qnet = TaskOutputs(outputs_fn(deploy, qmodel, device), kind, deploy.keypoint_flip_pairs, module=qmodel)
        res = score(qnet, kind, val, device)
        row = {"model": f"unihcp/{name}", "method": qcfg.method, "bits": f"W{qcfg.wbits}A{qcfg.abits}",
               "backend": qcfg.backend, "metric": metric, "value": res.get(metric), "value_fp": fp.get(metric),
               "delta": (res.get(metric) or 0.0) - (fp.get(metric) or 0.0), second: res.get(second),
               f"{second}_fp": fp.get(second),
               "output_rel_error": relative_error(packed_fp, qmodel, calib[:32].to(device)),
               "ptq_seconds": round(time.perf_counter() - t0, 2), "calib_images": int(report["calib_images"]),
               "iters": qcfg.reconstruction.iters if qcfg.method != "rtn" else None,
               "units": [u["unit"] for u in report.get("method", {}).get("units", [])]}
        # self-contained: the checkpoint's resolved recipe (the task's vocabulary included) rebuilds the network
        save_quantized(qmodel, out / tag, {"source": "unihcp_task", "recipe": recipe_dict(recipe), "task": name},
                       extra={"source_checkpoint": str(args.checkpoint), "report": report})
        if args.onnx:
            onnx_rows[tag] = row["onnx"] = _onnx_row(deploy, qmodel, calib, out / tag, name)
            if "path" in row["onnx"]:  # the deployed graph scored like the others, and its distance from PyTorch's
                from foundation.models.unihcp_export import OrtTask

                ort = OrtTask(row["onnx"]["path"], unpack=deploy.unpack)
                res_ort = score(TaskOutputs(ort, kind, deploy.keypoint_flip_pairs), kind, val, "cpu")
                row["onnx"]["value"] = res_ort.get(metric)
                with torch.no_grad():
                    sim = qmodel.cpu()(calib[:32].cpu()).float()
                    got = torch.from_numpy(ort.session.run(None, {"image": calib[:32].cpu().numpy()})[0])
                row["onnx"]["rel_error_vs_pytorch_quantized"] = float((got - sim).norm() / sim.norm().clamp_min(1e-30))
                qmodel.to(device)
        rows.append(row)
        print(f"   {metric} {row['value']:.4f} (FP {fp.get(metric):.4f}, Δ {row['delta']:+.4f}); {second} "
              f"{row.get(second, float('nan')):.4f}; output error {100 * row['output_rel_error']:.2f}%; "
              f"PTQ {row['ptq_seconds']:.1f} s" + (f"; onnxruntime ({row['onnx'].get('deployment')}) {metric} "
                                                  f"{row['onnx']['value']:.4f}, output error vs PyTorch quantized "
                                                  f"{100 * row['onnx']['rel_error_vs_pytorch_quantized']:.2f}%"
                                                  if "value" in row.get("onnx", {}) else
                                                  (f"; ONNX: {row['onnx']['error']}" if "error" in row.get("onnx", {})
                                                   else "")))
        _write(out, rows)
    _write(out, rows)
    print(f"results: {out / 'results.json'} and {out / 'results.md'}")
    return 0


def _onnx_row(deploy, qmodel, calib, path: Path, name: str) -> dict:
    """The quantized network as QDQ ONNX (foundation.quant.onnx_export) when its operators export; else why not."""
    try:
        from foundation.quant.onnx_export import export_onnx

        info = export_onnx(qmodel.cpu(), calib[:1].cpu(), path / "model.onnx")
        return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
    except Exception as e:  # noqa: BLE001 - reported in the results, the PyTorch rows stand
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def _write(out: Path, rows: list[dict]) -> None:
    """``results.json`` / ``results.md``, merged with earlier runs into the same directory (same method, bits and
    backend: replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    key = ("model", "method", "bits", "backend")
    merged = {tuple(r.get(k) for k in key): r for r in (json.loads(path.read_text()) if path.exists() else [])}
    merged.update({tuple(r.get(k) for k in key): r for r in rows})
    rows = sorted(merged.values(), key=lambda r: (r["method"] != "fp32", r["bits"], r["method"]))
    path.write_text(json.dumps(rows, indent=2, default=float))
    lines = ["| task | method | bits | metric | value | Δ vs FP | second | output rel. error | PTQ s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sec = next((k for k in r if k in ("OKS", "pixel_accuracy", "F1", "rank1", "MR-2")), None)
        lines.append(f"| {r['model']} | {r['method']} | {r['bits']} | {r['metric']} | {r['value']:.4f} | "
                     f"{r.get('delta', 0.0):+.4f} | {sec} {r.get(sec) if r.get(sec) is None else round(r[sec], 4)} | "
                     f"{'' if 'output_rel_error' not in r else format(100 * r['output_rel_error'], '.2f') + '%'} | "
                     f"{r.get('ptq_seconds', '')} |")
    (out / "results.md").write_text("# UniHCP post-training quantization\n\n" + "\n".join(lines) + "\n")


__all__ = ["calibration_images", "outputs_fn", "quantize_task", "relative_error", "run_quantize_cli"]
