"""UniHCP's five tasks (Ci et al., CVPR 2023): pose, parsing, attributes, ReID, pedestrian detection.

Each task is a ``UniHCPNet`` (foundation/models/unihcp.py) plus its targets and losses
(foundation/losses/unihcp.py). In a multi-task recipe every ``unihcp_*`` task reaches the shared ViT and
the shared neck + decoder + interpreter units (``MultiTask.shared["unihcp"]``, built by the first
UniHCP task with its ``task.unihcp`` sizes; the others must agree) through ``SharedBackbone``
references, so the only parameters a task owns are its queries (and detection's box MLP, ReID's
BN + classifier). A single-task recipe builds its own encoder and decoder (fine-tuning one task).

Batches come from human-centric shards with ``data.human: true``: ``image`` (B, 3, H, W) (``data.image_size``: a square or a
rectangle; detection may take per-image sizes with ``data.resize``, H × W then varying from batch to batch) and
``targets`` (foundation/data/human_transforms.py). The loss sums every supervised decoder layer's loss
(deep supervision: as released, every layer and the initial prediction for pose, parsing and detection,
the last layer for attributes and ReID); the logged terms are the last layer's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from foundation.config import DataConfig, ModelConfig, RecipeError, TaskConfig, UniHCPConfig
from foundation.losses.unihcp import (
    attribute_loss, detection_loss, heatmap_targets, parsing_loss, pose_loss, reid_loss,
)
from foundation.models.heads import SharedBackbone
from foundation.models.unihcp import UniHCPNet, UniHCPShared

SHARED_KEY = "unihcp"
DECODER_FIELDS = ("width", "layers", "heads", "ffn", "dropout", "neck_mid", "neck_norm")
# the released deep supervision: every layer (+ the initial prediction) for these; attributes and ReID the last only
DEEP_SUPERVISED = ("pose", "parsing", "detection")


def _human_task(data: DataConfig) -> dict:
    from foundation.data.humans import task_info
    from foundation.data.shards import read_manifest

    spec = (data.train or data.val or "").split("::")[0]
    manifest = read_manifest(spec) if spec else None
    if manifest is None:
        raise RecipeError(f"data.train {spec!r}: no manifest.json next to the shards; UniHCP tasks read their "
                          "vocabulary (joints, classes, attributes, ids) from it")
    return task_info(manifest)


def _encoder_width(encoder: nn.Module) -> int:
    if not hasattr(encoder, "forward_features") or not hasattr(encoder, "patch_embed"):
        raise RecipeError(f"model.backbone: UniHCP needs a plain ViT (timm VisionTransformer with patch_embed); got "
                          f"{type(encoder).__name__}")
    return int(getattr(encoder, "embed_dim", None) or encoder.num_features)


class UniHCPTask(nn.Module):
    """One UniHCP task: ``self.model`` the network, ``forward(batch) -> {"loss", <terms>}``."""

    kind = ""
    backbone_name = "model.encoder"  # model.init part=backbone and layer decay: the ViT

    def __init__(self, model: UniHCPNet, cfg: UniHCPConfig, meta: dict):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.meta = meta  # the manifest's human_task entry (names, skeleton, ...)

    @classmethod
    def shared_parts(cls, model_cfg: ModelConfig, backbone: nn.Module) -> dict:
        """UniHCP's shared decoder is sized by ``task.unihcp``, which this hook does not see: ``build`` makes
        it once under ``shared["unihcp"]`` (declaring the hook is what passes ``shared=`` to ``build``)."""
        return {}

    @classmethod
    def num_queries(cls, cfg: UniHCPConfig, meta: dict) -> int:
        raise NotImplementedError

    @classmethod
    def build(cls, model: ModelConfig, task: TaskConfig, data: DataConfig, backbone: nn.Module | None = None,
              shared: dict | None = None) -> UniHCPTask:
        from foundation.models.factory import create_backbone

        if not data.human:
            raise RecipeError(f"task {task.name}: set data.human: true (UniHCP reads human-centric targets)")
        cfg = task.unihcp
        meta = cfg.vocabulary if cfg.vocabulary is not None else _human_task(data)  # a run's own copy first
        if meta.get("kind") != cls.kind:
            raise RecipeError(f"task {task.name}: data.train holds {meta.get('kind')!r} shards, expected {cls.kind!r}")
        own = backbone is None
        encoder = create_backbone(model.model_copy(update={"num_classes": 0}), in_chans=data.in_chans) if own else backbone
        width = _encoder_width(encoder)
        patch = tuple(getattr(encoder.patch_embed, "patch_size", (1, 1)))
        if not isinstance(data.image_size, int) and any(v % p for v, p in zip(data.input_hw, patch)):
            raise RecipeError(f"task {task.name}: data.image_size {list(data.input_hw)} must be a multiple of the "
                              f"ViT's {patch[0]} x {patch[1]} patch (the token grid and the stride-4 maps follow it)")
        if data.resize is not None and cls.kind != "detection":
            raise RecipeError(f"task {task.name}: data.resize (per-image sizes) is read by unihcp_detection only; "
                              f"{cls.kind} takes data.image_size")
        if data.resize is not None and any(data.resize.multiple % p for p in patch):
            raise RecipeError(f"task {task.name}: data.resize.multiple {data.resize.multiple} must be a multiple of "
                              f"the ViT's {patch[0]} x {patch[1]} patch (inputs are padded to it)")
        if data.resize is not None and not getattr(encoder, "dynamic_img_size", False):
            raise RecipeError(f"task {task.name}: data.resize needs model.kwargs.dynamic_img_size: true (the position "
                              "grid interpolated to each input's token grid)")
        if cfg.grad_checkpointing:
            encoder.set_grad_checkpointing(True)
        sizes = {f: getattr(cfg, f) for f in DECODER_FIELDS}
        if own:
            decoder: nn.Module = UniHCPShared(width, **sizes)
        else:
            if shared is None:
                raise RecipeError("UniHCP tasks on a shared backbone need the multi-task builder's shared parts")
            if SHARED_KEY not in shared:
                shared[SHARED_KEY] = UniHCPShared(width, **sizes)
                shared[SHARED_KEY].sizes = sizes
            elif shared[SHARED_KEY].sizes != sizes:
                raise RecipeError(f"tasks.*.task.unihcp: the UniHCP tasks share one decoder and must agree on "
                                  f"{DECODER_FIELDS}; {task.name} asks {sizes}, another {shared[SHARED_KEY].sizes}")
            decoder = SharedBackbone(shared[SHARED_KEY])
            encoder = SharedBackbone(encoder)
        num_ids = int((meta.get("num_ids") or {}).get("train", 0)) if cls.kind == "reid" else 0
        net = UniHCPNet(cls.kind, encoder, decoder, cls.num_queries(cfg, meta), num_ids=num_ids,
                        det_patterns=cfg.det_patterns, deep_supervision=cls.deep_supervised(cfg),
                        initial_prediction=cfg.initial_prediction, reid_feature_norm=cfg.reid_feature_norm)
        return cls(net, cfg, meta)

    @classmethod
    def deep_supervised(cls, cfg: UniHCPConfig) -> bool:
        """Whether every decoder layer is supervised: ``deep_supervision``, or unset, the release's choice."""
        return cfg.deep_supervision if cfg.deep_supervision is not None else cls.kind in DEEP_SUPERVISED

    @staticmethod
    def unfold(batch: dict) -> dict:
        """A P x K batch (data.id_instances: images (P, K, 3, H, W)) as P*K images, each with its sample's targets."""
        if batch["image"].ndim != 5:
            return batch
        p, k = batch["image"].shape[:2]
        return {"image": batch["image"].flatten(0, 1),
                "targets": {n: v.repeat_interleave(k, 0) if isinstance(v, Tensor) and v.ndim and len(v) == p else v
                            for n, v in batch["targets"].items()}}

    def forward(self, batch: dict) -> dict[str, Tensor]:
        batch = self.unfold(batch)
        outputs = self.model(batch["image"])  # one dict per supervised decoder layer
        targets = self.prepare(batch, outputs[-1])
        total, terms = None, {}
        for out in outputs:
            terms = self.layer_loss(out, targets)
            layer = sum(terms.values())
            total = layer if total is None else total + layer
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}

    def prepare(self, batch: dict, out: dict[str, Tensor]) -> dict:
        """Targets shared by every layer's loss (built once per step); ``out`` is the last layer's output."""
        return batch["targets"]

    def layer_loss(self, out: dict[str, Tensor], targets: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}


