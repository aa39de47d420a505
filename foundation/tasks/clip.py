"""Vision-language pretraining: CLIP (Radford et al. 2021) and DeCLIP (Li et al., ICLR 2022).

DeCLIP is CLIP plus four switches, each a weighted term of the loss (``task.declip``):

    loss = w_clip * InfoNCE          (MVS on: mean over {view 1, view 2} x {caption, EDA caption})
         + w_iss  * SimSiam(view 1, view 2)                       image self-supervision
         + w_tss  * MLM(masked caption)                           text self-supervision
         + w_nns  * InfoNCE(image -> queued text nearest its caption)   nearest-neighbour supervision

As in DeCLIP, the caption that feeds the contrastive terms is the masked one when TSS is on (one text
forward gives both the pooled embedding and the MLM token outputs). As in the released code, the NNS
queue starts full of random unit vectors (``queue_init``), every caption view is looked up before this
step's push, and both the caption and its EDA caption are pushed; ``nns_own`` logs the fraction of
neighbours that are the query's own caption (near 1: the queue only hands back the caption itself, as on a
data set much smaller than the queue that has wrapped) and ``nns_init`` the fraction still initial noise.
The heads and the queue are built on their own random streams (``seeded``), so they shift no weight of the
dual encoder: CLIP and every DeCLIP variant start from the same towers under one seed. Task ``clip`` is the InfoNCE term
alone with weight 1. ``self.model`` is the ``DualEncoder`` (what checkpoints call model.safetensors);
the SimSiam head, the MLM head and the NNS queue belong to the task (task.safetensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundation.config import DataConfig, DeclipConfig, ModelConfig, TaskConfig
from foundation.data.eda import eda
from foundation.engine.collectives import all_gather_with_grad
from foundation.losses.infonce import multi_view_infonce, one_way_infonce
from foundation.losses.mlm import mask_tokens, mlm_loss
from foundation.losses.nns import NearestNeighbourQueue, caption_tags
from foundation.losses.simsiam import SimSiamHead, simsiam_loss
from foundation.models.dual_encoder import DualEncoder, build_dual_encoder, seeded
from foundation.models.heads import SharedBackbone

CLIP_ONLY = DeclipConfig(clip_weight=1.0, iss_weight=0.0, tss_weight=0.0, nns_weight=0.0, mvs=False)


class DeclipTask(nn.Module):
    """DualEncoder + DeCLIP's loss terms. ``forward(batch) -> {"loss", "clip", ["iss", "tss", "nns", "nns_own",
    "nns_init"], "logit_scale"}``.

    A batch holds ``image`` (B, C, H, W), ``image2`` (second view; ISS/MVS), ``text`` (B captions) and
    ``tokens`` (B, L) (the loader tokenises with ``self.tokenizer``; tokenised here when missing).
    """

    default_evals = ("zeroshot",)  # what train.evals means when the recipe leaves it unset

    def __init__(self, model: DualEncoder, cfg: DeclipConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.simsiam = self.mlm_head = self.nns_queue = None
        if cfg.iss_weight:
            with seeded("simsiam"):
                self.simsiam = SimSiamHead(model.embed_dim, cfg.simsiam_dim, cfg.simsiam_pred_dim)
        if cfg.tss_weight:
            with seeded("mlm_head"):
                self.mlm_head = nn.Linear(model.text_cfg["width"], model.vocab_size)
        if cfg.nns_weight:
            with seeded("nns_queue"):
                self.nns_queue = NearestNeighbourQueue(cfg.queue_size, model.embed_dim, init=cfg.queue_init)

    backbone_name = "model.visual"  # the submodule model.init (part: backbone) and layer decay treat as the backbone

    @classmethod
    def build(cls, model: ModelConfig, task: TaskConfig, data: DataConfig,
              backbone: nn.Module | None = None) -> DeclipTask:
        return cls._build(model, task.declip, data, task.name, backbone)

    @classmethod
    def _build(cls, model: ModelConfig, cfg: DeclipConfig, data: DataConfig, name: str,
               backbone: nn.Module | None = None) -> DeclipTask:
        """``backbone``: a multi-task run's shared backbone as the vision tower (else ``model.backbone``)."""
        if (cfg.iss_weight or cfg.mvs) and not data.two_view:
            raise ValueError(f"task {name}: ISS and MVS take two augmented views of each image; set "
                             "data.two_view: true (or task.declip.iss_weight: 0 and task.declip.mvs: false)")
        visual = SharedBackbone(backbone) if backbone is not None else None
        encoder = build_dual_encoder(model, in_chans=data.in_chans, extra_tokens=1 if cfg.tss_weight else 0,
                                     visual=visual)
        return cls(encoder, cfg)

    @property
    def tokenizer(self):
        """The text tokenizer; the training loop hands it to the data loaders."""
        return self.model.tokenizer

    def forward(self, batch: dict) -> dict[str, Tensor]:
        cfg, model = self.cfg, self.model
        device = model.logit_scale.device
        tokens = batch["tokens"] if "tokens" in batch else model.tokenize(batch["text"]).to(device)  # (B, L)
        out: dict[str, Tensor] = {}

        # -- text: the caption (masked when TSS is on) and, with MVS, its EDA variant
        labels = None
        if self.mlm_head is not None:
            tokens, labels = mask_tokens(
                tokens, mask_id=model.mask_token_id, sot_id=model.sot_token_id, eot_id=model.eot_token_id,
                num_ordinary=min(model.sot_token_id, model.eot_token_id), mask_prob=cfg.mask_prob,
            )
        n = tokens.shape[0]
        if cfg.mvs:  # one text forward over both caption views
            augmented = model.tokenize([eda(t, cfg.eda_alpha) for t in batch["text"]]).to(device)
            tokens = torch.cat([tokens, augmented])
        text_emb, token_features = model.encode_text_tokens(tokens)  # (T B, E), (T B, L, width)
        texts = list(F.normalize(text_emb, dim=-1).split(n))
        token_features = token_features[:n]  # the (masked) caption's

        # -- images: one forward over both views
        two_views = cfg.mvs or self.simsiam is not None
        images = torch.cat([batch["image"], batch["image2"]]) if two_views else batch["image"]
        image_emb = model.encode_image(images)  # (V B, E)
        views = list(image_emb.chunk(2)) if two_views else [image_emb]
        normed = [F.normalize(v, dim=-1) for v in views]

        scale = model.scale()
        clip = multi_view_infonce(normed if cfg.mvs else normed[:1], texts, scale)
        loss = cfg.clip_weight * clip
        out["clip"] = clip.detach()

        if self.simsiam is not None:
            (z1, p1), (z2, p2) = self.simsiam(views[0]), self.simsiam(views[1])
            iss = simsiam_loss(p1, z1, p2, z2)
            loss = loss + cfg.iss_weight * iss
            out["iss"] = iss.detach()

        if self.mlm_head is not None:
            tss = mlm_loss(token_features, labels, self.mlm_head)
            loss = loss + cfg.tss_weight * tss
            out["tss"] = tss.detach()

        if self.nns_queue is not None:
            tags = caption_tags(batch["text"]).to(device)  # (B,) which caption each row is
            nns, own, noise = self._nns(normed if cfg.mvs else normed[:1], texts, scale, tags)
            loss = loss + cfg.nns_weight * nns
            out.update(nns=nns.detach(), nns_own=own, nns_init=noise)
            # after every lookup: the caption and (MVS) its EDA caption of every rank, so all ranks hold one queue
            gathered = [all_gather_with_grad(t.detach()) for t in texts]
            all_tags = all_gather_with_grad(tags)
            self.nns_queue.push(torch.cat(gathered), all_tags.repeat(len(gathered)))

        out["loss"] = loss
        out["logit_scale"] = scale.detach()
        return out

    def _nns(self, images: list[Tensor], texts: list[Tensor], scale: Tensor,
             tags: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean over (image view, text view) of image -> nearest-queued-text InfoNCE, the fraction of
        neighbours from the query's own caption, the fraction still initial random vectors); zeros while
        the queue is empty. Every text view is looked up before anything of this step is pushed."""
        terms, own, noise = [], [], []
        for text in texts:
            found = self.nns_queue.lookup(text)  # (B, E) detached, (B,)
            if found is None:
                zero = scale.new_zeros(()).float()
                return zero, zero, zero
            neighbour, neighbour_tags = found
            own.append((neighbour_tags == tags).float().mean())
            noise.append((neighbour_tags == 0).float().mean())
            all_neighbours = all_gather_with_grad(neighbour)
            terms += [one_way_infonce(image, all_neighbours, scale) for image in images]
        return torch.stack(terms).mean(), torch.stack(own).mean(), torch.stack(noise).mean()

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}


class ClipTask(DeclipTask):
    """CLIP: DeCLIP with its extra supervisions switched off (the InfoNCE term alone, weight 1)."""

    @classmethod
    def build(cls, model: ModelConfig, task: TaskConfig, data: DataConfig,
              backbone: nn.Module | None = None) -> ClipTask:
        return cls._build(model, CLIP_ONLY, data, task.name, backbone)


__all__ = ["CLIP_ONLY", "ClipTask", "DeclipTask"]
