"""INTERN's generalist (Shao et al. 2021; OpenGVLab gv-benchmark's ``Central_Model``): a main backbone to
which frozen expert backbones' intermediate features are added through small learned adapters.

    h_0 = stem(x)                                      main stream;  e^k_0 = stem_k(x)   expert k (frozen)
    h_i = stage_i(h_{i-1}) + sum_k A^k_i(e^k_i)        for i in adapter_stages (else no sum)
    features = final(h_last)                           (ViT: norm; ResNet: nothing), head as the main model's

``stage_i`` is block i of a ViT (tokens, (B, N, D)) or ``layer{i+1}`` of a ResNet (maps, (B, C, H, W)).
An adapter is projection -> norm -> GELU -> projection (ViT: Linear, LayerNorm; CNN: 1x1 conv, BatchNorm)
whose last projection starts at zero, so a fresh generalist computes exactly its main backbone.

The experts have the main backbone's architecture; their weights come from finished runs (``experts``:
run directories, checkpoints or .safetensors files, read safely). They keep ``requires_grad=False`` and
eval mode whatever ``train()`` says, so the optimizer never sees them; they stay in the state dict, so a
generalist checkpoint holds them (and is self-contained).

Registered with timm as ``intern_generalist``: ``timm.create_model("intern_generalist",
base="vit_tiny_patch16_224", experts=[...], adapter_stages=[1], embed_dim=64, ...)`` (other arguments
go to ``base``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.models import register_model
from torch import Tensor, nn

from foundation.config import RecipeError


def _kind(model: nn.Module) -> str:
    if hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "_pos_embed"):
        return "vit"
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return "resnet"
    raise RecipeError(f"intern_generalist: base {type(model).__name__} is neither a timm ViT (patch_embed, blocks) "
                     "nor a timm ResNet (layer1..layer4)")


def _stem(model: nn.Module, kind: str, x: Tensor) -> Tensor:
    if kind == "vit":
        x = model._pos_embed(model.patch_embed(x))  # (B, N, D) with prefix tokens
        return model.norm_pre(model.patch_drop(x))
    return model.maxpool(model.act1(model.bn1(model.conv1(x))))  # (B, C, H/4, W/4)


def _stages(model: nn.Module, kind: str) -> list[nn.Module]:
    return list(model.blocks) if kind == "vit" else [getattr(model, f"layer{i}") for i in range(1, 5)]


def _final(model: nn.Module, kind: str, x: Tensor) -> Tensor:
    return model.norm(x) if kind == "vit" else x


def _stage_widths(model: nn.Module, kind: str) -> list[int]:
    by_module = {f["module"]: f["num_chs"] for f in model.feature_info}
    names = [f"blocks.{i}" for i in range(len(model.blocks))] if kind == "vit" else [f"layer{i}" for i in range(1, 5)]
    return [by_module[n] for n in names]


class TokenAdapter(nn.Module):
    """Expert tokens (B, N, d_in) -> (B, N, d_out): Linear -> LayerNorm -> GELU -> Linear (zero at start)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)
        self.act = nn.GELU()
        self.out = nn.Linear(d_out, d_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.norm(self.proj(x))))


