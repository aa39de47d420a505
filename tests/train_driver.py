"""Runs `foundation train` in a subprocess for the tests (plain, under torchrun, or under deepspeed).

Test-only faults, applied by patching from outside the library:
  --die-after-save N   SIGKILL this process right after checkpoint step_N is complete
  --die-during-save N  SIGKILL this process while checkpoint step_N is being written (state file half-written)
Every rank writes its summary to SUMMARY_OUT.rank<R>.json.
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--die-after-save", type=int)
    ap.add_argument("--die-during-save", type=int)
    ap.add_argument("--summary-out")
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
    summary = train_mod.train(load_recipe(args.recipe, args.overrides))
    if args.summary_out:
        with open(f"{args.summary_out}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(summary, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
