"""``train.schedule: groups`` keeps the ranks one model: BatchNorm in the shared part is refused, an fp16
overflow found on one rank is skipped by every rank, and the digest that compares ranks covers buffers."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import PYTHON, REPO
from foundation.config import RecipeError
from foundation.engine.distributed import TaskGroups


class TwoHeads(nn.Module):
    def __init__(self, shared: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = shared
        self.tasks = nn.ModuleDict({"a": head, "b": nn.Linear(4, 2)})


def test_groups_refuse_batchnorm_in_the_shared_part():
    with pytest.raises(RecipeError, match=r"BatchNorm .*backbone\.1.*LayerNorm/GroupNorm"):
        TaskGroups.check_shared(TwoHeads(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2)))
    # a task's own BatchNorm (trained by its group only, broadcast from it) and LayerNorm are fine
    TaskGroups.check_shared(TwoHeads(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
                                     nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))))


def test_digest_covers_buffers():
    from foundation.train import weights_digest

    class Alone:  # what weights_digest reads of an Engine
        def __init__(self, module):
            self.module, self.is_deepspeed = module, False
            self.info = type("Info", (), {"backend": "single"})()

    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    before = weights_digest(Alone(net))
    net[1].running_mean += 1.0  # parameters untouched, statistics moved
    assert weights_digest(Alone(net)) != before


WORKER = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from torch import nn
    from foundation.config import ParallelConfig, TrainConfig
    from foundation.engine.distributed import DistInfo, Engine, TaskGroups

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    module = nn.Module()
    module.backbone = nn.Linear(4, 4)
    module.tasks = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})
    groups = TaskGroups({"a": 0.5, "b": 0.5}, 2, rank)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    info = DistInfo(rank, 2, 0, torch.device("cpu"), "ddp")
    engine = Engine(module, opt, info, ParallelConfig(), TrainConfig(), groups=groups)
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # fp16's scaler; fp16 itself needs CUDA
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    x = torch.randn(8, 4)
    engine.backward(module.tasks[groups.task](module.backbone(x)).pow(2).mean(), accum=1)
    if rank == int(sys.argv[4]):  # an overflow in this rank's own head only
        module.tasks[groups.task].weight.grad[0, 0] = float("inf")
    norm = engine.step(clip=1.0, skip=False)
    moved = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    json.dump({"norm": norm, "moved": moved, "scale": engine.scaler.get_scale()}, open(out, "w"))
    dist.destroy_process_group()
''')


@pytest.mark.slow
@pytest.mark.parametrize("bad_rank", [0, 1])
def test_fp16_overflow_on_one_rank_is_skipped_by_every_rank(tmp_path, bad_rank):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([PYTHON, str(script), str(r), str(tmp_path / "store"), str(tmp_path / f"r{r}.json"),
                               str(bad_rank)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1)]
    for r in results:  # nobody steps (not even the rank whose gradients were finite), both scales back off
        assert r["norm"] is None and r["moved"] == [] and r["scale"] == 2.0**7, results
