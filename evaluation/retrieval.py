"""Image <-> text retrieval recall@K (R@1/5/10) on caption shards.

Every image is a query over all captions (a hit when any of its own captions is in the top K), and
every caption a query over all images (a hit when its image is in the top K). With several ranks the
embeddings of all ranks are joined first (through ``all_reduce``), so the gallery is the whole split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from foundation.engine.collectives import world

KS = (1, 5, 10)


def _join_ranks(x: Tensor, all_reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """Rows of every rank, in rank order, using only a summing all-reduce."""
    rank, size = world()
    if size == 1:
        return x
    counts = torch.zeros(size, dtype=torch.float64, device=x.device)
    counts[rank] = x.shape[0]
    counts = all_reduce(counts).long().tolist()
    out = torch.zeros((sum(counts), *x.shape[1:]), dtype=torch.float64, device=x.device)
    start = sum(counts[:rank])
    out[start:start + x.shape[0]] = x.double()
    return all_reduce(out).to(x.dtype)


def recall_at_k(image_emb: Tensor, text_emb: Tensor, text_image: Tensor, ks: tuple[int, ...] = KS,
                chunk: int = 1024) -> dict[str, float]:
    """Recall@K (percent) both ways. ``text_image[j]`` is the index of the image caption j describes."""
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    i2t = torch.zeros(len(ks), dtype=torch.float64)
    for start in range(0, n_img, chunk):
        sims = image_emb[start:start + chunk] @ text_emb.t()  # (b, T)
        top = sims.topk(min(max(ks), n_txt), dim=1).indices  # (b, K)
        owner = text_image[top] == torch.arange(start, start + sims.shape[0], device=sims.device)[:, None]
        for i, k in enumerate(ks):
            i2t[i] += owner[:, :k].any(dim=1).sum().item()
    t2i = torch.zeros(len(ks), dtype=torch.float64)
    for start in range(0, n_txt, chunk):
        sims = text_emb[start:start + chunk] @ image_emb.t()  # (b, I)
        top = sims.topk(min(max(ks), n_img), dim=1).indices
        hit = top == text_image[start:start + sims.shape[0], None]
        for i, k in enumerate(ks):
            t2i[i] += hit[:, :k].any(dim=1).sum().item()
    out = {f"image_to_text_R@{k}": 100.0 * i2t[i].item() / max(n_img, 1) for i, k in enumerate(ks)}
    out.update({f"text_to_image_R@{k}": 100.0 * t2i[i].item() / max(n_txt, 1) for i, k in enumerate(ks)})
    out["mean_recall"] = sum(v for v in out.values()) / len(out)
    return out


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device | str = "cpu",
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 image->text and text->image, ``mean_recall``, ``images`` and ``texts`` counted.
    Every caption line of a sample (batch ``texts``) is a query; without them, its ``text``."""
    was_training = model.training
    model.eval()
    images, texts, owners = [], [], []
    n_images = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images.append(model.encode_image(batch["image"].to(device, non_blocking=True), normalize=True).float())
        captions = batch.get("texts") or [[t] for t in batch["text"]]
        flat = [c for lines in captions for c in lines]
        texts.append(model.encode_text(model.tokenize(flat).to(device), normalize=True).float())
        owners.append(torch.tensor([n_images + j for j, lines in enumerate(captions) for _ in lines], device=device))
        n_images += len(captions)
    model.train(was_training)
    dim = model.embed_dim
    image_emb = torch.cat(images) if images else torch.zeros(0, dim, device=device)
    text_emb = torch.cat(texts) if texts else torch.zeros(0, dim, device=device)
    owner = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.long, device=device)
    # join ranks: image indices are local, so shift them by the images of the ranks before
    rank, size = world()
    if size > 1:
        counts = torch.zeros(size, dtype=torch.float64, device=device)
        counts[rank] = image_emb.shape[0]
        offset = int(all_reduce(counts)[:rank].sum().item())
        owner = _join_ranks((owner + offset).double()[:, None], all_reduce)[:, 0].long()
        image_emb, text_emb = _join_ranks(image_emb, all_reduce), _join_ranks(text_emb, all_reduce)
    result = recall_at_k(image_emb.cpu(), text_emb.cpu(), owner.cpu())
    return {**result, "images": int(image_emb.shape[0]), "texts": int(text_emb.shape[0])}


__all__ = ["evaluate_retrieval", "recall_at_k"]
