"""onnxruntime latency: our INT8 QDQ export vs the FP32 export vs onnxruntime's own quantize_static INT8.

Models (random weights — latency does not depend on them): timm resnet18 (224 px), a ViT-S/16 classifier
(timm vit_small_patch16_224) and both towers of a CLIP dual encoder as ``foundation`` builds it — the
ViT-B/32-shaped image tower (timm vit_base_patch32_224, CLIP-style pre-norm, + projection to 512) and the
12-layer open_clip text tower (ViT-B-32's: width 512, 77 tokens). Each is quantized W8A8 RTN (academic), exported,
and timed at batch 16 (resnet18 also at batch 1) with the three sessions alternated in every repetition
(paired runs), medians reported. The last line is one JSON object: per model ``ratio`` = FP32 time / our INT8
time at batch 16 (goal ≥ 2.0; resnet18's historical goal 2.2) and ``ours_vs_ort`` = our INT8 time /
onnxruntime's INT8 time (goal ≤ 1.1); resnet18's figures also stay at the top level.

    python benchmarks/int8_speed.py [--models resnet18,vit_s,clip_image,clip_text] [--threads 1] [--reps-b16 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

from foundation.quant.calibrate import predict
from foundation.quant.config import load_quant_config
from foundation.quant.onnx_export import (export_fp32_onnx, export_onnx, fused_op_counts, ort_predict,
                                          ort_quantize_static, ort_session)
from foundation.quant.runner import quantize


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "amx_int8": "amx_int8" in flags, "onnxruntime": ort.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


MODELS = ("resnet18", "vit_s", "clip_image", "clip_text")


def build(name: str) -> tuple[torch.nn.Module, str]:
    """(FP32 model, description)."""
    if name == "resnet18":
        return timm.create_model("resnet18", num_classes=1000), "timm resnet18, 224 px"
    if name == "vit_s":
        return timm.create_model("vit_small_patch16_224", num_classes=1000), "timm vit_small_patch16_224 classifier"
    from foundation.config import ModelConfig
    from foundation.models.dual_encoder import ImageTower, TextTower, build_dual_encoder

    cfg = ModelConfig(backbone="vit_base_patch32_224", kwargs={"pre_norm": True},
                      dual_encoder={"embed_dim": 512, "text": {"open_clip": "ViT-B-32"}})
    dual = build_dual_encoder(cfg, in_chans=3).eval()
    if name == "clip_image":
        return ImageTower(dual), "CLIP image tower: timm vit_base_patch32_224 (pre-norm) + projection 768->512"
    if name == "clip_text":
        return TextTower(dual), "CLIP text tower: open_clip ViT-B-32 text transformer (12 layers, width 512, 77 tokens)"
    raise SystemExit(f"error: unknown model {name!r} (choose from {', '.join(MODELS)})")


def inputs(name: str, model: torch.nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "clip_text":  # token ids of real-looking captions: start, words, end, padding
        text = model.text
        ctx, vocab = text.context_length if hasattr(text, "context_length") else 77, text.vocab_size
        tok = torch.zeros(n, ctx, dtype=torch.long)
        for i in range(n):
            length = int(torch.randint(6, 30, (1,), generator=g))
            tok[i, 0] = vocab - 2
            tok[i, 1:length] = torch.randint(1, vocab - 2, (length - 1,), generator=g)
            tok[i, length] = vocab - 1
        return tok
    return torch.randn(n, 3, 224, 224, generator=g)


def bench(name: str, args) -> dict:
    torch.manual_seed(0)
    model, description = build(name)
    model.eval()
    calib = inputs(name, model, args.calib_images)
    cfg = load_quant_config(None, {"method": "rtn", "wbits": 8, "abits": 8, "calib_images": args.calib_images,
                                   "batch_size": 16, "observers.weight": "minmax", "observers.act": "minmax"})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        qmodel, fp, report = quantize(model, calib, cfg)
        ours = export_onnx(qmodel, calib[:1], tmp / "ours_int8.onnx")
        fp32 = export_fp32_onnx(model, calib[:1], tmp / "fp32.onnx")
        ort_int8 = ort_quantize_static(fp32, calib, tmp / "ort_int8.onnx")
        paths = {"fp32": fp32, "ours_int8": Path(ours["path"]), "ort_int8": ort_int8}
        kernels = {k: fused_op_counts(p) for k, p in paths.items()}
        sessions = {k: ort_session(p, threads=args.threads) for k, p in paths.items()}

        check = calib[:8]
        sim = predict(qmodel, check).numpy()
        dep = ort_predict(sessions["ours_int8"], check, batch_size=8)
        ref = predict(model, check).numpy()
        ort_out = ort_predict(sessions["ort_int8"], check, batch_size=8)

        def cos(a, b) -> float:
            return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))

        fidelity = {"ours_sim_vs_deployed_max_abs_diff": float(np.abs(sim - dep).max()),
                    "ours_deployed_vs_fp32_min_cosine": cos(dep, ref), "ort_int8_vs_fp32_min_cosine": cos(ort_out, ref)}
        if name in ("resnet18", "vit_s"):
            fidelity["ours_sim_vs_deployed_top1_agreement"] = float((sim.argmax(1) == dep.argmax(1)).mean())

        ms: dict[str, dict[str, float]] = {}
        batches = ((1, args.reps_b1), (16, args.reps_b16)) if name == "resnet18" else ((16, args.reps_b16),)
        for batch, reps in batches:
            x = inputs(name, model, batch, seed=1).numpy()
            feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
            for k, s in sessions.items():
                for _ in range(2):
                    s.run(None, feeds[k])
            times: dict[str, list[float]] = {k: [] for k in sessions}
            names = list(sessions)
            for r in range(reps):
                for k in names[r % 3:] + names[: r % 3]:  # rotate the order every repetition
                    t0 = time.perf_counter()
                    sessions[k].run(None, feeds[k])
                    times[k].append(time.perf_counter() - t0)
            ms[f"b{batch}"] = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
            print(f"{name} batch {batch:2d}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms[f"b{batch}"].items()),
                  flush=True)
    b16 = ms["b16"]
    out = {"model": description, "ratio": round(b16["fp32"] / b16["ours_int8"], 3), "goal": 2.0,
           "ours_vs_ort": round(b16["ours_int8"] / b16["ort_int8"], 3), "goal_ours_vs_ort": 1.1,
           "ort_ratio_b16": round(b16["fp32"] / b16["ort_int8"], 3), "median_ms": ms, "fidelity": fidelity,
           "deployment": ours["deployment"], "linear_attention_split": len(report.get("linear_attention", [])),
           "int8_kernels": {k: {op: n for op, n in v.items() if op.startswith("QLinear") or op.startswith("MatMulInteger")
                                or op in ("QGemm", "Conv", "MatMul", "Gemm", "FusedMatMul")}
                            for k, v in kernels.items()}}
    if "b1" in ms:
        b1 = ms["b1"]
        out.update({"ratio_b1": round(b1["fp32"] / b1["ours_int8"], 3), "ort_ratio_b1": round(b1["fp32"] / b1["ort_int8"], 3),
                    "ours_vs_ort_b1": round(b1["ours_int8"] / b1["ort_int8"], 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--reps-b1", type=int, default=30)
    ap.add_argument("--reps-b16", type=int, default=8)
    ap.add_argument("--calib-images", type=int, default=32)
    args = ap.parse_args()

    results = {name: bench(name, args) for name in args.models.split(",") if name}
    result = {"bench": "int8_speed"}
    if "resnet18" in results:  # the historical top-level fields
        r = results["resnet18"]
        result.update({k: r[k] for k in ("ratio", "ours_vs_ort", "goal_ours_vs_ort", "ratio_b1", "ort_ratio_b1",
                                         "ort_ratio_b16", "ours_vs_ort_b1", "median_ms")}, goal=2.2)
    result.update({"models": results, "threads": args.threads, "reps": {"b1": args.reps_b1, "b16": args.reps_b16},
                   "quantization": "W8A8 RTN, academic: per-channel int8 weights, uint8 per-tensor activations, minmax",
                   "machine": machine()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
