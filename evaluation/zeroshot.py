"""Zero-shot classification (CLIP): class names formatted into prompt templates, encoded by the text
tower; an image is assigned the class whose text embedding is nearest its image embedding.

Two classifiers in one pass: ``single`` (the prompt "a photo of a {}.") and ``ensemble`` (the mean of
the normalised embeddings of CLIP's 80 ImageNet templates per class, renormalised). Class names come
from the shards' manifest (``foundation.data.shards.class_names``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.data.captions import SIMPLE_TEMPLATE, TEMPLATES
from foundation.tasks.classification import accuracy


def loader_class_names(loader) -> list[str] | None:
    """Class names of an evaluation loader (``build_eval_loader`` reads them from the manifest)."""
    names = getattr(loader, "class_names", None)
    return list(names) if names else None


@torch.no_grad()
def zeroshot_classifier(model: nn.Module, class_names: Sequence[str], templates: Sequence[str],
                        device: torch.device | str = "cpu", batch_size: int = 256) -> Tensor:
    """(embed_dim, classes): per class, the renormalised mean of its normalised prompt embeddings."""
    prompts = [t.format(name) for name in class_names for t in templates]
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = model.tokenize(prompts[start:start + batch_size]).to(device)
        embeddings.append(model.encode_text(tokens, normalize=True).float())
    per_prompt = torch.cat(embeddings).view(len(class_names), len(templates), -1)  # (C, T, E)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).t()  # (E, C)


class ZeroShotClassifier(nn.Module):
    """A dual encoder as a classifier over ``class_names``: logits = scale · (normalised image embedding
    @ class text embeddings of the prompt ensemble). Lets the classifier evaluations (robustness,
    SysNoise) run on CLIP/DeCLIP checkpoints; gradients flow through the image tower (attacks)."""

    def __init__(self, model: nn.Module, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.model = model
        self.class_names = list(class_names)
        self.register_buffer("weights", zeroshot_classifier(model, self.class_names, templates, device))  # (E, C)

    def forward(self, images: Tensor) -> Tensor:
        features = self.model.encode_image(images, normalize=True)  # (B, E)
        return self.model.scale().to(features.dtype) * features @ self.weights.to(features.dtype)  # (B, C)


@torch.no_grad()
def evaluate_zeroshot(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device | str = "cpu",
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t,
    max_batches: int | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = TEMPLATES,
) -> dict[str, float]:
    """``{"top1", "top5", "top1_ensemble", "top5_ensemble", "samples"}`` of a dual encoder on labelled
    shards (every sample once across ranks; ``all_reduce`` sums). ``class_names`` default to the
    loader's (its manifest's)."""
    names = list(class_names) if class_names is not None else loader_class_names(loader)
    if not names:
        raise ValueError("zero-shot evaluation needs class names: the shards' manifest.json has no class_names; "
                         "rebuild them with `foundation data build ... --class-names ...`")
    was_training = model.training
    model.eval()
    classifiers = {
        "": zeroshot_classifier(model, names, (SIMPLE_TEMPLATE,), device),
        "_ensemble": zeroshot_classifier(model, names, templates, device),
    }
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # top1, top5, top1 ens, top5 ens, count
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        features = model.encode_image(images, normalize=True).float()  # (B, E)
        hits = [accuracy(features @ w, labels, (1, 5)) for w in classifiers.values()]
        sums += torch.stack([hits[0][1], hits[0][5], hits[1][1], hits[1][5],
                             torch.tensor(len(labels), device=device)]).to(sums)
    sums = all_reduce(sums)
    model.train(was_training)
    n = max(sums[4].item(), 1.0)
    return {
        "top1": 100.0 * sums[0].item() / n,
        "top5": 100.0 * sums[1].item() / n,
        "top1_ensemble": 100.0 * sums[2].item() / n,
        "top5_ensemble": 100.0 * sums[3].item() / n,
        "samples": int(sums[4].item()),
    }


__all__ = ["ZeroShotClassifier", "evaluate_zeroshot", "loader_class_names", "zeroshot_classifier"]
