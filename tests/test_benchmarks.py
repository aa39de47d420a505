"""Every script in benchmarks/ runs with its smallest settings and prints its JSON line with the keys its
reports read (full tier: a benchmark that no longer runs is found here, not on a lent GPU). Never a time:
the figures of a smoke run mean nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from conftest import PYTHON, REPO

pytestmark = pytest.mark.slow

SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))

# the smallest settings of a script without --smoke
ARGS = {"int8_speed.py": ["--models", "resnet18", "--reps-b1", "1", "--reps-b16", "1", "--calib-images", "4"]}

# what each JSON line must hold besides "bench" (the figures docs/benchmarks.md and the GPU check read)
KEYS = {
    "clip_mfu.py": {"backend", "mfu", "tflops_per_s", "step_ms", "flops_per_step"},
    "clip_throughput.py": {"ratio", "goal", "declip_over_clip", "ours_samples_per_s", "open_clip_train_samples_per_s",
                           "declip_samples_per_s", "step_ms_median"},
    "data_resume.py": {"ratio", "goal", "first_batch_s", "position_bytes"},
    "engine_overhead.py": {"ratio", "goal", "models"},
    "feature_extraction.py": {"ratio", "goal", "extractor_img_s", "bare_img_s"},
    "fsdp_memory.py": {"ratio", "goal", "fsdp2_mib", "ddp_mib", "step_time_ratio"},
    "int8_speed.py": {"ratio", "ours_vs_ort", "models"},
    "loader.py": {"ratio", "goal", "sizes"},
    "multitask_overhead.py": {"ratio", "goal", "multi_step_ms", "singles_step_ms"},
    "reid_eval.py": {"ratio", "goal", "equal_results", "mAP"},
    "unihcp_step.py": {"ratio", "goal", "forward_ms", "targets_loss_ms", "backward_ms", "step_ms"},
}


def test_every_script_is_listed():
    assert set(SCRIPTS) == set(KEYS), "a new benchmark says here what its JSON line holds"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke_run_prints_its_json_line(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    out = subprocess.run([PYTHON, str(REPO / "benchmarks" / script), *ARGS.get(script, ["--smoke"])], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=840)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"bench"')]
    assert lines, out.stdout[-2000:]
    result = json.loads(lines[-1])
    assert result["bench"] == script.removesuffix(".py")
    assert KEYS[script] <= result.keys(), sorted(KEYS[script] - result.keys())
    if "ratio" in KEYS[script]:
        assert isinstance(result["ratio"], float) and math.isfinite(result["ratio"]) and result["ratio"] > 0
    if script == "reid_eval.py":
        assert result["equal_results"] is True  # the vectorised evaluation gives the reference loop's figures
