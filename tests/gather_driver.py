"""Run under torchrun (2 ranks, gloo) by tests/test_losses.py: local-loss InfoNCE through
all_gather_with_grad, gradients averaged over ranks as DDP does, must equal one process computing the
same loss on the whole batch. Writes OUT_DIR/ok.rank<R> on success."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from foundation.losses.infonce import infonce, multi_view_infonce


def full_batch_infonce(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    labels = torch.arange(img.shape[0])
    logits = scale * img @ txt.t()
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same weights and global batch on every rank
    image_net, text_net = nn.Linear(6, 4), nn.Linear(5, 4)
    log_scale = nn.Parameter(torch.tensor(1.5))
    params = [*image_net.parameters(), *text_net.parameters(), log_scale]
    n = 8
    x_img, x_img2, x_txt, x_txt2 = torch.randn(n, 6), torch.randn(n, 6), torch.randn(n, 5), torch.randn(n, 5)

    def encode(sl: slice):
        return ([F.normalize(image_net(x[sl]), dim=-1) for x in (x_img, x_img2)],
                [F.normalize(text_net(x[sl]), dim=-1) for x in (x_txt, x_txt2)])

    # distributed: this rank's half, gathered inside the loss
    local = slice(rank * n // world, (rank + 1) * n // world)
    (i1, i2), (t1, t2) = encode(local)
    scale = log_scale.exp()
    loss = infonce(i1, t1, scale) + multi_view_infonce([i1, i2], [t1, t2], scale)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for g in grads:
        dist.all_reduce(g)
        g /= world  # DDP averages
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    for p in params:
        p.grad = None

    # reference: one process, the whole batch, no collectives
    (j1, j2), (u1, u2) = encode(slice(0, n))
    scale = log_scale.exp()
    ref = full_batch_infonce(j1, u1, scale) + sum(full_batch_infonce(i, t, scale) for i in (j1, j2) for t in (u1, u2)) / 4
    ref.backward()
    assert torch.allclose(mean_loss, ref.detach(), atol=1e-6), (mean_loss, ref)
    for g, p in zip(grads, params):
        assert torch.allclose(g, p.grad, atol=1e-6), (g, p.grad)
    Path(sys.argv[1], f"ok.rank{rank}").write_text("ok")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
