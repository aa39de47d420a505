"""Recipe schema: YAML validated into typed pydantic models.

A recipe is one YAML file. It may name a ``base:`` recipe (one level, path relative to the file) whose
values it overrides section by section. Command-line overrides are dotted ``key=value`` pairs whose
values are parsed as YAML (``optim.lr=3e-4``, ``data.weights=[1,2]``).

Every mistake fails at load, before any work starts, with the key path, the allowed values and a
close-match suggestion: ``RecipeError`` (the CLI turns it into exit code 2).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe that cannot be loaded; the message names the key path and what is allowed."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TopDownConfig(Section):
    """UniHCP's released top-down pose crop (``data.pose_crop: top_down``): mmpose's TopDown pipeline as the
    release's COCOPosDatasetDev builds it (OpenGVLab/UniHCP ``core/data/datasets/images/pos_dataset_dev.py``,
    ``core/data/transforms/pose_transforms.py``). The horizontal flip's probability is ``data.augment.hflip``."""

    padding: float = Field(1.25, gt=0)  # the aspect-expanded box x padding (_xywh2cs: scale * 1.25)
    # training: box size x clip(N(1, sf), 1 - sf, 1 + sf) (TopDownGetRandomScaleRotation scale_factor 0.5)
    scale_factor: float = Field(0.5, ge=0, lt=1)
    rot_factor: float = Field(40.0, ge=0)  # training: rotation clip(N(0, rf), -2 rf, 2 rf) degrees (rot_factor 40)
    rot_prob: float = Field(0.6, ge=0, le=1)  # ... applied with this probability (rot_prob's default 0.6)
    # TopDownHalfBodyTransform(num_joints_half_body=8, prob_half_body=0.3): with more than this many visible joints,
    # with this probability, the box of the upper or lower body's joints (their extent x 1.5) replaces the person's
    half_body_joints: int = Field(8, ge=0)
    half_body_prob: float = Field(0.3, ge=0, le=1)
    half_body_padding: float = Field(1.5, gt=0)
    # _xywh2cs in training: with this probability the centre moves by centre_shift x (U - 0.5) x (w, h), drawn once
    # per person (the release draws it when the dataset is built)
    centre_shift_prob: float = Field(0.3, ge=0, le=1)
    centre_shift: float = Field(0.4, ge=0, lt=2)


class AugmentConfig(Section):
    """Training-time image augmentation, passed to ``timm.data.create_transform``."""

    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    # brightness = contrast = saturation strength, or (brightness, contrast, saturation[, hue]); None: off
    color_jitter: float | tuple[float, float, float] | tuple[float, float, float, float] | None = None
    color_jitter_prob: float | None = Field(None, ge=0, le=1)  # jitter applied with this probability; None: always
    grayscale_prob: float = Field(0.0, ge=0, le=1)  # random grayscale (MoCo v2: 0.2)
    gaussian_blur_prob: float = Field(0.0, ge=0, le=1)  # Gaussian blur, sigma 0.1-2, kernel 23 (MoCo v2: 0.5)
    auto_augment: str | None = None  # timm policy string, e.g. "rand-m9-mstd0.5-inc1" (RandAugment)
    interpolation: str = "bicubic"
    re_prob: float = 0.0  # random erasing probability
    crop_pct: float = 1.0  # evaluation: resize to size / crop_pct, then centre crop


class ShortSideResize(Section):
    """Per-image input sizes with the aspect kept (DETR's and UniHCP's released detection pipeline,
    ``core/data/transforms/peddet_transforms.py``): the short side is resized to S and the long side capped at
    ``max_long`` (S lowered until it fits), then the input is padded bottom/right to a multiple of ``multiple``
    with 0 after normalisation (the release's ``round_padding``). Training draws S from ``short`` per image;
    evaluation and ``foundation predict`` use ``eval_short``. Read by human-centric data only."""

    short: list[int] = Field(min_length=1)  # training: S drawn uniformly per image (release: 480, 512, ..., 800)
    eval_short: int = Field(gt=0)  # evaluation / prediction S (release: 800)
    max_long: int = Field(gt=0)  # the long side never exceeds this (release: 1333)
    multiple: int = Field(16, gt=0)  # padded to a multiple of this; the ViT's patch must divide it (release: 16)
    # the release's RandomSelect: with this probability, resize to a short side drawn from crop_short (no cap), crop
    # a random crop_size[0]..crop_size[1] region (each side, capped at the image), then resize as above (DETR)
    crop_prob: float = Field(0.0, ge=0, le=1)
    crop_short: list[int] = [400, 500, 600]
    crop_size: tuple[int, int] = (384, 600)

    @model_validator(mode="after")
    def _sizes(self) -> ShortSideResize:
        for key, values in (("short", self.short), ("crop_short", self.crop_short), ("crop_size", self.crop_size)):
            if any(v <= 0 for v in values):
                raise ValueError(f"{key}: {list(values)} must be positive")
        for key, values in (("short", self.short), ("eval_short", [self.eval_short])):
            if max(values) > self.max_long:
                raise ValueError(f"{key}: a short side of {max(values)} is longer than max_long {self.max_long}")
        if self.crop_size[0] > self.crop_size[1]:
            raise ValueError(f"crop_size: {list(self.crop_size)} must be [min, max]")
        if self.crop_prob > 0 and min(self.crop_short) < self.crop_size[0]:
            raise ValueError(f"crop_short: {min(self.crop_short)} is below the smallest crop {self.crop_size[0]}")
        return self


