"""Hugging Face text towers (open_clip's HFTextEncoder) in CLIP/DeCLIP: a tiny BERT built offline, from a
local directory (safetensors weights and tokenizer, nothing downloaded, no code run) or from a config the
recipe describes; CLIP and DeCLIP train with it, zero-shot works, open_clip export round-trips, and
`foundation quantize --outlier-suppression` migrates BERT's post-LN gammas (shortcuts included)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_VIT, read_metrics
from foundation.config import ModelConfig, validate
from foundation.engine.checkpoint import load_model
from foundation.tasks import TASKS
from foundation.train import train
from test_clip import CLASSES, clip_recipe, write_caption_shards

WORDS = ["a", "photo", "of", "square", ".", "something", "else", *CLASSES]
HF_TEXT = {"hf_type": "bert", "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0, "context_length": 16,
           "hf_pooler": "mean"}  # from random init, mean pooling learns in 40 steps; the first token (cls) does not


def write_tiny_bert(out: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (width 32) with a word-level vocabulary, saved like a Hub download would be."""
    from transformers import BertConfig, BertModel, BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    assert len(tokenizer) == len(vocab)
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    BertModel(config, add_pooling_layer=False).save_pretrained(out)  # model.safetensors + config.json
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_caption_shards(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def hf_recipe(shards: Path, runs: Path, name: str, task: str, text: dict, **sections) -> dict:
    recipe = clip_recipe(shards, runs, name, task=task, **sections)
    recipe["model"]["dual_encoder"]["text"] = text
    return recipe


@pytest.fixture(scope="module")
def clip_run(shards, tmp_path_factory) -> tuple[dict, Path]:
    """CLIP with a BERT text tower built from the recipe, BPE-tokenised."""
    recipe = validate(hf_recipe(shards, tmp_path_factory.mktemp("runs"), "clip_bert", "clip", HF_TEXT,
                                data={"two_view": False}))
    return train(recipe), recipe.run_dir


def test_local_directory_loads_its_safetensors_weights_and_tokenizer(bert_dir):
    from open_clip.hf_model import HFTextEncoder
    from safetensors.torch import load_file

    from foundation.models.dual_encoder import HFTokenizer, build_dual_encoder

    cfg = ModelConfig(**TINY_VIT, dual_encoder={"embed_dim": 24, "text": {
        "hf_model": str(bert_dir), "hf_tokenizer": str(bert_dir), "hf_pooler": "mean", "context_length": 12}})
    model = build_dual_encoder(cfg, in_chans=1)
    assert isinstance(model.text, HFTextEncoder) and isinstance(model.tokenizer, HFTokenizer)
    saved = load_file(str(bert_dir / "model.safetensors"))
    ours = model.text.transformer.state_dict()
    for key in ("encoder.layer.1.attention.self.query.weight", "embeddings.word_embeddings.weight"):
        assert torch.equal(ours[key], saved[key]), key  # the directory's weights, not a random init
    tokens = model.tokenize(["a photo of a silver square.", "white"])
    assert tokens.shape == (2, 12)
    assert tokens[0, 0].item() == model.sot_token_id == 2 and tokens[1, 2].item() == model.eot_token_id == 3
    assert tokens[1, 3:].eq(0).all()  # [PAD]
    pooled, features = model.encode_text_tokens(tokens)
    assert pooled.shape == (2, 24) and features.shape == (2, 12, 32)
    # mean pooling ignores padding: the same caption padded to a longer context embeds the same
    longer = model.tokenizer(["white"], context_length=20)
    assert torch.allclose(model.encode_text(longer), model.encode_text(tokens[1:]), atol=1e-5)


def test_refusals(bert_dir, tmp_path, shards):
    from foundation.models.dual_encoder import build_dual_encoder

    def build(text: dict, extra_tokens: int = 0):
        return build_dual_encoder(ModelConfig(**TINY_VIT, dual_encoder={"embed_dim": 24, "text": text}),
                                  in_chans=1, extra_tokens=extra_tokens)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((bert_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        build({"hf_model": str(pickled)})
    with pytest.raises(ValueError, match="not a directory"):
        build({"hf_model": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="come from"):
        build({"hf_model": str(bert_dir), "width": 64})
    with pytest.raises(ValueError, match="did you mean"):
        build({"hf_type": "bertt"})
    with pytest.raises(ValueError, match="positions"):
        build({"hf_model": str(bert_dir), "context_length": 40})
    with pytest.raises(ValueError, match="MLM"):  # DeCLIP's mask token lives in the BPE vocabulary only
        recipe = validate(hf_recipe(shards, tmp_path, "x", "declip", {"hf_model": str(bert_dir), "hf_tokenizer": str(bert_dir)}))
        TASKS["declip"].build(recipe.model, recipe.task, recipe.data)


def test_clip_trains_with_a_bert_tower_and_classifies_zero_shot(clip_run, tmp_path, shards):
    from foundation.cli import main

    summary, run_dir = clip_run
    metrics = read_metrics(run_dir)
    first = sum(metrics[s]["train/clip"] for s in (1, 2, 3)) / 3
    last = sum(metrics[s]["train/clip"] for s in (38, 39, 40)) / 3
    assert last < first - 0.3, (first, last)
    assert summary["eval/zeroshot/top1"] >= 90.0, summary  # trivially separable
    model, _ = load_model(run_dir)  # rebuilt from the recipe: same architecture, the checkpoint's weights
    assert type(model.text).__name__ == "HFTextEncoder" and model.text.transformer.config.model_type == "bert"
    assert main(["eval", "zeroshot", "--checkpoint", str(run_dir), "--data", str(shards), "--device", "cpu",
                 "--out", str(tmp_path / "zs.json")]) == 0
    assert json.loads((tmp_path / "zs.json").read_text())["top1"] >= 90.0
    # built from the recipe: no directory open_clip could rebuild the tower from
    assert main(["export", "--checkpoint", str(run_dir), "--format", "open_clip", "--out", str(tmp_path / "oc")]) != 0


def test_declip_with_mlm_trains_with_a_bert_tower(shards, tmp_path):
    recipe = validate(hf_recipe(shards, tmp_path, "declip_bert", "declip", HF_TEXT,
                                train={"steps": 6, "evals": []}))
    summary = train(recipe)
    task = TASKS["declip"].build(recipe.model, recipe.task, recipe.data)
    assert task.model.mask_token_id == 49408 and task.model.text.transformer.config.vocab_size == 49409
    metrics = read_metrics(recipe.run_dir)
    assert sorted(metrics) == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(metrics[s]["train/tss"])) for s in metrics)
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 0
    tss = [metrics[s]["train/tss"] for s in range(1, 7)]
    # the MLM head starts as a near-uniform guess over CLIP's vocabulary plus [MASK] (measured 10.90 vs 10.81),
    # not BERT's 30,522 words (10.33); six steps already lower it (measured 10.91 -> 10.42 over three steps)
    assert tss[0] == pytest.approx(math.log(49409), rel=0.03), tss
    assert sum(tss[3:]) / 3 < sum(tss[:3]) / 3 - 0.2, tss


def test_open_clip_export_of_a_directory_tower(bert_dir):
    import open_clip

    from foundation.models.dual_encoder import build_dual_encoder
    from foundation.models.open_clip_convert import to_open_clip

    cfg = ModelConfig(backbone="vit_tiny_patch16_224", img_size=32, patch_size=8,
                      kwargs={"embed_dim": 48, "depth": 2, "num_heads": 3},
                      dual_encoder={"embed_dim": 24, "text": {"hf_model": str(bert_dir), "hf_tokenizer": str(bert_dir),
                                                              "context_length": 12}})
    ours = build_dual_encoder(cfg, in_chans=3).eval()
    config, state = to_open_clip(ours)
    assert config["text_cfg"]["hf_model_name"] == str(bert_dir.resolve())
    theirs = open_clip.model.CustomTextCLIP(**config).eval()
    theirs.load_state_dict(state, strict=True)
    tokenizer = open_clip.tokenizer.HFTokenizer(config["text_cfg"]["hf_tokenizer_name"], context_length=12)
    texts = ["a photo of a gray square.", "something else"]
    assert torch.equal(tokenizer(texts), ours.tokenize(texts))
    with torch.no_grad():
        assert torch.allclose(theirs.encode_text(ours.tokenize(texts)), ours.encode_text(ours.tokenize(texts)), atol=1e-5)
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(theirs.encode_image(x), ours.encode_image(x), atol=1e-5)


@pytest.mark.slow
def test_quantize_bert_text_tower_with_outlier_suppression(clip_run, shards, tmp_path):
    """`foundation quantize --outlier-suppression` on a checkpoint whose text tower is BERT: every post-LN
    LayerNorm's γ moves into the next Linear layers and the residual shortcut it feeds; the quantized
    tower reloads and still embeds like the FP one."""
    import torch.nn.functional as F

    from foundation.cli import main
    from foundation.models.dual_encoder import TextTower
    from foundation.quant.runner import load_quantized

    _, run_dir = clip_run
    out = tmp_path / "quant"
    assert main(["quantize", "--checkpoint", str(run_dir), "--data", str(shards), "--val", str(shards),
                 "--method", "rtn", "--wbits", "8", "--abits", "8", "--outlier-suppression",
                 "--calib-images", "32", "--batch-size", "16", "--out", str(out)]) == 0
    rows = {(r["method"], r["bits"]): r for r in json.loads((out / "results.json").read_text())}
    row, fp = rows[("rtn", "W8A8")], rows[("fp32", "FP32")]["top1"]
    assert row["top1"] >= fp - 0.05 and row["agreement_fp"] >= 0.9, row
    gm = row["outlier"]["text"]["gamma_migration"]
    layer = "text.transformer.encoder.layer.0."
    assert gm["skipped"] == [] and len(gm["migrated"]) == 5  # embeddings + 2 per layer
    assert gm["migrated"][layer + "attention.output.LayerNorm"] == [layer + "intermediate.dense", layer + "output (shortcut)"]
    assert gm["migrated"]["text.transformer.embeddings.LayerNorm"] == [
        layer + "attention.self.query", layer + "attention.self.key", layer + "attention.self.value",
        layer + "attention.output (shortcut)"]
    assert gm["migrated"]["text.transformer.encoder.layer.1.output.LayerNorm"] == ["text.proj"]
    assert row["outlier"]["text"]["token_clipping"]["quantizers"] > 0

    q_text = load_quantized(out / "rtn_w8a8_os_academic" / "text")
    model, _ = load_model(run_dir)
    tokens = model.tokenize(["a photo of a black.", "a white square."])
    with torch.no_grad():
        ref, got = TextTower(model)(tokens), q_text(tokens)
    assert not torch.equal(ref, got)
    assert F.cosine_similarity(ref, got).min() > 0.99
    scale = q_text.text.transformer.encoder.layer[0].output.shortcut_scale
    assert torch.equal(scale, model.text.transformer.encoder.layer[0].attention.output.LayerNorm.weight.detach())
