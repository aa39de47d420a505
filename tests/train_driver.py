"""Runs `foundation train` in a subprocess for the tests (plain, under torchrun, or under deepspeed).

Test-only faults, applied by patching from outside the library:
  --die-after-save N   SIGKILL this process right after checkpoint step_N is complete
  --die-during-save N  SIGKILL this process while checkpoint step_N is being written (state file half-written)
  --same-global-batch  every rank reads the global batch (its stream built as one process's, with the
                       batch sizes times the ranks sharing it) and trains on its rank's slice: a one-process
                       run of the recipe with those batch sizes reads the same samples, so the two can be
                       compared number for number (tests/test_equivalence.py)
  --also RECIPE        (repeatable) train these recipes too, one after the other in the same processes (one
                       launch for many short runs); the overrides apply to the first recipe only
Every rank writes its summary to SUMMARY_OUT.rank<R>.json (an --also run's to SUMMARY_OUT.<i>.rank<R>.json, i = 1, 2...).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

import foundation.train as train_mod
from foundation.config import load_recipe
from foundation.engine.distributed import DistInfo


def slice_batch(batch, part: int, parts: int, n: int | None = None):
    """Rank ``part``'s share of a global batch: every tensor and list with the batch's length (that of
    its ``image``) along the first axis; a multi-task batch ``{task: batch}`` task by task."""
    if isinstance(batch, dict):
        if "image" in batch:
            n = len(batch["image"])
        return {k: slice_batch(v, part, parts, n) for k, v in batch.items()}
    if n is not None and isinstance(batch, (torch.Tensor, list, tuple)) and len(batch) == n:
        k = n // parts
        return batch[part * k:(part + 1) * k]
    return batch


class SlicedStreams:
    """A stream built for one process over the global batch, serving this rank its slice."""

    def __init__(self, inner, part: int, parts: int):
        self.inner, self.part, self.parts = inner, part, parts

    def next(self, step: int) -> dict:
        return slice_batch(self.inner.next(step), self.part, self.parts)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def global_batch_streams(real_build):
    def build(recipe, task, info, groups, position, reseed):
        parts, part = (groups.group_size, groups.group_rank) if groups else (info.world_size, info.rank)
        train = recipe.train.model_copy(update={"batch_size": recipe.train.batch_size * parts})
        update = {"train": train}
        if recipe.tasks is not None:
            update["tasks"] = {n: e.model_copy(update={"batch_size": (e.batch_size or recipe.train.batch_size) * parts})
                               for n, e in recipe.tasks.items()}
        one = DistInfo(0, 1, 0, info.device, info.backend)
        alone = None
        if groups is not None:
            alone = type("OneRankGroup", (), {"task": groups.task, "group_rank": 0, "group_size": 1})()
        return SlicedStreams(real_build(recipe.model_copy(update=update), task, one, alone, position, reseed), part, parts)
    return build


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--die-after-save", type=int)
    ap.add_argument("--die-during-save", type=int)
    ap.add_argument("--summary-out")
    ap.add_argument("--same-global-batch", action="store_true")
    ap.add_argument("--also", action="append", default=[])
    args = ap.parse_args()

    real_save = train_mod.save_checkpoint
    real_torch_save = torch.save

    def save_then_maybe_die(root, step, *a, **kw):
        if step == args.die_during_save:
            def half_write(obj, f, *sa, **skw):
                with open(f, "wb") as fh:
                    fh.write(b"PK\x03\x04 half written")
                    fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save = half_write
        path = real_save(root, step, *a, **kw)
        torch.save = real_torch_save
        if step == args.die_after_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    train_mod.save_checkpoint = save_then_maybe_die
    if args.same_global_batch:
        train_mod.build_streams = global_batch_streams(train_mod.build_streams)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    for i, path in enumerate([args.recipe, *args.also]):
        # each run opens its own process group: under torchrun its rendezvous keys get their own prefix
        os.environ["TORCHELASTIC_RESTART_COUNT"] = f"{attempt}.{i}" if i else attempt
        summary = train_mod.train(load_recipe(path, args.overrides if i == 0 else []))
        if args.summary_out:
            suffix = f".{i}" if i else ""
            with open(f"{args.summary_out}{suffix}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
                json.dump(summary, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