class DataConfig(Section):
    """Where samples come from and how they become tensors.

    ``train`` and ``val`` take a brace pattern (``data/x/train-{000000..000009}.tar``), a directory of
    ``.tar`` shards, or a ``manifest.json`` (then ``train``/``val`` splits are looked up in it). Several
    sources are joined with ``::`` and mixed by ``weights`` (one per source).
    """

    train: str | None = None
    val: str | None = None
    weights: list[float] | None = None
    # one side of a square input, or with data.human a rectangle [height, width] (UniHCP's released
    # aspect-preserving inputs: pose 256 x 192, ReID 256 x 128); ``input_hw`` gives (height, width) either way
    image_size: int | tuple[int, int] = 224
    # pose samples with data.human: "letterbox" the whole sample into data.image_size (aspect kept, the rest
    # black), or "top_down" as UniHCP's release: the person box expanded to the input's aspect x
    # data.top_down.padding, jittered (scale, rotation, flip) when training, one affine warp into data.image_size
    pose_crop: Literal["letterbox", "top_down"] = "letterbox"
    top_down: TopDownConfig = Field(default_factory=TopDownConfig)
    in_chans: Literal[1, 3] = 3  # images are converted to L (1) or RGB (3)
    mean: tuple[float, ...] | None = None  # None: ImageNet statistics
    std: tuple[float, ...] | None = None
    image_key: str = "jpg;jpeg;png;webp"  # webdataset extensions, first match wins
    label_key: str = "cls"
    text_key: str = "txt"
    shuffle_buffer: int = Field(1000, ge=0)
    workers: int = Field(2, ge=0)
    epoch_samples: int | None = Field(None, gt=0)  # samples per epoch, for reporting; None: manifest count
    two_view: bool = False  # two independently augmented views per image (self-supervised tasks)
    # what batches carry besides images ("label" from label_key, "text" from text_key); a sample lacking
    # one is skipped as bad input. None: what every source has (its manifest's keys, else its first samples)
    targets: list[Literal["label", "text"]] | None = None
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # human-centric shards (manifest human_task): samples decode to the task's targets with geometric
    # augmentation applied to image and targets alike (foundation/data/human_transforms.py; UniHCP tasks)
    human: bool = False
    # ReID P x K batches with data.human: each training sample brings K - 1 more images of its identity (drawn
    # from the train split's shards), so a batch of P samples holds P identities x K images. 1: off
    id_instances: int = Field(1, ge=1)
    # with data.human: per-image sizes (aspect kept, short side S, long side <= L, padded to a multiple) instead of
    # the letterbox; data.image_size then only sizes fixed-size consumers (the exported graph, robustness)
    resize: ShortSideResize | None = None

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the network's input: ``image_size`` squared, or the rectangle as written."""
        size = self.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @model_validator(mode="after")
    def _image_size_shape(self) -> DataConfig:
        if any(v <= 0 for v in self.input_hw):
            raise ValueError(f"data.image_size: {self.image_size} must be positive")
        if not isinstance(self.image_size, int) and not self.human:
            raise ValueError("data.image_size: a [height, width] rectangle is read by human-centric data only "
                             "(data.human: true); other tasks take one side of a square")
        if self.resize is not None and not self.human:
            raise ValueError("data.resize: per-image sizes are read by human-centric data only (data.human: true)")
        if self.resize is not None and self.id_instances > 1:
            raise ValueError("data.resize: per-image sizes cannot stack the K views of data.id_instances; use "
                             "data.image_size")
        return self

    @model_validator(mode="after")
    def _weights_match_sources(self) -> DataConfig:
        if self.weights is not None and self.train is not None:
            n = len(self.train.split("::"))
            if len(self.weights) != n:
                raise ValueError(f"data.weights has {len(self.weights)} entries but data.train names {n} sources")
        return self

    @model_validator(mode="after")
    def _pose_crop_needs_human(self) -> DataConfig:
        if self.pose_crop != "letterbox" and not self.human:
            raise ValueError(f"data.pose_crop: {self.pose_crop!r} crops human-centric pose samples (data.human: true)")
        return self


