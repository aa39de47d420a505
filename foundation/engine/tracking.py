"""Tracking on rank 0: metrics.jsonl (always), W&B (online when logged in, else offline), console log,
progress bar. Other ranks get a tracker that does nothing, so the loop never asks who it is.

W&B drops every ``log`` whose step is below the run's last one, and a resumed run logs again the steps
between its checkpoint and the kill. So W&B's own step counts log calls over the run's whole life (the
lines of ``metrics.jsonl``, which is only ever appended to, or the resumed W&B run's step when that is
larger), and the training step travels as the metric ``train/step``, which every chart uses as its
x-axis: after a resume the replayed steps appear a second time at the same ``train/step``, nothing is lost.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("foundation")


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """Console (rank 0 only, warnings elsewhere) + ``run_dir/train.log``."""
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    log.addHandler(console)
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if wandb_logged_in() else "offline"
    return mode


class Tracker:
    """Writes what the loop measures. Create with ``Tracker.create``; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path | None, wandb_run=None, bar: tqdm | None = None):
        self.run_dir = run_dir
        self.wandb = wandb_run
        self.bar = bar
        self._wandb_step = 0  # W&B's step: one per log call over the run's life, never going back
        if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
            with open(run_dir / "metrics.jsonl", "rb") as f:
                self._wandb_step = sum(1 for _ in f)
        if wandb_run is not None:
            self._wandb_step = max(self._wandb_step, int(getattr(wandb_run, "step", 0) or 0))
            wandb_run.define_metric("train/step")
            wandb_run.define_metric("*", step_metric="train/step")
        self._metrics = open(run_dir / "metrics.jsonl", "a") if run_dir else None

    @classmethod
    def create(
        cls, run_dir: Path, is_main: bool, config: dict, *, wandb_mode: str, project: str, entity: str | None,
        tags: list[str], name: str, wandb_id: str | None, total_steps: int, start_step: int, progress: bool,
    ) -> Tracker:
        if not is_main:
            return cls(None)
        run = None
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            import wandb

            run = wandb.init(
                project=project, entity=entity, name=name, tags=tags, config=config, dir=str(run_dir),
                mode=mode, id=wandb_id, resume="allow", group=(config.get("logging") or {}).get("group"),
            )
            log.info("W&B %s run %s (%s)", mode, run.id, run.dir)
        bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True, disable=not progress,
                   file=sys.stderr, mininterval=1.0)
        return cls(run_dir, run, bar)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One JSON line in metrics.jsonl and one W&B log call."""
        if self._metrics is None:
            return
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.wandb is not None:
            self.wandb.log({**metrics, "train/step": step}, step=self._wandb_step)
        self._wandb_step += 1

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=True)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        (self.run_dir / "summary.json").write_text(json.dumps({k: _plain(v) for k, v in values.items()}, indent=2))
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._metrics is not None:
            self._metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _short(v: Any) -> str:
    v = _plain(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
