#!/usr/bin/env python
"""Set a run up as ``foundation train`` does (resume included) and dump what it resumed, then stop.

    fsdp_driver.py RECIPE OUT [overrides...]

Every rank writes OUT.rank<R>.pt: the task's full weights and the optimizer's full state keyed by parameter
name (both through torch.distributed.checkpoint.state_dict, whatever the backend), the step and its data
position. tests/test_fsdp.py compares what each backend and world size loads from one checkpoint.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from foundation.config import load_recipe
from foundation.engine.distributed import close_distributed, init_distributed
from foundation.train import set_up


def main() -> int:
    recipe_path, out, *overrides = sys.argv[1:]
    recipe = load_recipe(recipe_path, overrides)
    info = init_distributed(recipe.parallel, recipe.train.device)
    try:
        run = set_up(recipe, info)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(run.task, options=full)
        optim = get_optimizer_state_dict(run.task, run.optimizer, options=full)
        torch.save({"model": model, "optim": optim, "step": run.start_step, "data": run.streams.position(),
                    "backend": info.backend, "world_size": info.world_size}, f"{out}.rank{info.rank}.pt")
        run.tracker.close()
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
