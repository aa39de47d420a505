"""W&B logging across a kill and a resume: W&B's step never goes back, the training step rides along."""

from __future__ import annotations

import json
import sys
import types

from foundation.engine.tracking import Tracker


class FakeRun:
    """Records what W&B would receive and, like W&B, drops a log whose step is below the last one."""

    def __init__(self, run_id: str, history: list[dict]):
        self.id, self.dir, self.history = run_id, "", history
        self.step = max((h["_step"] for h in history), default=-1) + 1  # a resumed run continues its step
        self.summary: dict = {}
        self.metrics: list[tuple] = []

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.metrics.append((name, step_metric))

    def log(self, data: dict, step: int) -> None:
        if self.history and step < self.history[-1]["_step"]:
            return  # what W&B does: "Tried to log to step N that is less than the current step M"
        self.history.append({**data, "_step": step})

    def finish(self) -> None:
        pass


def test_resumed_run_logs_replayed_steps_without_loss(tmp_path, monkeypatch):
    history: list[dict] = []  # the W&B run's history, kept by the "server" across processes
    fake = types.SimpleNamespace(init=lambda **kw: FakeRun(kw["id"] or "run1", history))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def tracker(start_step: int, wandb_id: str | None) -> Tracker:
        return Tracker.create(tmp_path, True, {}, wandb_mode="offline", project="p", entity=None, tags=[],
                              name="n", wandb_id=wandb_id, total_steps=20, start_step=start_step, progress=False)

    first = tracker(0, None)
    for step in range(1, 13):  # checkpoint at 10, killed after logging 12
        first.log(step, {"train/loss": float(step)})
    assert first.wandb.metrics == [("train/step", None), ("*", "train/step")]
    run_id = first.wandb_id
    second = tracker(10, run_id)  # resumed from step_10: steps 11 and 12 are logged again
    for step in range(11, 21):
        second.log(step, {"train/loss": 100.0 + step})
    second.close()

    steps = [h["_step"] for h in history]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) == 12 + 10  # nothing dropped
    assert [h["train/step"] for h in history] == list(range(1, 13)) + list(range(11, 21))
    assert history[-1]["train/loss"] == 120.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [h["train/step"] for h in history]