class TextTowerConfig(Section):
    """The text tower of a dual encoder: open_clip's text transformer, from an open_clip model config
    and/or by dimensions (a dimension set here overrides the named config's; unset and no name: CLIP's)."""

    open_clip: str | None = None  # an open_clip model config name (e.g. "ViT-B-32") whose text_cfg is used
    context_length: int | None = Field(None, gt=2)  # tokens per caption, SOT and EOT included (CLIP: 77)
    width: int | None = Field(None, gt=0)  # CLIP: 512
    heads: int | None = Field(None, gt=0)  # CLIP: 8
    layers: int | None = Field(None, gt=0)  # CLIP: 12
    mlp_ratio: float | None = Field(None, gt=0)  # CLIP: 4.0
    # A Hugging Face text tower (open_clip's HFTextEncoder) instead, when hf_model or hf_type is set:
    hf_model: str | None = None  # local HF model directory (config.json [+ model.safetensors]); no code is run
    hf_type: str | None = None  # no directory: a transformers architecture ("bert", "roberta") from the dims above
    hf_tokenizer: str | None = None  # local HF tokenizer directory; None: open_clip's BPE, vocab sized to it
    hf_pooler: Literal["cls", "mean"] = "cls"  # first token's last hidden state, or the mean over non-padding
    hf_proj: Literal["linear", "mlp"] = "linear"  # projection into the joint space


class DualEncoderConfig(Section):
    """Vision-language dual encoder (tasks clip, declip): the vision tower is ``model.backbone`` (timm,
    ``num_classes`` forced to 0: pooled features) unless ``vision_open_clip`` names an open_clip config."""

    embed_dim: int | None = Field(None, gt=0)  # joint embedding width; None: the open_clip config's, else 512
    vision_open_clip: str | None = None  # open_clip model config whose vision tower replaces model.backbone
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    init_logit_scale: float = 2.659260036932778  # ln(1/0.07), as CLIP
    max_logit_scale: float = Field(100.0, gt=0)  # the temperature's scale exp(logit_scale) is clamped here


# timm.create_model options that read or fetch files: torch.load of a path (weights_only=False on some timm
# versions: code execution), hub downloads. A recipe or checkpoint written by someone else must not reach them.
FILE_LOADING_KWARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})


