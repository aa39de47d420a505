"""A killed trainer leaves nothing behind: its DataLoader workers die with it, no shared memory is left.

Without a parent-death signal a worker notices its dead parent only through torch's watchdog, which looks
every 5 s, and then may never exit (it joins its queue's feeder thread, blocked on a pipe nobody reads:
measured with real-size batches, ~620 MB each under pid 1). Here the batches are small enough that the
watchdog's exit goes through, so the test gives the workers 3 s: with the signal they are gone at once,
without it (measured) they are all still there."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import PYTHON, REPO, tiny_recipe, write_recipe


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def torch_shm() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("torch_")} if shm.is_dir() else set()


@pytest.mark.slow
def test_sigkilled_trainer_leaves_no_worker_alive(digits_shards, tmp_path):
    recipe = tiny_recipe(digits_shards, tmp_path, "killed", train={"steps": 100000, "log_every": 1, "eval_every": 100000,
                                                                   "save_every": 100000})
    recipe["data"]["workers"] = 2
    path = write_recipe(tmp_path / "killed.yaml", recipe)
    shm_before = torch_shm()
    trainer = subprocess.Popen([PYTHON, "-m", "foundation.cli", "train", str(path)], cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "killed" / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.is_file() and metrics.read_text().count("train/loss") >= 2):  # training, workers up
            assert trainer.poll() is None, "the trainer stopped by itself"
            assert time.monotonic() < deadline, "no training step within 180 s"
            time.sleep(0.5)
        descendants = [p.pid for p in psutil.Process(trainer.pid).children(recursive=True)]
        assert len(descendants) >= 2, descendants  # the two workers
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=30)
        deadline = time.monotonic() + 3
        while alive(descendants) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(descendants) == [], [psutil.Process(p).cmdline() for p in alive(descendants)]
        assert torch_shm() <= shm_before
    finally:
        if trainer.poll() is None:
            trainer.kill()
