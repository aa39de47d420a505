"""Top-1 / top-5 accuracy of a classifier on validation shards (every sample once across ranks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from foundation.tasks.classification import accuracy


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device | str = "cpu",
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t,
    max_batches: int | None = None,
) -> dict[str, float]:
    """``{"top1", "top5", "loss", "samples"}`` over the loader. ``all_reduce`` sums across ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        logits = model(images).float()
        hits = accuracy(logits, labels, (1, 5))
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums += torch.stack([hits[1], hits[5], loss, torch.tensor(len(labels), device=device)]).to(sums)
    sums = all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {
        "top1": 100.0 * sums[0].item() / n,
        "top5": 100.0 * sums[1].item() / n,
        "loss": sums[2].item() / n,
        "samples": int(sums[3].item()),
    }