def refuse_file_loading(kwargs: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``kwargs`` for ``timm.create_model``, or ValueError when one of them would make timm read a file."""
    refused = sorted(FILE_LOADING_KWARGS & set(kwargs))
    if refused:
        raise ValueError(f"{where + ': ' if where else ''}{refused} would make timm load or fetch a file, which is "
                         "refused; load weights with model.init (safetensors or weights_only checkpoints)")
    return dict(kwargs)


class InitConfig(Section):
    """Start from (part of) another checkpoint's weights. Loading is safe (safetensors, or torch.load with
    ``weights_only=True``); a load report (loaded / missing / unexpected / shape-mismatched) is printed and
    written to the run directory as ``init_report.json``."""

    # a platform run or step directory, a .safetensors file, or a timm / open_clip checkpoint (.pth/.pt/.bin)
    path: str
    # backbone: the source's backbone (a classifier's timm weights, a dual encoder's visual tower, a multi-task
    # run's shared backbone; a plain file as it is) into this model's backbone. all: every tensor by its name
    part: Literal["backbone", "all"] = "backbone"
    remap: dict[str, str] = {}  # source-name prefix -> target-name prefix, e.g. {"visual.trunk.": ""}
    include: list[str] = []  # glob patterns on target names; empty: every name
    exclude: list[str] = []  # glob patterns on target names left as initialised
    strict: bool = False  # fail unless every target tensor is loaded and every source tensor used
    resize_pos_embed: bool = True  # interpolate position embeddings to this model's grid (timm)


class ModelConfig(Section):
    """The network, created by name through timm's registry (our own models register there too).

    In a multi-task recipe (``tasks:``) this is the shared backbone, created without a classifier."""

    backbone: str = "resnet18"
    num_classes: int = Field(10, ge=0)
    img_size: int | None = None  # for ViT-style models; None keeps the model's default
    patch_size: int | None = None
    in_chans: int | None = None  # None: data.in_chans
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = {}  # further keyword arguments for timm.create_model
    dual_encoder: DualEncoderConfig = Field(default_factory=DualEncoderConfig)  # tasks clip/declip only
    init: InitConfig | None = None  # None: random initialisation
    # parameters kept frozen (and out of the optimizer): glob patterns on parameter names as the training log
    # lists them; later patterns win, "!pattern" un-freezes: ["*", "!head.*"] trains the head alone
    freeze: list[str] = []

    @field_validator("kwargs")
    @classmethod
    def _no_file_loading(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return refuse_file_loading(kwargs)


class DeclipConfig(Section):
    """DeCLIP's supervisions (Li et al. 2022) and their weights; a weight of 0 switches a term off.
    Task ``declip`` uses this section; task ``clip`` is the InfoNCE term alone (weight 1, the rest off)."""

    clip_weight: float = Field(0.4, ge=0)  # InfoNCE image<->caption (with mvs: the mean of its 4 pairs)
    iss_weight: float = Field(0.2, ge=0)  # image self-supervision: SimSiam on the two views (data.two_view)
    tss_weight: float = Field(0.2, ge=0)  # text self-supervision: masked language modelling
    nns_weight: float = Field(0.2, ge=0)  # nearest-neighbour supervision: image -> nearest queued text
    mvs: bool = True  # multi-view supervision: 2 image views x (caption, EDA caption); needs data.two_view
    eda_alpha: float = Field(0.1, ge=0, le=1)  # EDA: fraction of a caption's words each operation changes
    mask_prob: float = Field(0.15, gt=0, lt=1)  # MLM: fraction of (non-special) tokens selected
    queue_size: int = Field(65536, gt=0)  # NNS: text embeddings kept (FIFO)
    # NNS: random = the released start, every slot a random unit vector; empty = no slot filled (term 0 at first)
    queue_init: Literal["random", "empty"] = "random"
    simsiam_dim: int = Field(1024, gt=0)  # ISS: projector hidden and output width
    simsiam_pred_dim: int = Field(512, gt=0)  # ISS: predictor bottleneck width


class UniHCPConfig(Section):
    """UniHCP (Ci et al., CVPR 2023): shared neck + decoder + task-guided interpreter, task queries, losses.
    Defaults are the paper's / released code's (ViT-B/16); tiny recipes override the sizes. Tasks unihcp_*."""

    width: int = Field(256, gt=0)  # decoder width and neck channels
    layers: int = Field(9, gt=0)  # decoder layers (each: cross-attention -> self-attention -> FFN)
    heads: int = Field(8, gt=0)
    ffn: int = Field(2048, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # a loss on the prediction after every decoder layer (and on the initial prediction from the queries alone);
    # None: the released choice per task: pose, parsing, detection yes; attributes and ReID the last layer only
    deep_supervision: bool | None = None
    initial_prediction: bool = True  # with deep supervision: also supervise the queries before the first layer
    # neck: ConvT D->D, LayerNorm-2d, GELU, ConvT D->width (released SimpleNeck); neck_mid sets the middle width (None: D)
    neck_mid: int | None = Field(None, gt=0)
    neck_norm: Literal["layernorm", "groupnorm"] = "layernorm"  # the neck's norm: released LayerNorm-2d, or GroupNorm(32)
    reid_feature_norm: bool = False  # ReID feature through the decoder LayerNorm (released: the raw layer output)
    grad_checkpointing: bool = False  # the encoder's blocks (timm set_grad_checkpointing)
    reid_queries: int = Field(6, gt=0)  # ReID feature = the concatenated outputs of these queries
    det_anchors: int = Field(300, gt=0)  # detection: anchor points ...
    det_patterns: int = Field(3, gt=0)  # ... times content queries per anchor
    heatmap_sigma: float = Field(2.0, gt=0)  # pose: Gaussian sigma on the stride-4 heatmap
    pose_vis_weight: float = Field(1.0, ge=0)  # pose: visibility BCE weight (heatmap MSE x 1)
    pose_mse_scale: float = Field(1000.0, gt=0)  # pose: heatmap MSE multiplier (our choice, not checked against the released code)
    dice_points: int = Field(12544, gt=0)  # parsing: points sampled for the mask losses (Mask2Former: 112*112)
    mask_weight: float = Field(5.0, ge=0)  # parsing: sigmoid cross-entropy on the sampled points
    dice_weight: float = Field(5.0, ge=0)
    presence_weight: float = Field(0.25, ge=0)  # parsing: BCE on whether each class occurs (released class_weight)
    # parsing: positive ratio of each class; presence BCE weighted exp(1 - r) / exp(r) (released sample_weight); None: 1
    parse_class_ratios: list[float] | None = None
    # parsing: where the mask losses look: Mask2Former importance sampling (oversample x points drawn, the
    # importance share most uncertain kept, the rest uniform; drawn per layer and mask) or uniform points
    point_sampling: Literal["importance", "uniform"] = "importance"
    oversample_ratio: float = Field(3.0, ge=1)
    importance_sample_ratio: float = Field(0.75, ge=0, le=1)
    # the task's vocabulary (joints, classes, attributes, ids: the shards' manifest human_task entry); written
    # into the run's recipe when training starts, so a checkpoint rebuilds without its shards. None: the manifest
    vocabulary: dict[str, Any] | None = None
    attr_pos_ratios: list[float] | None = None  # attributes: positive ratio per attribute; None: counted while training
    triplet_weight: float = Field(1.0, ge=0)  # ReID: CE + this x batch-hard soft-margin triplet
    cost_class: float = Field(2.0, ge=0)  # detection: Hungarian costs and loss weights (focal / L1 / GIoU)
    cost_bbox: float = Field(5.0, ge=0)
    cost_giou: float = Field(2.0, ge=0)
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    det_ignore_ioa: float = Field(0.7, gt=0, le=1)  # detection: unmatched queries inside an ignore region above this IoA


class DistillConfig(Section):
    """Task ``distill``: a plain timm student (``model.backbone``) learns a finished teacher run's features and one
    classification head's logits (INTERN's generalist compressed into one deployable backbone)."""

    teacher: str | None = None  # a finished run directory or checkpoint (loaded safely, frozen)
    head: str | None = None  # the teacher's classification task whose logits are distilled (None: its only one)
    feature_weight: float = Field(1.0, ge=0)  # MSE(linear projection of the student's pooled feature, teacher's)
    logit_weight: float = Field(1.0, ge=0)  # KL(teacher || student) on the head's logits at temperature, x T^2
    ce_weight: float = Field(0.0, ge=0)  # cross-entropy on the batch's labels (in the head's label space)
    temperature: float = Field(2.0, gt=0)


class TaskConfig(Section):
    """What is optimised. ``name`` is a key of ``foundation.tasks.TASKS``."""

    name: str = "classification"  # a key of foundation.tasks.TASKS (checked when the task is built)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0)  # timm Mixup alpha; 0 disables
    cutmix: float = Field(0.0, ge=0.0)  # timm CutMix alpha; 0 disables
    declip: DeclipConfig = Field(default_factory=DeclipConfig)  # tasks clip/declip only
    distill: DistillConfig = Field(default_factory=DistillConfig)  # task distill only
    unihcp: UniHCPConfig = Field(default_factory=UniHCPConfig)  # tasks unihcp_* only



class OptimConfig(Section):
    """An optimizer by name (timm's ``create_optimizer_v2``; AdamW by default) with warm-up and a cosine decay
    (timm's scheduler). Norms, biases, temperatures and the model's ``no_weight_decay()`` names get no decay."""

    name: str = "adamw"  # any timm optimizer name: adamw, sgd, lamb, lars, adafactor, lion, adan, ...
    momentum: float = Field(0.9, ge=0, lt=1)  # for the optimizers that take one (sgd, lars, ...)
    layer_decay: float | None = Field(None, gt=0, le=1)  # layer-wise lr decay: block i of N gets lr * d^(N-i)
    # layer decay's exponent lowered by this for backbone parameters (timm's groups: stem 0, block i -> i + 1, the
    # final norm with the last block; UniHCP's release: 1, so block i of 12 gets d^(10-i)); others keep lr x 1
    layer_decay_offset: int = 0
    layer_decay_exempt: list[str] = []  # glob patterns on parameter names kept at lr x 1 by layer decay (lpe_lr)
    lr_mult: dict[str, float] = {}  # glob pattern on parameter names -> lr factor (the last match wins)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = Field(0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"


class TrainConfig(Section):
    """The loop: how long, how big, how often to evaluate and save."""

    steps: int = Field(100, gt=0)  # optimizer steps
    batch_size: int = Field(64, gt=0)  # per rank, per micro-batch (a multi-task entry may set its own)
    # multi-task recipes: mix = every task every step, loss = sum of normalised weights x task losses;
    # sample = one task per step, drawn by weight from (seed, step); groups = each group of ranks owns a task
    schedule: Literal["mix", "sample", "groups"] = "mix"
    grad_accum: int = Field(1, ge=1)
    clip_grad: float | None = Field(1.0, gt=0)  # max global grad norm; None disables
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, ge=0)  # None: only at the end; 0: never (evaluation off)
    evals: list[str] | None = None  # keys of evaluation.EVALS run on data.val; None: the task's default_evals
    eval_batches: int | None = Field(None, gt=0)  # cap per evaluation during training; None: whole split
    save_every: int | None = Field(None, ge=0)  # None: only at the end; 0: never (no checkpoint is written)
    keep_last: int = Field(3, ge=1)
    resume: str = "auto"  # auto | none | PATH to a checkpoint directory
    # exact: the data streams continue where the checkpoint left them (same workers and batch sizes needed);
    # restart: they start afresh in a new order (after changing data.workers or a batch size)
    resume_data: Literal["exact", "restart"] = "exact"
    nan_patience: int = Field(5, ge=1)  # stop after this many non-finite steps in a row
    compile: bool = False  # torch.compile the model (nn.Module.compile: state-dict names unchanged)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # keep an EMA of the model's weights (timm ModelEmaV3)


class ParallelConfig(Section):
    """How the task is spread over processes. ``auto``: DeepSpeed when a config is given, DDP when
    launched with several processes, else a single process."""

    backend: Literal["auto", "single", "ddp", "deepspeed", "fsdp2"] = "auto"
    zero_stage: Literal[0, 1, 2, 3] = 0
    deepspeed_config: str | None = None  # JSON file; its values win over the ones derived from the recipe
    find_unused_parameters: bool = False
    broadcast_buffers: bool = True  # DDP re-broadcasts rank 0's buffers (BN statistics) every forward
    # seconds a collective (or joining the process group) may wait for the other ranks before it fails
    # instead of hanging: a dead rank becomes an error the elastic launcher restarts from
    timeout_s: int = Field(1800, ge=1)
    # fsdp2 (torch fully_shard per block and the root; docs/distributed.md): parameters, gradients and
    # optimizer state sharded over the ranks; bf16 on a GPU computes in bf16 and reduces in bf16 (or fp32)
    fsdp_reshard_after_forward: bool = True  # False: keep each block gathered from forward to backward (ZeRO-2-like)
    fsdp_reduce_fp32: bool = False  # bf16 on a GPU: reduce-scatter gradients in fp32 instead of bf16
    fsdp_cpu_offload: bool = False  # sharded parameters, gradients and optimizer state in CPU memory (GPU only)
    activation_checkpointing: bool = False  # fsdp2: recompute each block's activations in backward


class LoggingConfig(Section):
    """Tracking: W&B (online when logged in, else offline), metrics.jsonl and the console."""

    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "foundation"
    entity: str | None = None
    tags: list[str] = []
    group: str | None = None  # W&B run group (a pipeline's stages share one)
    progress: bool = True  # progress bar on rank 0


class TaskEntry(Section):
    """One task of a multi-task recipe: its objective, its own data stream and head, on the shared backbone."""

    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    num_classes: int | None = Field(None, gt=0)  # classification head size; None: the manifest's class count
    batch_size: int | None = Field(None, gt=0)  # per rank, per micro-batch; None: train.batch_size
    # this task's micro-batches per micro-batch of train.grad_accum (UniHCP's release: a task's batch_accumulation);
    # its loss is their mean, so its gradient is that of one batch grad_accum x as large
    grad_accum: int = Field(1, ge=1)
    loss_weight: float = Field(1.0, ge=0)  # normalised over the tasks (mix, groups); the draw weight (sample)
    # a weight per sample (UniHCP's release): loss_weight becomes sample_weight x the task's images per step
    # (batch_size x grad_accum x data.id_instances, x share under schedule groups), normalised over the tasks as
    # loss_weight is
    sample_weight: float | None = Field(None, ge=0)
    share: float | None = Field(None, gt=0, le=1)  # schedule groups: the fraction of ranks that own this task
    evals: list[str] | None = None  # keys of evaluation.EVALS on data.val; None: the task's default_evals

    @model_validator(mode="after")
    def _has_data(self) -> TaskEntry:
        if not self.data.train:
            raise ValueError("data.train is not set: every task reads its own shards")
        _pose_crop_task(self.task, self.data)
        return self


def _pose_crop_task(task: TaskConfig, data: DataConfig) -> None:
    if data.pose_crop != "letterbox" and task.name != "unihcp_pose":
        raise ValueError(f"data.pose_crop: {data.pose_crop!r} is the pose crop; task {task.name!r} reads its samples "
                         "whole (letterbox)")


class Recipe(Section):
    """A whole run: one task (``task`` + ``data``) or several (``tasks``) on one shared backbone."""

    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tasks: dict[str, TaskEntry] | None = None  # name -> task; replaces task and data
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _multi_task(self) -> Recipe:
        if self.tasks is None:
            _pose_crop_task(self.task, self.data)
            if self.train.schedule != "mix":
                raise ValueError(f"train.schedule: {self.train.schedule!r} needs several tasks (a tasks: section)")
            return self
        if not self.tasks:
            raise ValueError("tasks: name at least one task")
        if self.train.evals is not None:
            raise ValueError("train.evals: a multi-task recipe names evaluations per task (tasks.<name>.evals)")
        for key in ("task", "data"):
            if key in self.model_fields_set:
                raise ValueError(f"{key}: a multi-task recipe sets it per task (tasks.<name>.{key}), not at the top")
        for name in self.tasks:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"tasks.{name}: task names are letters, digits, '_' and '-' (they name metrics)")
        for name, e in self.tasks.items():
            if e.sample_weight is not None:  # UniHCP's release: a weight per sample x the task's images per step
                share = e.share if self.train.schedule == "groups" and e.share is not None else 1.0
                weight = (e.sample_weight * (e.batch_size or self.train.batch_size) * e.grad_accum * e.data.id_instances
                          * share)
                if "loss_weight" in e.model_fields_set and abs(e.loss_weight - weight) > 1e-6 * max(weight, 1.0):
                    raise ValueError(f"tasks.{name}.loss_weight: set it or sample_weight, not both")
                e.loss_weight = weight
        if sum(e.loss_weight for e in self.tasks.values()) <= 0:
            raise ValueError("tasks.*.loss_weight: at least one task needs a weight > 0")
        if self.train.schedule == "groups":
            missing = [n for n, e in self.tasks.items() if e.share is None]
            if missing:
                raise ValueError(f"tasks.{missing[0]}.share: schedule groups needs a share of the ranks for every task")
            total = sum(e.share for e in self.tasks.values())
            if abs(total - 1) > 1e-6:
                raise ValueError(f"tasks.*.share: the shares add up to {total:g}; they must add up to 1")
            if self.parallel.backend == "deepspeed" or self.parallel.zero_stage or self.parallel.deepspeed_config:
                raise ValueError("train.schedule: groups is not available under DeepSpeed (its engine reduces every "
                                 "gradient over all ranks; task parameters must be reduced within their group): "
                                 "use parallel.backend ddp, or schedule mix with DeepSpeed")
        deepspeed = self.parallel.backend == "deepspeed" or self.parallel.zero_stage or self.parallel.deepspeed_config
        accumulating = [n for n, e in self.tasks.items() if e.grad_accum > 1]
        if accumulating and deepspeed:
            raise ValueError(f"tasks.{accumulating[0]}.grad_accum: a task's own accumulation is not available under "
                             "DeepSpeed (its engine counts one micro-batch for all the tasks): use train.grad_accum, "
                             "or parallel.backend ddp/fsdp2")
        if self.train.schedule == "sample" and len(self.tasks) > 1 and deepspeed:
            raise ValueError("train.schedule: sample is not available under DeepSpeed (ZeRO steps every parameter, so "
                             "the heads of the tasks not drawn still move by weight decay and momentum; torch's "
                             "optimizer leaves them alone): use schedule mix with DeepSpeed, or parallel.backend "
                             "ddp/fsdp2 for sample")
        return self

    @model_validator(mode="after")
    def _fsdp2(self) -> Recipe:
        """What FSDP2 cannot run, refused at load (foundation/engine/fsdp.py checks again when sharding)."""
        if self.parallel.backend != "fsdp2":
            return self
        if self.train.precision == "fp16":
            raise ValueError("train.precision=fp16: not available with parallel.backend=fsdp2 (fp16 needs a sharded "
                             "grad scaler); use bf16")
        if self.train.ema_decay:
            raise ValueError("train.ema_decay: not available with parallel.backend=fsdp2 (the weights are sharded); "
                             "use ddp, or drop the EMA")
        if self.tasks is not None and self.train.schedule == "groups":
            raise ValueError("train.schedule: groups is not available with parallel.backend=fsdp2 (groups reduce "
                             "each task's gradients over its own ranks; FSDP2 shards every parameter over all "
                             "ranks): use parallel.backend ddp, or schedule mix/sample with fsdp2")
        return self

    @property
    def task_entries(self) -> dict[str, TaskEntry]:
        """The tasks by name; a single-task recipe is one task named after its ``task.name``."""
        if self.tasks is not None:
            return self.tasks
        return {self.task.name: TaskEntry(task=self.task, data=self.data, num_classes=self.model.num_classes)}

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------------
# loading


def lookup(registry: dict, name: str, where: str):
    """``registry[name]``, or a ``RecipeError`` naming the key path, a close match and the choices.

    Registries (``TASKS``, ``EVALS``) are checked where they are used, so this module imports none of them."""
    if name not in registry:
        raise RecipeError(f"{where}: unknown name {name!r}{suggest(name, registry)}; choose from {sorted(registry)}")
    return registry[name]


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_yaml(path: Path, what: str = "recipe") -> dict:
    """A YAML file that holds a mapping (a recipe, a pipeline, ...); ``RecipeError`` naming the file otherwise."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path}: {what} file not found") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} is a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _section_model(path: list[str], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``path`` under ``root`` (default: the recipe); None when
    it is a free-form dict."""
    model: type[BaseModel] = root or Recipe
    for key in path:
        field = model.model_fields.get(key)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def apply_override(data: dict, dotted: str) -> dict:
    """Set ``a.b.c=value`` in a raw recipe dict; the key path must exist in the schema."""
    if "=" not in dotted:
        raise RecipeError(f"override {dotted!r}: expected key=value, e.g. optim.lr=3e-4")
    key, _, raw = dotted.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {dotted!r}: value is not valid YAML: {e}") from None
    node = data
    for i, part in enumerate(parts):
        owner = _section_model(parts[:i])
        if owner is not None and part not in owner.model_fields:
            where = ".".join(parts[: i + 1])
            raise RecipeError(
                f"override {where}: no such key{suggest(part, owner.model_fields)}; "
                f"valid keys here: {sorted(owner.model_fields)}"
            )
        if i == len(parts) - 1:
            node[part] = value
        else:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
    return data


def format_errors(err: ValidationError, source: str, root: type[BaseModel] | None = None, what: str = "recipe") -> str:
    """One line per validation error of a ``root`` model (default: the recipe), naming the key path, the
    valid keys or values and a close match."""
    lines = [f"{source}: invalid {what}"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            owner = _section_model([str(p) for p in e["loc"][:-1]], root)
            valid = sorted(owner.model_fields) if owner else []
            lines.append(f"  {path}: unknown key{suggest(e['loc'][-1], valid)}; valid keys here: {valid}")
        elif e["type"] == "literal_error":
            lines.append(f"  {path}: {e['msg']} (got {e['input']!r}){suggest(e['input'], _literal_choices(e))}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if isinstance(e["input"], dict) else f" (got {e['input']!r})"
            lines.append(f"  {path}: {msg}{got}" if path else f"  {msg}")
    return "\n".join(lines)


def _literal_choices(e: dict) -> list[str]:
    expected = (e.get("ctx") or {}).get("expected", "")
    return [c.strip(" '") for c in expected.replace(" or ", ",").split(",") if c.strip(" '")]


def load_raw(path: str | Path) -> dict:
    """The recipe file merged over its ``base:`` (one level)."""
    path = Path(path)
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        base_data = read_yaml(base_path)
        if "base" in base_data:
            raise RecipeError(f"{base_path}: a base recipe cannot itself have a base (one level only)")
        data = _merge(base_data, data)
    return data


def validate(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_errors(e, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge ``base:``, apply dotted overrides and validate."""
    data = load_raw(path)
    for o in overrides:
        data = apply_override(data, o)
    return validate(data, str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written to the run directory and to W&B)."""
    return yaml.safe_dump(recipe_dict(recipe), sort_keys=False)


def recipe_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data; a multi-task recipe without the unused top-level task and data."""
    exclude = {"task", "data"} if recipe.tasks is not None else {"tasks"}
    return recipe.model_dump(mode="json", exclude=exclude)


def task_recipe(recipe: Recipe, name: str) -> Recipe:
    """One task of a recipe as a single-task recipe (its task, data and head size): what evaluations and
    exports of that task see."""
    entries = recipe.task_entries
    if name not in entries:
        raise RecipeError(f"--task {name!r}: no such task in this run{suggest(name, entries)}; its tasks: {sorted(entries)}")
    entry = entries[name]
    model = recipe.model.model_copy(update={"num_classes": entry.num_classes or recipe.model.num_classes})
    return recipe.model_copy(update={"tasks": None, "task": entry.task, "data": entry.data, "model": model})