class MapAdapter(nn.Module):
    """Expert maps (B, c_in, H, W) -> (B, c_out, H, W): 1x1 conv -> BatchNorm -> GELU -> 1x1 conv (zero at start)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = nn.GELU()
        self.out = nn.Conv2d(c_out, c_out, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.norm(self.proj(x))))


def load_expert(model: nn.Module, path: str) -> None:
    """An expert's backbone weights from a finished run (safetensors / weights_only); every tensor of the
    backbone must be there (a classifier head in the source is ignored)."""
    from foundation.checkpoint_io import CheckpointError, load_weights, source_tensors

    report = load_weights(model, source_tensors(path, "backbone"), strict=False)
    if report.missing or report.mismatched:
        raise CheckpointError(f"intern_generalist expert {path}: its backbone does not fit the base architecture "
                              f"({report.summary()}); experts must be runs of the same model.backbone and sizes")


class InternGeneralist(nn.Module):
    """Main backbone + frozen experts + adapters at ``adapter_stages`` (see the module docstring)."""

    def __init__(self, base: str, experts: Sequence[str | nn.Module], adapter_stages: Sequence[int] | None = None,
                 num_classes: int = 1000, in_chans: int = 3, **base_kwargs: Any):
        super().__init__()
        if not experts:
            raise RecipeError("model.kwargs.experts: intern_generalist needs expert runs (run directories, checkpoints "
                              "or .safetensors files; a pipeline's experts_from fills it)")
        self.main = timm.create_model(base, pretrained=False, num_classes=num_classes, in_chans=in_chans, **base_kwargs)
        self.kind = _kind(self.main)
        expert_kwargs = {k: v for k, v in base_kwargs.items() if k != "drop_path_rate"}
        modules = []
        for e in experts:
            if isinstance(e, nn.Module):
                modules.append(e)
                continue
            m = timm.create_model(base, pretrained=False, num_classes=0, in_chans=in_chans, **expert_kwargs)
            load_expert(m, str(e))
            modules.append(m)
        self.experts = nn.ModuleList(modules)
        self.experts.requires_grad_(False)
        self.experts.eval()
        widths = _stage_widths(self.main, self.kind)
        n = len(widths)
        stages = sorted({i % n for i in adapter_stages}) if adapter_stages is not None else [n - 1]
        bad = [i for i in (adapter_stages or []) if not -n <= i < n]
        if bad:
            raise RecipeError(f"model.kwargs.adapter_stages: {bad} out of range: the base has {n} stages")
        self.adapter_stages = stages
        adapter = TokenAdapter if self.kind == "vit" else MapAdapter
        expert_widths = [_stage_widths(e, _kind(e)) for e in self.experts]
        # adapters[str(stage)][k]: expert k's features at that stage into the main stream
        self.adapters = nn.ModuleDict({
            str(i): nn.ModuleList(adapter(w[i], widths[i]) for w in expert_widths) for i in stages})
        self.num_classes = self.main.num_classes
        self.num_features = self.main.num_features
        self.head_hidden_size = getattr(self.main, "head_hidden_size", self.main.num_features)
        self.pretrained_cfg = self.default_cfg = dict(getattr(self.main, "pretrained_cfg", {}) or {})

    def train(self, mode: bool = True) -> InternGeneralist:
        super().train(mode)
        self.experts.eval()  # frozen experts: BatchNorm statistics and dropout stay as trained
        return self

    @torch.no_grad()
    def expert_features(self, x: Tensor) -> list[dict[int, Tensor]]:
        """Each expert's features after every adapter stage: ``[{stage: (B, N, D) or (B, C, H, W)}]``."""
        last = self.adapter_stages[-1]
        out = []
        for expert in self.experts:
            kind, feats = _kind(expert), {}
            h = _stem(expert, kind, x)
            for i, stage in enumerate(_stages(expert, kind)[: last + 1]):
                h = stage(h)
                if i in self.adapter_stages:
                    feats[i] = h
            out.append(feats)
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        expert_feats = self.expert_features(x)
        h = _stem(self.main, self.kind, x)
        for i, stage in enumerate(_stages(self.main, self.kind)):
            h = stage(h)
            if i in self.adapter_stages:
                adapters = self.adapters[str(i)]
                for k, feats in enumerate(expert_feats):
                    h = h + adapters[k](feats[i])
        return _final(self.main, self.kind, h)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.main.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.main.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        self.main.reset_classifier(num_classes, *args, **kwargs)
        self.num_classes = num_classes

    def no_weight_decay(self) -> set[str]:
        return {f"main.{n}" for n in getattr(self.main, "no_weight_decay", lambda: set())()}


@register_model
def intern_generalist(pretrained: bool = False, *, base: str = "vit_tiny_patch16_224", experts: Sequence[str] = (),
                      adapter_stages: Sequence[int] | None = None, **kwargs: Any) -> InternGeneralist:
    """INTERN's generalist on a timm ``base``; ``experts``: run directories / checkpoints / .safetensors of
    ``base`` backbones; ``adapter_stages``: block (ViT) or layer (ResNet) indices (default: the last)."""
    if pretrained:
        raise ValueError("intern_generalist: no pretrained weights; experts come from runs (experts=[...])")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm's factory passes them (None); nothing is fetched
    return InternGeneralist(base, experts, adapter_stages, **kwargs)


__all__ = ["InternGeneralist", "MapAdapter", "TokenAdapter", "intern_generalist"]
