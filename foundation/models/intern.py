"""INTERN's generalist (Shao et al. 2021) as OpenGVLab gv-benchmark's ``Central_Model`` builds it: a main
backbone into which frozen expert backbones' intermediate features are fused.

    h_0 = stem(x)                                   main stream;  e^k_0 = stem_k(x), e^k_i = stage_i(e^k_{i-1})
    h_i = stage_i(h_{i-1}) + sum_k sum_{j in S, j <= i} T^k_{i,j}(e^k_j)     for i in S (the fusion stages)
    features = final(h_last)                        (ViT: norm; ResNet: nothing), head as the main model's

``stage_i`` is block i of a ViT (tokens, (B, N, D)) or ``layer{i+1}`` of a ResNet (maps, (B, C, H, W)).
``S`` (``adapter_stages``) never holds the last stage (Central_Model fuses layer1-3 of a 4-stage ResNet, so
the experts cannot bypass the main network); default: every stage but the last for a ResNet, the ends of
the first three quarters of a ViT's blocks (ViT-B: 2, 5, 8). Each transform T (``Cross_Conv_HRNet_Layer``)
is linear: a 1x1 conv + BatchNorm (ViT tokens: Linear + BatchNorm over channels) when expert stage j has
the resolution of main stage i, 3x3 stride-2 convs + BatchNorm (ReLU between two of them) when j is finer,
1x1 conv + BatchNorm + nearest upsampling when j is coarser; no activation at the end. Its last BatchNorm
starts at zero (Central_Model zeroes every one; the inner ones here keep 1 so a 4x path can learn), so a
fresh generalist computes exactly its main backbone.

The experts have the main backbone's architecture. ``experts``: finished runs (run directories,
checkpoints or .safetensors files, read safely) while training, or their number N once the generalist is
a checkpoint: they are then built empty and take their weights from the generalist's own state dict (the
run's resolved recipe records N, so eval / export / quantize / adapt never need the expert runs). They
keep ``requires_grad=False`` and eval mode whatever ``train()`` says, so the optimizer never sees them.

Registered with timm as ``intern_generalist``: ``timm.create_model("intern_generalist",
base="vit_tiny_patch16_224", experts=[...], adapter_stages=[0, 1, 2], embed_dim=64, ...)`` (other arguments
go to ``base``).
"""

from __future__ import annotations

import math
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


def _stage_info(model: nn.Module, kind: str) -> list[tuple[int, int]]:
    """(channels, reduction) after each stage."""
    by_module = {f["module"]: (f["num_chs"], f["reduction"]) for f in model.feature_info}
    names = [f"blocks.{i}" for i in range(len(model.blocks))] if kind == "vit" else [f"layer{i}" for i in range(1, 5)]
    return [by_module[n] for n in names]


def default_stages(n: int, kind: str) -> list[int]:
    """Central_Model's fusion stages: all but the last (ResNet: layer1-3); a ViT: the ends of its first three
    quarters of blocks (every block but the last when it has fewer than 4)."""
    if kind == "vit" and n >= 4:
        return [n * q // 4 - 1 for q in (1, 2, 3)]
    return list(range(n - 1))


def _zero_last_norm(module: nn.Module) -> None:
    """Small normal weights (Central_Model's N(0, 1e-3)) and the last BatchNorm at zero: the path outputs 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=1e-3)
    norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    nn.init.zeros_(norms[-1].weight)
    nn.init.zeros_(norms[-1].bias)


class TokenFusion(nn.Module):
    """Expert tokens (B, N, d_in) -> (B, N, d_out): a 1x1 convolution on tokens (Linear, no bias) + BatchNorm
    over the channels; linear, zero at start."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)
        self.norm = nn.BatchNorm1d(d_out)
        _zero_last_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).transpose(1, 2)).transpose(1, 2)


def map_fusion(c_in: int, c_out: int, ratio: float) -> nn.Sequential:
    """Expert maps into a main stage ``ratio`` = (main reduction / expert reduction) times coarser
    (``Cross_Conv_HRNet_Layer``): 1x1 conv + BN (+ nearest upsampling when ratio < 1), or log2(ratio)
    3x3 stride-2 convs with BN (ReLU between them, none at the end). Zero at start."""
    if ratio <= 1:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        if ratio < 1:
            layers.append(nn.Upsample(scale_factor=round(1 / ratio), mode="nearest"))
    else:
        layers = []
        for _ in range(round(math.log2(ratio)) - 1):
            layers += [nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU()]
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out)]
    seq = nn.Sequential(*layers)
    _zero_last_norm(seq)
    return seq


