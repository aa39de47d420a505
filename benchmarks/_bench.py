"""What the benchmark scripts share (not a benchmark itself: tests/test_benchmarks.py runs the others)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch


def parse_args(ap: argparse.ArgumentParser, smoke: dict) -> argparse.Namespace:
    """The script's arguments; ``--smoke`` replaces them with ``smoke``, its smallest settings (the script runs
    through and prints its JSON line; the figures mean nothing: tests/test_benchmarks.py keeps it running)."""
    ap.add_argument("--smoke", action="store_true", help="smallest settings: runs through and prints its JSON line "
                                                         f"(figures mean nothing): {smoke}")
    args = ap.parse_args()
    if args.smoke:
        vars(args).update(smoke)
    return args


def step_args(smoke: dict) -> tuple[argparse.Namespace, Callable[[], float]]:
    """The engine-step benchmarks' options (--steps, --rounds, --batch-size, --timer) and the clock ``--timer``
    picks: this process's CPU time (the default; other jobs on a shared machine disturb it far less than wall
    time) or perf_counter. Torch threads: OMP_NUM_THREADS (default 2)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--timer", choices=["process", "wall"], default="process")
    args = parse_args(ap, smoke)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    return args, (time.process_time if args.timer == "process" else time.perf_counter)


class MemoryLoader:
    """The training reader's interface over batches already in memory; records when each batch is taken
    (``clock()`` appended to ``stamps`` when given)."""

    def __init__(self, batches: list[dict], stamps: list[float] | None, clock: Callable[[], float]):
        self.batches, self.stamps, self.clock, self.i = batches, stamps, clock, 0
        self.skipped = 0

    def __iter__(self) -> MemoryLoader:
        return self

    def __next__(self) -> dict:
        if self.stamps is not None:
            self.stamps.append(self.clock())
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def position(self) -> dict:
        return {}

    def pop_skip_reports(self) -> list[str]:
        return []

    def epoch(self) -> None:
        return None
