"""Training batches of a run: one resumable stream per task, and which task(s) each step trains.

``SingleStream`` is a single-task recipe's loader as it always was. ``TaskStreams`` holds one loader
per task and a schedule: ``mix`` draws a batch of every task each step, ``sample`` one task per step
chosen by weight from an RNG seeded with (seed, step) — so a resumed run draws the same sequence —
and ``groups`` the task this rank's group owns. Both give the loop ``next(step)``, ``position()``
(saved in checkpoints), skip counts and reports.
"""

from __future__ import annotations

import hashlib
import random

from foundation.data.shards import TrainLoader


def stream_seed(seed: int, task: str) -> int:
    """Each task's data stream gets its own seed, so two tasks over the same shards differ."""
    digest = hashlib.blake2b(f"{seed}:{task}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def sample_task(names: list[str], weights: list[float], seed: int, step: int) -> str:
    """The task ``sample`` trains at ``step``: a function of (seed, step) only."""
    digest = hashlib.blake2b(f"{seed}:sample:{step}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little")).choices(names, weights=weights)[0]


class SingleStream:
    """The one loader of a single-task run: ``next(step)`` is a plain batch."""

    def __init__(self, loader: TrainLoader):
        self.loader = loader
        self._batches = iter(loader)

    def next(self, step: int) -> dict:
        return next(self._batches)

    def tasks_at(self, step: int) -> list[str]:
        return []

    def position(self) -> dict:
        return self.loader.position()

    @property
    def skipped(self) -> dict[str, int]:
        return {"": self.loader.skipped}

    def pop_skip_reports(self) -> list[str]:
        return self.loader.pop_skip_reports()

    def epoch(self) -> dict[str, float | None]:
        return {"": self.loader.epoch()}


class TaskStreams:
    """One loader per task (only this rank's task under ``groups``); ``next(step)`` is
    ``{task: batch}`` for the tasks the schedule trains at ``step``, each batch carrying ``task``."""

    def __init__(self, loaders: dict[str, TrainLoader], schedule: str, weights: dict[str, float], seed: int):
        self.loaders = loaders
        self._batches = {name: iter(loader) for name, loader in loaders.items()}
        self.schedule = schedule
        self.names = list(weights)
        self.weights = [weights[n] for n in self.names]
        self.seed = seed

    def tasks_at(self, step: int) -> list[str]:
        if self.schedule == "sample":
            return [sample_task(self.names, self.weights, self.seed, step)]
        return list(self.loaders)  # mix: every task; groups: the one loader this rank has

    def next(self, step: int) -> dict[str, dict]:
        return {name: self.next_of(name) for name in self.tasks_at(step)}

    def next_of(self, name: str) -> dict:
        """One more batch of one task (its own accumulation, ``tasks.<name>.grad_accum``)."""
        return {**next(self._batches[name]), "task": name}

    def position(self) -> dict[str, dict]:
        return {name: loader.position() for name, loader in self.loaders.items()}

    @property
    def skipped(self) -> dict[str, int]:
        return {name: loader.skipped for name, loader in self.loaders.items()}

    def pop_skip_reports(self) -> list[str]:
        return [f"[{name}] {r}" for name, loader in self.loaders.items() for r in loader.pop_skip_reports()]

    def epoch(self) -> dict[str, float | None]:
        return {name: loader.epoch() for name, loader in self.loaders.items()}


__all__ = ["SingleStream", "TaskStreams", "sample_task", "stream_seed"]
