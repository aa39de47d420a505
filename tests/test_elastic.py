"""Elastic restarts: launch/torchrun.sh with --max-restarts survives a killed worker, resumes from the
last checkpoint and ends with the weights of a run that was never interrupted; a collective waiting on
a rank that never comes fails after parallel.timeout_s instead of hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import PYTHON, REPO, tiny_recipe, write_recipe
from foundation.engine.checkpoint import find_latest

LAUNCH = str(REPO / "launch" / "torchrun.sh")
TORCHRUN = str(Path(PYTHON).parent / "torchrun")


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(REPO)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def worker_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def find_worker(agent: int, rank: int, restart: int) -> int | None:
    for pid in children(agent):
        e = worker_env(pid)
        if e.get("RANK") == str(rank) and e.get("TORCHELASTIC_RESTART_COUNT") == str(restart):
            return pid
    return None


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_with_same_weights(digits_shards, tmp_path):
    sections = dict(train={"steps": 24, "save_every": 8, "eval_every": 1000})
    straight = write_recipe(tmp_path / "a.yaml", tiny_recipe(digits_shards, tmp_path, "straight", **sections))
    elastic = write_recipe(tmp_path / "b.yaml", tiny_recipe(digits_shards, tmp_path, "elastic", **sections))
    done = subprocess.run([LAUNCH, "2", str(straight)], capture_output=True, text=True, cwd=REPO, env=env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    log = open(tmp_path / "elastic.log", "w+")
    job = subprocess.Popen([LAUNCH, "--max-restarts", "2", "2", str(elastic)], stdout=log, stderr=subprocess.STDOUT,
                           cwd=REPO, env=env(), start_new_session=True)
    try:
        ckpts = tmp_path / "elastic" / "checkpoints"
        victim = None
        deadline = time.monotonic() + 240
        while victim is None and job.poll() is None and time.monotonic() < deadline:
            if ckpts.is_dir() and find_latest(ckpts) is not None:
                victim = find_worker(job.pid, rank=1, restart=0)
            time.sleep(0.05)
        assert victim is not None, "no checkpoint and live rank-1 worker seen: " + log_tail(log)
        os.kill(victim, signal.SIGKILL)
        assert job.wait(timeout=240) == 0, log_tail(log)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    text = log_tail(log, 100_000)
    assert "resumed from" in text, text[-4000:]  # the restarted workers took up the checkpoint
    assert find_latest(ckpts).name == "step_24"
    wa = load_file(str(tmp_path / "straight/checkpoints/step_24/model.safetensors"))
    wb = load_file(str(ckpts / "step_24" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa), [k for k in wa if not (wa[k] == wb[k]).all()][:5]


def log_tail(log, n: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-n:]


@pytest.mark.slow
def test_collective_on_a_missing_rank_times_out(tmp_path):
    """Rank 1 never reaches the barrier: rank 0 fails after parallel.timeout_s instead of waiting for ever."""
    out = subprocess.run(
        [TORCHRUN, "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
         f"--rdzv-id=timeout-{os.getpid()}", __file__, "barrier"],
        capture_output=True, text=True, cwd=REPO, env=env(), timeout=120)
    assert out.returncode != 0
    assert "rank 0 reached the barrier" in out.stdout and "rank 0 barrier returned" not in out.stdout
    assert "timed out" in out.stderr.lower() or "timeout" in out.stderr.lower(), out.stderr[-3000:]


def _barrier_worker() -> None:
    """Under torchrun: open the group with a 3 s timeout; rank 1 stalls, rank 0 waits at a barrier."""
    import torch.distributed as dist

    from foundation.config import ParallelConfig
    from foundation.engine.distributed import init_distributed

    info = init_distributed(ParallelConfig(backend="ddp", timeout_s=3), device="cpu")
    if info.rank == 1:
        time.sleep(60)
        return
    print("rank 0 reached the barrier", flush=True)
    dist.barrier()
    print("rank 0 barrier returned", flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["barrier"]:
    _barrier_worker()
