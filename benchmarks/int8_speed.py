"""onnxruntime latency: our INT8 QDQ export vs the FP32 export vs onnxruntime's own quantize_static INT8.

Same model (timm resnet18, 224 px, random weights — latency does not depend on them), batch 1 and 16,
the three sessions alternated in every repetition, medians reported. The last line is one JSON object:
``ratio`` = FP32 time / our INT8 time at batch 16 (goal ≥ 2.2), and ``ours_vs_ort`` = our INT8 time /
onnxruntime's INT8 time at batch 16 (goal ≤ 1.1).

    python benchmarks/int8_speed.py [--threads 1] [--reps-b1 30] [--reps-b16 8]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--reps-b1", type=int, default=30)
    ap.add_argument("--reps-b16", type=int, default=8)
    ap.add_argument("--calib-images", type=int, default=32)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1000).eval()
    calib = torch.randn(args.calib_images, 3, 224, 224)
    cfg = load_quant_config(None, {"method": "rtn", "wbits": 8, "abits": 8, "calib_images": args.calib_images,
                                   "batch_size": 16, "observers.weight": "minmax", "observers.act": "minmax"})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        qmodel, fp, _ = quantize(model, calib, cfg)
        ours = export_onnx(qmodel, calib[:1], tmp / "ours_int8.onnx")
        fp32 = export_fp32_onnx(model, calib[:1], tmp / "fp32.onnx")
        ort_int8 = ort_quantize_static(fp32, calib, tmp / "ort_int8.onnx")
        paths = {"fp32": fp32, "ours_int8": Path(ours["path"]), "ort_int8": ort_int8}
        kernels = {k: fused_op_counts(p) for k, p in paths.items()}
        sessions = {k: ort_session(p, threads=args.threads) for k, p in paths.items()}

        check = calib[:8]
        sim = predict(qmodel, check).numpy()
        dep = ort_predict(sessions["ours_int8"], check, batch_size=8)
        sim_agree = float((sim.argmax(1) == dep.argmax(1)).mean())
        sim_maxdiff = float(np.abs(sim - dep).max())

        ms: dict[str, dict[str, float]] = {}
        for batch, reps in ((1, args.reps_b1), (16, args.reps_b16)):
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
            for s in sessions.values():
                for _ in range(2):
                    s.run(None, {"image": x})
            times: dict[str, list[float]] = {k: [] for k in sessions}
            names = list(sessions)
            for r in range(reps):
                for k in names[r % 3:] + names[: r % 3]:  # rotate the order every repetition
                    t0 = time.perf_counter()
                    sessions[k].run(None, {"image": x})
                    times[k].append(time.perf_counter() - t0)
            ms[f"b{batch}"] = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
            print(f"batch {batch:2d}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms[f"b{batch}"].items()))

    b1, b16 = ms["b1"], ms["b16"]
    result = {
        "bench": "int8_speed",
        "ratio": round(b16["fp32"] / b16["ours_int8"], 3),
        "goal": 2.2,
        "ours_vs_ort": round(b16["ours_int8"] / b16["ort_int8"], 3),
        "goal_ours_vs_ort": 1.1,
        "ratio_b1": round(b1["fp32"] / b1["ours_int8"], 3),
        "ort_ratio_b1": round(b1["fp32"] / b1["ort_int8"], 3),
        "ort_ratio_b16": round(b16["fp32"] / b16["ort_int8"], 3),
        "ours_vs_ort_b1": round(b1["ours_int8"] / b1["ort_int8"], 3),
        "median_ms": ms,
        "sim_vs_deployed": {"agreement": sim_agree, "max_abs_logit_diff": sim_maxdiff},
        "int8_kernels": {k: {op: n for op, n in v.items() if op.startswith("QLinear") or op in ("QGemm", "Conv")}
                         for k, v in kernels.items()},
        "model": "timm resnet18, 224 px, W8A8 RTN (academic: per-channel int8 weights, uint8 activations)",
        "threads": args.threads,
        "reps": {"b1": args.reps_b1, "b16": args.reps_b16},
        "machine": machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
