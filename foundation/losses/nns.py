"""DeCLIP's nearest-neighbour supervision (NNS): a FIFO queue of past text embeddings; each image is
also asked to match the queued text nearest to its own caption.

The queue holds L2-normalised, detached embeddings as buffers, so it lives in the task's state dict
(``task.safetensors`` in checkpoints) and continues after a resume. Callers push the embeddings of
every rank (gathered), so all ranks hold the same queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NearestNeighbourQueue(nn.Module):
    """A FIFO of ``size`` embeddings of width ``dim``; ``nearest`` looks up the top-1 neighbour by cosine."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # slots holding an embedding

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @torch.no_grad()
    def push(self, x: Tensor) -> None:
        """Append ``x`` (N, dim) (normalised, detached here), overwriting the oldest entries when full."""
        x = F.normalize(x.detach().float(), dim=-1)
        if x.shape[0] >= self.size:  # keep the newest `size`, in order
            x = x[-self.size:]
        n = x.shape[0]
        start = int(self.ptr)
        idx = (torch.arange(n, device=x.device) + start) % self.size
        self.embeddings[idx] = x.to(self.embeddings)
        self.ptr.fill_((start + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    @torch.no_grad()
    def nearest(self, query: Tensor) -> Tensor | None:
        """The queued embedding with the highest cosine similarity to each row of ``query`` (B, dim);
        None while the queue is empty."""
        n = int(self.filled)
        if n == 0:
            return None
        bank = self.embeddings[:n]  # (n, dim), insertion order is irrelevant to the lookup
        sims = F.normalize(query.detach().float(), dim=-1) @ bank.t()  # (B, n)
        return bank[sims.argmax(dim=1)].to(query.dtype)

    def ordered(self) -> Tensor:
        """The queued embeddings, oldest first (for inspection and tests)."""
        n = int(self.filled)
        if n < self.size:
            return self.embeddings[:n]
        return torch.roll(self.embeddings, -int(self.ptr), dims=0)


__all__ = ["NearestNeighbourQueue"]
