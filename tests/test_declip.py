"""DeCLIP at task level: paired starts under one seed, lookup before push, the weighted sum, no NNS gradient
into the text tower, ``declip`` with only the CLIP term equal to ``clip``, EOS pooling with a mask token, the
released NNS queue (random start, caption + EDA caption pushed, own-caption fraction) and MoCo-v2 views."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_VIT
from foundation.config import DataConfig, validate
from foundation.losses.infonce import one_way_infonce
from foundation.losses.nns import caption_tags
from foundation.tasks import TASKS

TEXT = {"context_length": 16, "width": 32, "heads": 2, "layers": 2}
SMALL = {"queue_size": 64, "simsiam_dim": 32, "simsiam_pred_dim": 16}
OFF = {"clip_weight": 1.0, "iss_weight": 0.0, "tss_weight": 0.0, "nns_weight": 0.0, "mvs": False}
# the ablation ladder of docs/vision_language.md: each variant adds one supervision to the one before
VARIANTS = {
    "mvs": {**OFF, "mvs": True},
    "iss": {**OFF, "mvs": True, "iss_weight": 0.2},
    "tss": {**OFF, "mvs": True, "iss_weight": 0.2, "tss_weight": 0.2},
    "declip": {"clip_weight": 0.4, "iss_weight": 0.2, "tss_weight": 0.2, "nns_weight": 0.2, "mvs": True},
}
CAPTIONS = ["a photo of a black cat.", "a grey dog on a mat.", "a white boat at sea.", "a silver car."]


def build(task: str = "declip", seed: int = 0, **declip):
    """A tiny clip/declip task built under ``seed`` (as the training loop seeds before building)."""
    recipe = validate({
        "model": {**TINY_VIT, "dual_encoder": {"embed_dim": 32, "text": TEXT}},
        "task": {"name": task, "declip": {**SMALL, **declip}},
        "data": {"train": "unused", "image_size": 32, "in_chans": 1, "two_view": True},
    })
    torch.manual_seed(seed)
    random.seed(seed)
    return TASKS[task].build(recipe.model, recipe.task, recipe.data)


def batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 1, 32, 32, generator=g), "image2": torch.randn(n, 1, 32, 32, generator=g),
            "text": CAPTIONS[:n]}


def test_one_seed_gives_clip_and_every_declip_variant_the_same_start():
    clip = build("clip").model.state_dict()
    for name in ("iss", "tss", "declip"):  # a head built; the mask token added; everything (MVS adds no weight)
        weights = VARIANTS[name]
        other = build(**weights).model.state_dict()
        assert other.keys() == clip.keys(), name
        for key, value in clip.items():
            if key == "text.token_embedding.weight" and weights["tss_weight"]:
                # the mask token's row comes after the tokenizer's 49,408, which are CLIP's
                assert other[key].shape[0] == value.shape[0] + 1, name
                assert torch.equal(other[key][: value.shape[0]], value), name
                continue
            assert torch.equal(other[key], value), (name, key)
    assert not torch.equal(build("clip", seed=1).model.state_dict()["visual.patch_embed.proj.weight"],
                           clip["visual.patch_embed.proj.weight"])  # the seed still matters


def test_declip_with_only_the_clip_term_equals_clip():
    clip, declip = build("clip"), build(**OFF)
    assert clip.model.state_dict().keys() == declip.model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(clip.model.state_dict().values(), declip.model.state_dict().values()))
    a, b = clip(batch()), declip(batch())
    assert set(a) == set(b) == {"loss", "clip", "logit_scale"}
    assert torch.equal(a["loss"], b["loss"])
    a["loss"].backward()
    b["loss"].backward()
    for (name, p), q in zip(clip.model.named_parameters(), declip.model.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name


def test_loss_is_the_weighted_sum_of_the_logged_terms():
    weights = {"clip_weight": 0.3, "iss_weight": 0.5, "tss_weight": 0.7, "nns_weight": 0.9, "mvs": True}
    out = build(**weights)(batch())
    expected = sum(weights[f"{t}_weight"] * out[t] for t in ("clip", "iss", "tss", "nns"))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(out[t].item() != 0 for t in ("clip", "iss", "tss", "nns"))  # each term counts (ISS is negative)


def test_nns_looks_up_before_the_push_and_pushes_caption_and_eda_caption():
    task = build(**{**OFF, "clip_weight": 0.0, "nns_weight": 1.0, "mvs": True}).eval()
    queue = task.nns_queue
    before, before_tags = queue.embeddings.clone(), queue.tags.clone()
    assert int(queue.filled) == 64 and torch.all(before_tags == 0)  # released start: full of random vectors
    assert torch.allclose(before.norm(dim=1), torch.ones(64))
    b = batch()
    random.seed(3)
    out = task(b)
    random.seed(3)  # the same EDA captions again
    from foundation.data.eda import eda

    augmented = [eda(t, task.cfg.eda_alpha) for t in b["text"]]
    model = task.model
    with torch.no_grad():
        texts = [F.normalize(model.encode_text(model.tokenize(t)), dim=-1) for t in (b["text"], augmented)]
        images = [F.normalize(model.encode_image(b[k]), dim=-1) for k in ("image", "image2")]
        terms = []
        for text in texts:  # the neighbour in the queue as it was before this step
            neighbour = before[(text @ before.t()).argmax(dim=1)]
            terms += [one_way_infonce(image, neighbour, model.scale()) for image in images]
    assert out["nns"].item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert out["nns_own"].item() == 0.0 and out["nns_init"].item() == 1.0
    # pushed after the lookup: the 4 captions, then their 4 EDA captions, each tagged with its caption
    assert int(queue.ptr) == 8
    assert torch.allclose(queue.embeddings[:8], torch.cat(texts), atol=1e-5)
    assert torch.equal(queue.tags[:8], caption_tags(b["text"]).repeat(2))
    assert torch.equal(queue.embeddings[8:], before[8:])
    # the same captions again: their nearest neighbours are now their own earlier copies
    out = task(b)
    assert out["nns_own"].item() == 1.0 and out["nns_init"].item() == 0.0


def test_empty_queue_init_gives_zero_until_the_first_push():
    task = build(**{**OFF, "nns_weight": 1.0, "queue_init": "empty"})
    assert int(task.nns_queue.filled) == 0
    first = task(batch())
    assert first["nns"].item() == 0.0 and int(task.nns_queue.filled) == 4
    assert task(batch())["nns"].item() > 0


def test_no_nns_gradient_reaches_the_text_tower():
    task = build(**{**OFF, "clip_weight": 0.0, "nns_weight": 1.0, "mvs": True})
    out = task(batch())
    assert out["loss"].item() > 0
    out["loss"].backward()
    text_grads = [p.grad for n, p in task.model.named_parameters() if n.startswith("text.")]
    assert all(g is None or not g.any() for g in text_grads)  # neighbours are detached queue entries
    assert task.model.visual_projection.weight.grad.abs().sum() > 0
    assert task.model.logit_scale.grad is not None and task.model.logit_scale.grad != 0


def test_text_is_pooled_at_end_of_text_when_a_mask_token_is_present():
    task = build(**VARIANTS["declip"])
    model = task.model
    tokens = model.tokenize(["a photo of a cat"])
    eot = int((tokens[0] == model.eot_token_id).nonzero()[0])
    tokens[0, 2] = model.mask_token_id  # the largest id in the vocabulary, before the end of text
    assert model.mask_token_id == tokens.max() and model.mask_token_id > model.eot_token_id
    with torch.no_grad():
        pooled, features = model.encode_text_tokens(tokens)
        at_eot = features[0, eot] @ model.text.text_projection
        at_mask = features[0, 2] @ model.text.text_projection
    assert torch.allclose(pooled[0], at_eot, atol=1e-5)
    assert not torch.allclose(pooled[0], at_mask, atol=1e-3)


def test_moco_v2_views_from_the_recipe():
    from torchvision import transforms as T

    from foundation.data.transforms import build_train_transform

    cfg = DataConfig.model_validate({"image_size": 32, "augment": {
        "scale": [0.2, 1.0], "color_jitter": [0.4, 0.4, 0.4, 0.1], "color_jitter_prob": 0.8,
        "grayscale_prob": 0.2, "gaussian_blur_prob": 0.5}})
    steps = build_train_transform(cfg).transforms
    applied = {type(t.transforms[0]).__name__: t.p for t in steps if isinstance(t, T.RandomApply)}
    assert applied == {"ColorJitter": 0.8, "GaussianBlur": 0.5}
    jitter = next(t.transforms[0] for t in steps if isinstance(t, T.RandomApply) and t.p == 0.8)
    assert jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
    assert [t.p for t in steps if isinstance(t, T.RandomGrayscale)] == [0.2]
    assert steps[0].scale == (0.2, 1.0)
    plain = build_train_transform(DataConfig.model_validate({"image_size": 32})).transforms
    assert not any(isinstance(t, (T.RandomApply, T.RandomGrayscale)) for t in plain)
    with pytest.raises(ValueError, match="grayscale_prob"):
        DataConfig.model_validate({"augment": {"grayscale_prob": 1.5}})


def test_declip_recipes_use_the_released_views():
    from foundation.config import load_recipe

    for path in ("recipes/declip/vit_tiny_fmnist.yaml", "recipes/declip/vit_b32_yfcc15m.yaml"):
        a = load_recipe(path).data.augment
        assert (a.scale, a.color_jitter, a.color_jitter_prob, a.grayscale_prob, a.gaussian_blur_prob, a.hflip) == (
            (0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, 0.5), path
