"""Zero-shot classification of a dual encoder as an adaptation cell (``--method zeroshot``, suite ``zeroshot: true``).

No training subset: each class name is put into CLIP's 80 prompt templates, the text tower's normalised
embeddings are averaged per class (``evaluation.zeroshot.zeroshot_classifier``, the same classifier
``foundation eval --eval zeroshot`` uses), and every val image goes to the class whose embedding is most
similar to its normalised ``encode_image`` embedding. The image embeddings come from the feature cache
(``--feature projected`` of the same checkpoint), so a rerun and the linear probe on projected features
share one extraction. Figures as CLIP_benchmark's zero-shot classification reports them: top-1, top-5 and
mean per-class recall.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from foundation.adapt.backbone import load_backbone
from foundation.adapt.features import extract_features
from foundation.adapt.probe import classification_metrics
from foundation.data import DataError

log = logging.getLogger(__name__)

DUAL_ENCODERS = ("clip", "declip")  # platform runs whose model has a text tower (DualEncoder)


def zeroshot_cell(adaptation: Any) -> dict:
    """Zero-shot top-1 / top-5 / mean per-class recall of ``adaptation.checkpoint`` on ``adaptation.data``'s val
    split (an ``Adaptation``: its checkpoint, data, options and output folder); writes ``<out>/zeroshot.json``.

    ``DataError`` when the checkpoint is not a dual encoder or the data have no class names.
    """
    from evaluation.zeroshot import zeroshot_classifier  # the evaluation package imports every evaluation
    from foundation.data.captions import TEMPLATES
    from foundation.engine.checkpoint import load_model

    a, o = adaptation, adaptation.opts
    names = a.class_names
    backbone = a.backbone  # the run's own (pooled or projected) extractor tells the checkpoint's kind
    if backbone.kind not in DUAL_ENCODERS:
        raise DataError(f"zero-shot needs a dual encoder (a clip or declip run); {a.checkpoint} is a "
                        f"{backbone.kind} checkpoint")
    if not names:
        raise DataError(f"zero-shot needs class names: {a.data} has no manifest class_names (rebuild it with "
                        "`foundation data build ... --class-names ...`)")
    if backbone.feature != "projected":  # the joint embedding space, where the class prompts are
        backbone = load_backbone(a.checkpoint, feature="projected", weights=o.weights, image_size=o.image_size)
    model, _ = load_model(backbone.source["checkpoint"], device=o.device)
    classifier = zeroshot_classifier(model, names, TEMPLATES, o.device).cpu()  # (E, C): the prompt ensemble
    val = extract_features(backbone, a.data, o.val_split, cache_dir=o.cache_dir, batch_size=o.batch_size,
                           device=o.device, workers=o.workers, progress=o.progress)
    scores = (F.normalize(torch.from_numpy(val.x), dim=-1) @ classifier).numpy()  # (N, C) cosine similarities
    metrics = classification_metrics(scores, val.y, np.arange(len(names)))
    run = {"seed": 0, **metrics, "templates": len(TEMPLATES), "train_samples": 0, "val_samples": int(len(val.y)),
           "features_cached": {"val": val.cached}}
    cell = {"checkpoint": a.checkpoint, "data": a.data, "method": "zeroshot", "feature": "projected",
            "fraction": None, "shots": 0, "seeds": 1, "top1": metrics["top1"], "top1_std": 0.0,
            "top5": metrics["top5"], "mean_per_class_recall": metrics["mean_per_class_recall"],
            "train_samples": 0, "runs": [run]}
    path = Path(a.out) / "zeroshot.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell, indent=2) + "\n")
    cell["file"] = str(path)
    log.info("zeroshot: top-1 %.2f (%d classes, %d val images) -> %s", metrics["top1"], len(names), len(val.y), path)
    return cell


__all__ = ["DUAL_ENCODERS", "zeroshot_cell"]