class UniHCPPose(UniHCPTask):
    """One query per joint: a heatmap from the feature unit, a visibility logit from the class unit."""

    kind = "pose"
    default_evals = ("unihcp_pose",)

    def __init__(self, model, cfg, meta):
        super().__init__(model, cfg, meta)
        from foundation.data.humans import flip_pairs

        # left/right joint pairs, for evaluation's flip test (a plain attribute: not in the state dict)
        model.keypoint_flip_pairs = [list(p) for p in (meta.get("flip_pairs") or flip_pairs(meta["keypoint_names"]))]

    @classmethod
    def num_queries(cls, cfg, meta):
        return len(meta["keypoint_names"])

    def prepare(self, batch, out):
        h, w = out["maps"].shape[-2:]  # stride 4 with 16-px patches
        maps, weight = heatmap_targets(batch["targets"]["keypoints"], (h, w), batch["image"].shape[-1] / w,
                                       self.cfg.heatmap_sigma)
        return {"maps": maps, "weight": weight}

    def layer_loss(self, out, targets):
        return pose_loss(out["maps"].float(), out["logits"].float(), targets["maps"], targets["weight"],
                         self.cfg.pose_mse_scale, self.cfg.pose_vis_weight)


class UniHCPParsing(UniHCPTask):
    """One query per class: a mask from the feature unit, a presence logit from the class unit."""

    kind = "parsing"
    default_evals = ("unihcp_parsing",)

    @classmethod
    def num_queries(cls, cfg, meta):
        return len(meta["class_names"])

    def __init__(self, model, cfg, meta):
        super().__init__(model, cfg, meta)
        c = len(meta["class_names"])
        if cfg.parse_class_ratios is not None and len(cfg.parse_class_ratios) != c:
            raise RecipeError(f"task.unihcp.parse_class_ratios: {len(cfg.parse_class_ratios)} values for {c} classes")

    def prepare(self, batch, out):
        ratios = self.cfg.parse_class_ratios
        dev = batch["targets"]["label_map"].device
        return {"label_map": batch["targets"]["label_map"],
                "ratios": torch.tensor(ratios, device=dev) if ratios is not None else None}

    def layer_loss(self, out, targets):
        c = self.cfg  # points drawn per layer and mask (Mask2Former, the release)
        return parsing_loss(out["logits"], out["maps"], targets["label_map"], c.dice_points,
                            int(self.meta.get("ignore_index", 255)), c.mask_weight, c.dice_weight, c.presence_weight,
                            class_ratios=targets["ratios"], sampling=c.point_sampling, oversample=c.oversample_ratio,
                            importance=c.importance_sample_ratio)


