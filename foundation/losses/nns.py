"""DeCLIP's nearest-neighbour supervision (NNS): a FIFO queue of past text embeddings; each image is
also asked to match the queued text nearest to its own caption.

The queue holds L2-normalised, detached embeddings as buffers, so it lives in the task's state dict
(``task.safetensors`` in checkpoints) and continues after a resume. Callers push the embeddings of
every rank (gathered), so all ranks hold the same queue.

``init="random"`` is the released DeCLIP's start: every slot holds a random unit vector (``filled`` is the
size from the start), so a lookup always finds a neighbour and a small data set's captions compete with
noise until they fill the queue; ``"empty"`` starts with no slot filled (the lookup returns None until the
first push). Each slot also keeps a ``tag`` of the caption it came from (``caption_tags``; 0 for the
initial random vectors), so a caller can count neighbours that are the query's own caption again — the
sign of a queue that is degenerate for its data (too few distinct captions for its size).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def caption_tags(texts: list[str]) -> Tensor:
    """(N,) int64 tags of captions: a stable hash of each text, never 0 (0 marks an initial random vector)."""
    tags = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True) or 1
            for t in texts]
    return torch.tensor(tags, dtype=torch.long)


class NearestNeighbourQueue(nn.Module):
    """A FIFO of ``size`` embeddings of width ``dim``; ``nearest`` looks up the top-1 neighbour by cosine."""

    def __init__(self, size: int, dim: int, init: Literal["empty", "random"] = "empty"):
        super().__init__()
        if init not in ("empty", "random"):
            raise ValueError(f"init: {init!r}; choose 'empty' or 'random'")
        start = F.normalize(torch.randn(size, dim), dim=-1) if init == "random" else torch.zeros(size, dim)
        self.register_buffer("embeddings", start)
        self.register_buffer("tags", torch.zeros(size, dtype=torch.long))  # the caption each slot came from
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        # slots a lookup may return: all of them from the start with random vectors
        self.register_buffer("filled", torch.full((), size if init == "random" else 0, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @torch.no_grad()
    def push(self, x: Tensor, tags: Tensor | None = None) -> None:
        """Append ``x`` (N, dim) (normalised, detached here) with its captions' ``tags`` (N,) (default 0),
        overwriting the oldest entries when full."""
        x = F.normalize(x.detach().float(), dim=-1)
        tags = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if tags is None else tags.detach()
        if x.shape[0] >= self.size:  # keep the newest `size`, in order
            x, tags = x[-self.size:], tags[-self.size:]
        n = x.shape[0]
        start = int(self.ptr)
        idx = (torch.arange(n, device=x.device) + start) % self.size
        self.embeddings[idx] = x.to(self.embeddings)
        self.tags[idx] = tags.to(self.tags)
        self.ptr.fill_((start + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    @torch.no_grad()
    def lookup(self, query: Tensor) -> tuple[Tensor, Tensor] | None:
        """(the queued embedding with the highest cosine similarity to each row of ``query`` (B, dim), its
        tag (B,)); None while the queue is empty."""
        n = int(self.filled)
        if n == 0:
            return None
        bank = self.embeddings[:n]  # (n, dim), insertion order is irrelevant to the lookup
        best = (F.normalize(query.detach().float(), dim=-1) @ bank.t()).argmax(dim=1)  # (B,)
        return bank[best].to(query.dtype), self.tags[best]

    def nearest(self, query: Tensor) -> Tensor | None:
        """The queued embedding nearest each row of ``query`` (B, dim); None while the queue is empty."""
        found = self.lookup(query)
        return None if found is None else found[0]

    def ordered(self) -> Tensor:
        """The queued embeddings, oldest first (for inspection and tests)."""
        n = int(self.filled)
        if n < self.size:
            return self.embeddings[:n]
        return torch.roll(self.embeddings, -int(self.ptr), dims=0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before tags were kept: its slots count as untagged
        state_dict.setdefault(prefix + "tags", torch.zeros_like(self.tags))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["NearestNeighbourQueue", "caption_tags"]
