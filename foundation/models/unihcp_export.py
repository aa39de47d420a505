"""UniHCP as plain tensor functions: the seam robustness, SysNoise, PTQ and ONNX export share.

``UniHCPNet`` returns per-layer dicts and computes its positions from the input size on every call;
the tools that perturb, quantize or export a network want ``model(images) -> tensor(s)`` built from
``nn.Linear``/``nn.Conv2d`` modules they can see. ``UniHCPDeploy(net, image_size)`` is one task's
network in that form, computing exactly what ``net`` computes in eval mode (the last decoder layer):

- the positions of the memory (the image grid at ``image_size``) and of the queries (detection: of its
  anchors) are precomputed buffers — constants for a fixed input size, as in an exported graph;
- each decoder layer is a ``DecoderBlock`` on one packed tensor ``[queries; memory]`` (B, Q + N, C), its
  attentions spelled out as ``q/k/v/out`` ``nn.Linear`` (``nn.MultiheadAttention`` calls its weights
  functionally, so a quantizer placed by module hooks would never see them), so PTQ reconstructs
  encoder blocks (timm ``Block``) and decoder layers alike, one tensor in, one out;
- ``forward`` returns the task's outputs as a tuple in ``OUTPUTS[kind]`` order; ``packed = True`` returns
  them flattened into one (B, D) tensor (what the quantizer's probe needs), ``unpack`` undoes it.

``UniHCPTensors`` holds several tasks' deploy networks: ``forward(images, task) -> tuple``.
``TaskOutputs`` turns any ``images -> tuple`` function (a quantized model, an onnxruntime session) back
into the ``model(images)[-1] -> dict`` form the ``unihcp_*`` evaluations read.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from foundation.models.unihcp import DecoderLayer, UniHCPNet, grid_points

OUTPUTS = {
    "pose": ("logits", "maps"),
    "parsing": ("logits", "maps"),
    "attributes": ("logits",),
    "reid": ("feature", "logits"),
    "detection": ("logits", "boxes"),
}


def _unshare(m: nn.Module) -> nn.Module:
    """The module a ``SharedBackbone`` reference points at (or ``m``)."""
    return m.__dict__.get("target", m)


def _fix_positions(encoder: nn.Module, grid: tuple[int, int]) -> None:
    """A timm ViT with ``dynamic_img_size`` resamples its position grid to the input's on every call (bicubic with
    antialias, which ONNX has no operator for): resample it once to ``grid``, the deploy input's, so the call
    finds the sizes equal and adds it as it is. The values are the ones each call computed."""
    pos, patch = getattr(encoder, "pos_embed", None), getattr(encoder, "patch_embed", None)
    if pos is None or patch is None or not getattr(encoder, "dynamic_img_size", False):
        return
    old = tuple(patch.grid_size)
    if old == tuple(grid):
        return
    from timm.layers import resample_abs_pos_embed

    with torch.no_grad():
        new = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(old),
                                     num_prefix_tokens=0 if encoder.no_embed_class else encoder.num_prefix_tokens)
    encoder.pos_embed = nn.Parameter(new, requires_grad=pos.requires_grad)
    patch.grid_size = tuple(grid)
    patch.num_patches = grid[0] * grid[1]
    patch.img_size = (grid[0] * patch.patch_size[0], grid[1] * patch.patch_size[1])


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (batch first, no mask, no dropout at inference) with its projections as
    ``nn.Linear`` modules: ``forward(query, key, value)`` equals ``mha(query, key, value)[0]``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> Attention:
        if not mha.batch_first or mha.in_proj_weight is None or mha.bias_k is not None:
            raise ValueError("Attention.from_mha: a batch-first attention with one packed input projection")
        width = mha.embed_dim
        new = cls(width, mha.num_heads)
        with torch.no_grad():
            w, b = mha.in_proj_weight, mha.in_proj_bias
            for i, lin in enumerate((new.q, new.k, new.v)):
                lin.weight.copy_(w[i * width:(i + 1) * width])
                lin.bias.copy_(b[i * width:(i + 1) * width] if b is not None else torch.zeros(width))
            new.out.weight.copy_(mha.out_proj.weight)
            new.out.bias.copy_(mha.out_proj.bias if mha.out_proj.bias is not None else torch.zeros(width))
        return new.to(mha.in_proj_weight.device)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        b, lq, c = query.shape
        h, d = self.heads, c // self.heads
        q = self.q(query).view(b, lq, h, d).transpose(1, 2)
        k = self.k(key).view(b, -1, h, d).transpose(1, 2)
        v = self.v(value).view(b, -1, h, d).transpose(1, 2)
        attn = torch.softmax((q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1), dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, lq, c))


class DecoderBlock(nn.Module):
    """One ``DecoderLayer`` on a packed ``[queries; memory]`` tensor (B, Q + N, C) → the same with the queries
    updated (cross-attention → self-attention → FFN, post-norm); the positions are buffers."""

    def __init__(self, layer: DecoderLayer, q_pos: Tensor, m_pos: Tensor):
        super().__init__()
        self.cross = Attention.from_mha(layer.cross)
        self.self_attn = Attention.from_mha(layer.self_attn)
        self.ffn = copy.deepcopy(layer.ffn)
        self.norms = copy.deepcopy(layer.norms)
        self.register_buffer("q_pos", q_pos.detach().clone())
        self.register_buffer("m_pos", m_pos.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        nq = self.q_pos.shape[0]
        q, memory = x[:, :nq], x[:, nq:]
        q = self.norms[0](q + self.cross(q + self.q_pos, memory + self.m_pos, memory))
        k = q + self.q_pos
        q = self.norms[1](q + self.self_attn(k, k, q))
        q = self.norms[2](q + self.ffn(q))
        return torch.cat([q, memory], 1)


class UniHCPDeploy(nn.Module):
    """One UniHCP task at a fixed input size as ``images (B, 3, H, W) -> tuple`` (``OUTPUTS[kind]``), equal to
    ``net.eval()(images)[-1]`` (test: tests/test_unihcp_deploy.py). The modules are copies: ``net`` is not
    changed, and quantizing this one leaves the checkpoint's network as it was."""

    def __init__(self, net: UniHCPNet, image_size: int | Sequence[int], packed: bool = False):
        super().__init__()
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.kind, self.image_size, self.packed = net.kind, hw, packed
        shared = _unshare(net.shared)
        self.encoder = copy.deepcopy(_unshare(net.encoder)).eval()
        patch = self.encoder.patch_embed.patch_size
        self.grid = (hw[0] // patch[0], hw[1] // patch[1])
        self.prefix = int(getattr(self.encoder, "num_prefix_tokens", 0))
        _fix_positions(self.encoder, self.grid)
        self.proj = copy.deepcopy(shared.proj)
        with torch.no_grad():
            dev = shared.proj.weight.device
            m_pos = shared.position(grid_points(*self.grid, dev))
            q, q_pos, anchors = net.queries(1)
        self.register_buffer("query", q[0].detach().clone())
        self.blocks = nn.ModuleList(DecoderBlock(layer, q_pos[0], m_pos) for layer in shared.layers)
        self.norm = copy.deepcopy(shared.norm)
        self.reid_feature_norm = net.reid_feature_norm
        self.num_queries = q.shape[1]
        self.width = shared.width
        if self.kind in ("pose", "parsing"):
            self.neck = copy.deepcopy(shared.neck)
            self.feature_unit = copy.deepcopy(shared.feature_unit)
        if self.kind != "reid":
            self.class_unit = copy.deepcopy(shared.class_unit)
        if self.kind == "detection":
            self.box_mlp = copy.deepcopy(net.box_mlp)
            self.register_buffer("anchor_logit", torch.logit(anchors[0].detach(), eps=1e-4).clone())
        if self.kind == "reid":
            self.bn = copy.deepcopy(net.bn)
            self.classifier = copy.deepcopy(net.classifier)
        self.keypoint_flip_pairs = getattr(net, "keypoint_flip_pairs", None)
        self.eval()

    def shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of each output, in ``OUTPUTS[kind]`` order."""
        nq, (h, w) = self.num_queries, self.grid
        if self.kind in ("pose", "parsing"):
            return [(nq,), (nq, 4 * h, 4 * w)]
        if self.kind == "attributes":
            return [(nq,)]
        if self.kind == "reid":
            return [(nq * self.width,), (self.classifier.out_features,)]
        return [(nq,), (nq, 4)]

    def unpack(self, flat: Tensor) -> tuple[Tensor, ...]:
        """A packed (B, D) output → the tuple."""
        outs, start = [], 0
        for shape in self.shapes():
            n = math.prod(shape)
            outs.append(flat[:, start:start + n].reshape(flat.shape[0], *shape))
            start += n
        return tuple(outs)

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, ...]:
        tokens = self.encoder.forward_features(images)[:, self.prefix:]
        b = tokens.shape[0]
        memory = self.proj(tokens)
        x = torch.cat([self.query.expand(b, -1, -1), memory], 1)
        for blk in self.blocks:
            x = blk(x)
        q = x[:, :self.num_queries]
        if self.kind == "reid":
            feature = (self.norm(q) if self.reid_feature_norm else q).flatten(1)
            outs: tuple[Tensor, ...] = (feature, self.classifier(self.bn(feature)))
        else:
            q = self.norm(q)
            logits = self.class_unit(q).squeeze(-1)
            if self.kind in ("pose", "parsing"):
                h, w = self.grid
                fmap = self.neck(tokens.transpose(1, 2).reshape(b, -1, h, w))
                outs = (logits, torch.einsum("bqc,bchw->bqhw", self.feature_unit(q), fmap))
            elif self.kind == "detection":
                delta = self.box_mlp(q)
                centre = (self.anchor_logit + delta[..., :2]).sigmoid()
                outs = (logits, torch.cat([centre, (delta[..., 2:] - 2.0).sigmoid()], -1))
            else:
                outs = (logits,)
        if self.packed:
            return torch.cat([o.flatten(1) for o in outs], 1)
        return outs


class UniHCPTensors(nn.Module):
    """Several tasks' ``UniHCPDeploy`` networks: ``forward(images, task) -> tuple`` of that task's outputs."""

    def __init__(self, deploys: dict[str, UniHCPDeploy]):
        super().__init__()
        self.tasks = nn.ModuleDict(deploys)

    def forward(self, images: Tensor, task: str) -> tuple[Tensor, ...]:
        return self.tasks[task](images)


class TaskOutputs(nn.Module):
    """``fn(images) -> tuple`` (a deploy network, a quantized one, an onnxruntime session) in the evaluations'
    form: ``forward(images) -> [dict]`` (the last decoder layer only), with the pose flip pairs."""

    def __init__(self, fn: Callable[[Tensor], Sequence], kind: str, flip_pairs: list | None = None,
                 module: nn.Module | None = None):
        super().__init__()
        self.fn, self.kind = fn, kind
        self.keypoint_flip_pairs = flip_pairs
        self.inner = module  # registered so .eval()/.to() reach it
        self.eval()

    def train(self, mode: bool = True) -> TaskOutputs:
        """Inference only: stays in eval mode (the evaluations restore the mode they found; a ReID network's
        BatchNorm must never see batch statistics)."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        outs = self.fn(images)
        outs = [torch.as_tensor(o) if not isinstance(o, Tensor) else o for o in outs]
        return [dict(zip(OUTPUTS[self.kind], outs))]


ONNX_OPSET = 17


@torch.no_grad()
def export_onnx(deploy: UniHCPDeploy, path, example: Tensor | None = None) -> str:
    """The task's network as an FP32 ONNX graph (input ``image`` (B, 3, H, W), dynamic batch; outputs named
    ``OUTPUTS[kind]``). ``deploy`` is exported as is (packed or not)."""
    import warnings
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if example is None:
        example = torch.zeros(1, 3, *deploy.image_size, device=next(deploy.parameters()).device)
    names = ["packed"] if deploy.packed else list(OUTPUTS[deploy.kind])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(deploy.eval(), (example,), str(path), input_names=["image"], output_names=names,
                          dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=ONNX_OPSET, dynamo=False)
    return str(path)


class OrtTask:
    """An exported UniHCP task run by onnxruntime (CPU): ``images -> tuple`` of tensors on the input's device
    (a packed graph is unpacked with ``unpack``)."""

    def __init__(self, path, unpack: Callable[[Tensor], tuple] | None = None, threads: int | None = None):
        from foundation.quant.onnx_export import ort_session

        self.path, self.unpack = str(path), unpack
        self.session = ort_session(path, threads)

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        x = images.detach().cpu().float().numpy()
        outs = tuple(torch.from_numpy(o).to(images.device) for o in self.session.run(None, {"image": x}))
        return self.unpack(outs[0]) if self.unpack is not None else outs


def deploy_task(task, data, packed: bool = False) -> UniHCPDeploy:
    """A ``UniHCPTask``'s network at its ``DataConfig``'s input size, on the task's device."""
    return UniHCPDeploy(task.model, data.image_size, packed=packed)


def is_unihcp_checkpoint(checkpoint) -> bool:
    """Whether a checkpoint's recipe names a ``unihcp_*`` task (read from its recipe, no weights loaded)."""
    from foundation.checkpoint_io import resolve_checkpoint
    from foundation.config import validate
    from foundation.trust import check_recipe, read_artefact_yaml

    try:  # what foundation.artefacts.load_artefact_recipe does (importing it here would close an import circle)
        step = resolve_checkpoint(checkpoint)
        file = step / "recipe.yaml"
        recipe = validate(check_recipe(read_artefact_yaml(file), step, str(file)), str(file))
    except Exception:  # noqa: BLE001 - not a checkpoint this can read: the caller's own loading reports it
        return False
    names = [recipe.task.name] if recipe.tasks is None else [e.task.name for e in recipe.tasks.values()]
    return any(str(n).startswith("unihcp_") for n in names)


__all__ = ["Attention", "DecoderBlock", "OUTPUTS", "OrtTask", "export_onnx", "TaskOutputs", "UniHCPDeploy", "UniHCPTensors", "deploy_task",
           "is_unihcp_checkpoint"]
