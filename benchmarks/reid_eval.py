"""ReID evaluation speed: our vectorised CMC/mAP (evaluation/human/reid.py) against the plain per-query numpy
loop (torchreid's ``eval_market1501``), on one synthetic 2,000-query × 20,000-gallery distance matrix.

The features are synthetic identities (1,000 ids in 6 cameras, gallery with distractors and junk), the
distance matrix is computed once; each round times ours and the reference back to back (alternating
which goes first), on the same matrix. ``ratio`` = median reference time / median our time (ours faster
is > 1); the results must be equal (CMC exactly, mAP to 1e-9) or the benchmark fails.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reid_eval.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.human.reid import evaluate_reid, evaluate_reid_reference, pairwise_distance  # noqa: E402
from _bench import parse_args  # noqa: E402 (benchmarks/_bench.py)

SMOKE = {"queries": 50, "gallery": 200, "ids": 20, "rounds": 1}  # --smoke


def synthetic(num_q: int, num_g: int, ids: int, dim: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids + 1, dim)).astype(np.float32)
    q_pids = rng.integers(1, ids + 1, num_q)
    g_pids = rng.integers(1, ids + 1, num_g)
    g_pids[: num_g // 20] = 0  # distractors
    g_pids[num_g // 20: num_g // 10] = -1  # junk
    q_cams, g_cams = rng.integers(1, 7, num_q), rng.integers(1, 7, num_g)
    q = centres[q_pids] + rng.normal(scale=1.3, size=(num_q, dim)).astype(np.float32)
    g = centres[np.maximum(g_pids, 0)] + rng.normal(scale=1.3, size=(num_g, dim)).astype(np.float32)
    return pairwise_distance(q, g), q_pids, g_pids, q_cams, g_cams


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "numpy": np.__version__, "python": platform.python_version(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--gallery", type=int, default=20000)
    ap.add_argument("--ids", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap, SMOKE)

    data = synthetic(args.queries, args.gallery, args.ids, args.dim, args.seed)
    ours_t, ref_t = [], []
    ours = ref = None
    for r in range(args.rounds):
        order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
        for side in order:
            t0 = time.perf_counter()
            if side == "ours":
                ours = evaluate_reid(*data)
                ours_t.append(time.perf_counter() - t0)
            else:
                ref = evaluate_reid_reference(*data)
                ref_t.append(time.perf_counter() - t0)
    equal = (ours["cmc"] == ref["cmc"] and abs(ours["mAP"] - ref["mAP"]) < 1e-9
             and ours["valid_queries"] == ref["valid_queries"])
    o, f = statistics.median(ours_t), statistics.median(ref_t)
    print(f"ours {o:.3f} s, reference loop {f:.3f} s; rank1 {ours['rank1']:.4f} mAP {ours['mAP']:.4f} "
          f"(reference rank1 {ref['rank1']:.4f} mAP {ref['mAP']:.4f})", file=sys.stderr)
    print(json.dumps({
        "bench": "reid_eval", "ratio": round(f / o, 3), "goal": 1.0, "equal_results": bool(equal),
        "ours_s": round(o, 4), "reference_s": round(f, 4), "ours_all_s": [round(t, 4) for t in ours_t],
        "reference_all_s": [round(t, 4) for t in ref_t], "queries": args.queries, "gallery": args.gallery,
        "rank1": ours["rank1"], "rank5": ours["rank5"], "rank10": ours["rank10"], "mAP": ours["mAP"],
        "mAP_reference": ref["mAP"], "valid_queries": ours["valid_queries"], "machine": machine(),
    }))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