class UniHCPAttributes(UniHCPTask):
    """One query per attribute; its class-unit logit is the attribute's."""

    kind = "attributes"
    default_evals = ("unihcp_attributes",)

    def __init__(self, model, cfg, meta):
        super().__init__(model, cfg, meta)
        a = len(meta["attribute_names"])
        if cfg.attr_pos_ratios is not None and len(cfg.attr_pos_ratios) != a:
            raise RecipeError(f"task.unihcp.attr_pos_ratios: {len(cfg.attr_pos_ratios)} values for {a} attributes")
        # positives / labelled entries seen so far (the dataset's ratios when attr_pos_ratios is unset)
        self.register_buffer("attr_counts", torch.zeros(2, a, dtype=torch.float64))

    @classmethod
    def num_queries(cls, cfg, meta):
        return len(meta["attribute_names"])

    def prepare(self, batch, out):
        attrs = batch["targets"]["attributes"]
        if self.cfg.attr_pos_ratios is not None:
            ratio = torch.tensor(self.cfg.attr_pos_ratios, device=attrs.device)
        else:
            if self.training:
                self.attr_counts[0] += (attrs == 1).sum(0).to(self.attr_counts)
                self.attr_counts[1] += (attrs >= 0).sum(0).to(self.attr_counts)
            ratio = ((self.attr_counts[0] + 1) / (self.attr_counts[1] + 2)).float()
        return {"attributes": attrs, "ratio": ratio}

    def layer_loss(self, out, targets):
        return {"bce": attribute_loss(out["logits"], targets["attributes"], targets["ratio"])}


class UniHCPReID(UniHCPTask):
    """``reid_queries`` queries; their outputs concatenated are the feature (triplet; L2-normalised for
    retrieval), BN → classifier gives the identity logits (CE)."""

    kind = "reid"
    default_evals = ("unihcp_reid",)

    @classmethod
    def num_queries(cls, cfg, meta):
        return cfg.reid_queries

    def layer_loss(self, out, targets):
        return reid_loss(out["logits"], out["feature"], targets["label"], self.cfg.triplet_weight)


class UniHCPDetection(UniHCPTask):
    """``det_patterns`` × ``det_anchors`` anchor queries; class unit → person score, box MLP → box."""

    kind = "detection"
    default_evals = ("unihcp_detection",)

    @classmethod
    def num_queries(cls, cfg, meta):
        return cfg.det_anchors

    def prepare(self, batch, out):
        t, (h, w) = batch["targets"], batch["image"].shape[-2:]
        dev = batch["image"].device
        size = torch.tensor([w, h, w, h], dtype=torch.float32, device=dev)  # xyxy input pixels -> [0, 1] per axis
        return {"boxes": [b.to(dev) / size for b in t["boxes"]], "ignore": [b.to(dev) / size for b in t["ignore"]]}

    def layer_loss(self, out, targets):
        c = self.cfg
        return detection_loss(out["logits"], out["boxes"], targets["boxes"], targets["ignore"], cost_class=c.cost_class,
                              cost_bbox=c.cost_bbox, cost_giou=c.cost_giou, alpha=c.focal_alpha, gamma=c.focal_gamma,
                              ioa_threshold=c.det_ignore_ioa)


UNIHCP_TASKS = {
    "unihcp_pose": UniHCPPose,
    "unihcp_parsing": UniHCPParsing,
    "unihcp_attributes": UniHCPAttributes,
    "unihcp_reid": UniHCPReID,
    "unihcp_detection": UniHCPDetection,
}

__all__ = ["UNIHCP_TASKS", "UniHCPAttributes", "UniHCPDetection", "UniHCPParsing", "UniHCPPose", "UniHCPReID",
           "UniHCPTask"]
