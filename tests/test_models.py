"""Backbones through timm's registry: tiny forward/backward of every backbone the recipes use, and CeiT."""

from __future__ import annotations

import copy
import subprocess

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import foundation  # noqa: F401  (registers CeiT with timm)
from foundation.models.ceit import CeiT, ImageToTokens, LayerwiseClassAttention, LocallyEnhancedFeedForward
from conftest import PYTHON, REPO

CEIT_NAMES = [f"ceit_{size}_patch16_{px}" for size in ("tiny", "small", "base") for px in (224, 384)]

# (name, overrides, input size): 28-32 px single-channel inputs, as the Fashion-MNIST / digits recipes use.
TINY_BACKBONES = [
    pytest.param("resnet18", {}, 32, id="resnet18-32px"),
    pytest.param("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32, id="vit_tiny-32px-patch4"),
    pytest.param("ceit_test", {}, 32, id="ceit_test-32px-patch8"),
    pytest.param("ceit_test", {"img_size": 28, "patch_size": 4}, 28, id="ceit_test-28px-patch4"),
]


def _tiny_ceit(**overrides) -> CeiT:
    return timm.create_model("ceit_test", in_chans=1, num_classes=10, **overrides)


@pytest.mark.parametrize("name,overrides,size", TINY_BACKBONES)
def test_backbone_forward_backward(name: str, overrides: dict, size: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, in_chans=1, num_classes=10, **overrides)
    logits = model(torch.randn(2, 1, size, size))
    assert logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    pooled = model.forward_head(model.forward_features(torch.randn(2, 1, size, size)), pre_logits=True)
    assert pooled.shape == (2, model.num_features)


def test_ceit_variants_registered() -> None:
    assert set(CEIT_NAMES + ["ceit_test"]) <= set(timm.list_models("ceit_*"))


@pytest.mark.parametrize(
    "img_size,patch_size,tokens", [(224, 16, 196), (384, 16, 576), (32, 16, 4), (32, 8, 16), (28, 4, 49)]
)
def test_image_to_tokens_count(img_size: int, patch_size: int, tokens: int) -> None:
    i2t = ImageToTokens(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=8)
    assert i2t.num_patches == tokens
    if img_size <= 224:
        assert i2t(torch.randn(1, 3, img_size, img_size)).shape == (1, tokens, 8)


def test_image_to_tokens_rejects_patch_not_multiple_of_stem_stride() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        ImageToTokens(img_size=32, patch_size=6)


def test_leff_leaves_class_token_untouched() -> None:
    torch.manual_seed(0)
    leff = LocallyEnhancedFeedForward(dim=16, hidden_dim=64).train()
    x = torch.randn(2, 1 + 16, 16)
    out = leff(x, (4, 4))
    assert out.shape == x.shape
    assert torch.equal(out[:, 0], x[:, 0])
    assert not torch.allclose(out[:, 1:], x[:, 1:])
    # the class token does not take part in the convolutions either
    shifted = x.clone()
    shifted[:, 0] += 5.0
    assert torch.equal(leff(shifted, (4, 4))[:, 1:], out[:, 1:])


def test_lca_attends_over_every_layers_class_token() -> None:
    torch.manual_seed(0)
    lca = LayerwiseClassAttention(dim=16, depth=4, num_heads=2)
    cls_tokens = torch.randn(2, 4, 16, requires_grad=True)
    out = lca(cls_tokens)
    assert out.shape == (2, 1, 16)
    out.sum().backward()
    assert (cls_tokens.grad.abs().sum(dim=(0, 2)) > 0).all()  # every layer's token reaches the output


def test_ceit_feeds_each_blocks_class_token_to_lca() -> None:
    torch.manual_seed(0)
    model = _tiny_ceit(depth=3).eval()
    x = torch.randn(2, 1, 32, 32)
    block_cls, lca_inputs = [], []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: block_cls.append(out[:, 0]))
    model.lca.register_forward_pre_hook(lambda mod, args: lca_inputs.append(args[0]))
    with torch.no_grad():
        reference = model(x)
    assert torch.equal(lca_inputs[0], torch.stack(block_cls, dim=1))  # (B, depth, D)

    # Perturb only what LCA receives from block 0 (block 1 still sees the original): logits change.
    def perturb_first_layer(mod, args):
        cls_tokens = args[0].clone()
        cls_tokens[:, 0] += torch.randn_like(cls_tokens[:, 0])  # not a constant: LayerNorm would remove it
        return (cls_tokens,)

    model.lca.register_forward_pre_hook(perturb_first_layer)
    with torch.no_grad():
        assert not torch.allclose(model(x), reference)


def test_ceit_parameter_counts_match_paper() -> None:
    for name, paper in (("ceit_tiny_patch16_224", 6.4e6), ("ceit_small_patch16_224", 24.2e6)):
        count = sum(p.numel() for p in timm.create_model(name).parameters())
        assert abs(count - paper) / paper < 0.01, (name, count)


def test_ceit_pretrained_cfg_resolves_data_config() -> None:
    config = timm.data.resolve_data_config(model=timm.create_model("ceit_tiny_patch16_224"))
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 0.875
    small = timm.data.resolve_data_config(model=_tiny_ceit(img_size=28, patch_size=4))
    assert small["input_size"] == (1, 28, 28) and len(small["mean"]) == len(small["std"]) == 1
    transform = timm.data.create_transform(**small)
    from PIL import Image

    assert transform(Image.new("L", (40, 40))).shape == (1, 28, 28)


def test_ceit_no_weight_decay_names_exist() -> None:
    model = _tiny_ceit()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= names.keys()
    assert {"cls_token", "pos_embed", "lca.pos_layer_embed"} == model.no_weight_decay()


@pytest.mark.slow
def test_ceit_timm_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = _tiny_ceit()
    model(torch.randn(8, 1, 32, 32))  # training-mode forward moves the BN running stats off their init
    model.eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
    weights, io = tmp_path / "model.safetensors", tmp_path / "io.safetensors"
    save_file(model.state_dict(), str(weights))
    save_file({"x": x}, str(io))
    code = (
        "import foundation, timm, torch; from safetensors.torch import load_file, save_file; "
        f"m = timm.create_model('ceit_test', in_chans=1, num_classes=10, checkpoint_path={str(weights)!r}).eval(); "
        f"x = load_file({str(io)!r})['x']; "
        f"save_file({{'logits': m(x).detach()}}, {str(tmp_path / 'out.safetensors')!r})"
    )
    subprocess.run([PYTHON, "-c", code], cwd=REPO, check=True, timeout=120)
    logits = load_file(str(tmp_path / "out.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_ceit_grad_checkpointing_same_output_and_grads() -> None:
    torch.manual_seed(0)
    plain = _tiny_ceit().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(4, 1, 32, 32)
    outputs = []
    for model in (plain, checkpointed):
        logits = model(x)
        logits.square().sum().backward()
        outputs.append(logits)
    torch.testing.assert_close(outputs[1], outputs[0])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_ceit_reset_classifier() -> None:
    model = _tiny_ceit().eval()
    x = torch.randn(2, 1, 32, 32)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(x).shape == (2, 5)
    model.reset_classifier(0, global_pool="avg")
    assert model.global_pool == "avg" and model(x).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")