def load_expert(model: nn.Module, path: str) -> None:
    """An expert's backbone weights from a finished run (safetensors / weights_only); every tensor of the
    backbone must be there (a classifier head in the source is ignored)."""
    from foundation.checkpoint_io import CheckpointError, load_weights, source_tensors

    report = load_weights(model, source_tensors(path, "backbone"), strict=False)
    if report.missing or report.mismatched:
        raise CheckpointError(f"intern_generalist expert {path}: its backbone does not fit the base architecture "
                              f"({report.summary()}); experts must be runs of the same model.backbone and sizes")


class InternGeneralist(nn.Module):
    """Main backbone + frozen experts + Central_Model's fusion at ``adapter_stages`` (see the module docstring)."""

    def __init__(self, base: str, experts: Sequence[str | nn.Module] | int, adapter_stages: Sequence[int] | None = None,
                 num_classes: int = 1000, in_chans: int = 3, **base_kwargs: Any):
        super().__init__()
        if not experts or (isinstance(experts, int) and experts < 1):
            raise RecipeError("model.kwargs.experts: intern_generalist needs expert runs (run directories, checkpoints "
                              "or .safetensors files; a pipeline's experts_from fills it) or, in a checkpoint, their number")
        self.main = timm.create_model(base, pretrained=False, num_classes=num_classes, in_chans=in_chans, **base_kwargs)
        self.kind = _kind(self.main)
        expert_kwargs = {k: v for k, v in base_kwargs.items() if k != "drop_path_rate"}
        modules = []
        for e in ([None] * experts if isinstance(experts, int) else experts):
            if isinstance(e, nn.Module):
                modules.append(e)
                continue
            m = timm.create_model(base, pretrained=False, num_classes=0, in_chans=in_chans, **expert_kwargs)
            if e is not None:  # a path; None: the weights come with the generalist's checkpoint
                load_expert(m, str(e))
            modules.append(m)
        self.experts = nn.ModuleList(modules)
        self.experts.requires_grad_(False)
        self.experts.eval()
        info = _stage_info(self.main, self.kind)
        n = len(info)
        bad = [i for i in (adapter_stages or []) if not -n <= i < n]
        if bad:
            raise RecipeError(f"model.kwargs.adapter_stages: {bad} out of range: the base has {n} stages")
        stages = sorted({i % n for i in adapter_stages}) if adapter_stages is not None else default_stages(n, self.kind)
        if n - 1 in stages:
            raise RecipeError(f"model.kwargs.adapter_stages: {n - 1} is the last stage; Central_Model never fuses there "
                              f"(the experts would bypass the main network): choose from 0..{n - 2}")
        if not stages:
            raise RecipeError("model.kwargs.adapter_stages: name at least one stage")
        self.adapter_stages = stages
        expert_info = [_stage_info(e, _kind(e)) for e in self.experts]
        # adapters[str(i)][k][str(j)]: expert k's stage-j features into main stage i, for fusion stages j <= i
        self.adapters = nn.ModuleDict()
        for i in stages:
            per_expert = nn.ModuleList()
            for einfo in expert_info:
                per_expert.append(nn.ModuleDict({
                    str(j): (TokenFusion(einfo[j][0], info[i][0]) if self.kind == "vit"
                             else map_fusion(einfo[j][0], info[i][0], info[i][1] / einfo[j][1]))
                    for j in stages if j <= i}))
            self.adapters[str(i)] = per_expert
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
                for k, feats in enumerate(expert_feats):
                    for j, fuse in self.adapters[str(i)][k].items():
                        h = h + fuse(feats[int(j)])
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
def intern_generalist(pretrained: bool = False, *, base: str = "vit_tiny_patch16_224", experts: Sequence[str] | int = (),
                      adapter_stages: Sequence[int] | None = None, **kwargs: Any) -> InternGeneralist:
    """INTERN's generalist on a timm ``base``; ``experts``: run directories / checkpoints / .safetensors of
    ``base`` backbones, or their number (weights from the generalist's checkpoint); ``adapter_stages``: the
    fusion stages, block (ViT) or layer (ResNet) indices, never the last (default: Central_Model's)."""
    if pretrained:
        raise ValueError("intern_generalist: no pretrained weights; experts come from runs (experts=[...])")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm's factory passes them (None); nothing is fetched
    return InternGeneralist(base, experts, adapter_stages, **kwargs)


__all__ = ["InternGeneralist", "TokenFusion", "default_stages", "intern_generalist", "map_fusion"]
