"""``foundation adapt``: what a pretrained checkpoint does on your own (small) dataset.

    foundation adapt --checkpoint RUN --data SHARDS --method linear knn [--fraction 0.1 | --shots 5] [--seeds 3]
    foundation adapt --checkpoint RUN --data SHARDS --method finetune --fraction 0.1 --freeze 'blocks.0.*'
    foundation adapt --checkpoint CLIP_RUN --data SHARDS --method zeroshot linear --feature projected
    foundation adapt --suite recipes/adapt/cpu_suite.yaml

Mistakes the user can fix raise ``DataError`` / ``RecipeError`` / ``CheckpointError`` (exit 2 in the main CLI).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from foundation.adapt.backbone import FEATURES
from foundation.adapt.report import architecture, csv_rows, write_csv
from foundation.adapt.run import METHODS, AdaptOptions, Adaptation, FinetuneOptions
from foundation.data import DataError


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``adapt`` on the main parser's subparsers."""
    p = sub.add_parser(
        "adapt", help="linear probe, k-NN and fine-tuning of a checkpoint on a downstream dataset",
        description="Adapt a checkpoint to a downstream dataset: linear probe (a torch linear layer on cached frozen "
                    "features, weight decay searched as CLIP_benchmark does), k-NN (cosine, temperature-weighted), "
                    "fine-tuning through the training engine, or a dual encoder's zero-shot classification; on a "
                    "stratified, seeded fraction or K shots per class of the training split, written as split files. "
                    "--suite runs datasets x methods x fractions / shots into one table (and CLIP_benchmark-style "
                    "CSV rows). See docs/adaptation.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", help="suite file (recipes/adapt/*.yaml): datasets x methods x fractions -> one table")
    p.add_argument("--checkpoint", help="a platform run / checkpoints/step_N, a `foundation export` folder "
                                        "(timm or open_clip), or timm:NAME with --weights (with --suite: replaces "
                                        "the suite file's)")
    p.add_argument("--weights", help="local weights file for --checkpoint timm:NAME (.safetensors, .pth/.pt/.bin)")
    p.add_argument("--data", help="labelled shards with train and val splits: directory or manifest.json")
    p.add_argument("--method", nargs="+", choices=METHODS, default=["linear"])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--fraction", type=float, help="stratified fraction of each class of the training split")
    size.add_argument("--shots", type=int, help="exactly K training samples per class")
    size.add_argument("--split-file", help="a split file written by an earlier run (reuses its keys)")
    p.add_argument("--seeds", type=int, default=1, help="subsets (and fine-tuning runs) seeded 0..N-1; mean ± std")
    p.add_argument("--feature", choices=FEATURES, default="pooled",
                   help="pooled: the backbone's pooled feature before any projection; projected: a CLIP/DeCLIP "
                        "model's joint-space embedding (encode_image)")
    p.add_argument("--image-size", type=int, help="input size (default: the checkpoint's)")
    p.add_argument("--out", help="results folder (default: runs/adapt/<checkpoint>/<data>)")
    p.add_argument("--cache", help="feature cache (default: ~/.cache/foundation/features)")
    p.add_argument("--batch-size", type=int, default=256, help="feature extraction batch size")
    p.add_argument("--workers", type=int, default=2, help="reader processes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote weight exp(sim / T)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="linear probe: part of each class of the training subset held out to choose the weight decay "
                        "(the refit then uses the whole subset)")
    p.add_argument("--probe-lr", type=float, default=0.1, help="linear probe: AdamW learning rate (CLIP_benchmark's)")
    p.add_argument("--probe-epochs", type=int, default=10, help="linear probe: epochs per fit")
    p.add_argument("--probe-batch-size", type=int, default=64, help="linear probe: batch size")
    ft = p.add_argument_group("fine-tuning (--method finetune; through the training engine)")
    ft.add_argument("--steps", type=int, default=300)
    ft.add_argument("--ft-batch-size", type=int, default=64)
    ft.add_argument("--lr", type=float, default=1e-3)
    ft.add_argument("--optimizer", default="adamw", help="timm optimizer name (create_optimizer_v2)")
    ft.add_argument("--weight-decay", type=float, default=0.05)
    ft.add_argument("--layer-decay", type=float, help="layer-wise lr decay (timm), e.g. 0.75")
    ft.add_argument("--freeze", nargs="*", default=[],
                    help="globs on the task's parameter names as the training log lists them (model.layer1.0.conv1.weight); "
                         "last match wins, !glob un-freezes: '*' '!model.fc.*' trains a ResNet's new head only")
    ft.add_argument("--warmup-steps", type=int, default=0)
    ft.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"])
    ft.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="further overrides of the generated recipe, e.g. train.precision=bf16 parallel.backend=ddp")
    p.set_defaults(func=run_cli)


def _device(name: str) -> str:
    import torch

    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _default_out(checkpoint: str, data: str) -> Path:
    ck = checkpoint.split(":", 1)[-1] if checkpoint.startswith("timm:") else Path(checkpoint).resolve().name
    d = Path(data).resolve()
    return Path("runs") / "adapt" / ck / (d.parent.name if d.name == "manifest.json" else d.name)


def options(args: argparse.Namespace) -> AdaptOptions:
    for name in ("seeds", "batch_size", "workers", "k", "steps", "ft_batch_size", "probe_epochs", "probe_batch_size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            raise DataError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 < args.holdout < 1:
        raise DataError(f"--holdout must be in (0, 1), got {args.holdout}")
    if not args.probe_lr > 0:
        raise DataError(f"--probe-lr must be positive, got {args.probe_lr}")
    ft = FinetuneOptions(steps=args.steps, batch_size=args.ft_batch_size, lr=args.lr, optimizer=args.optimizer,
                         weight_decay=args.weight_decay, layer_decay=args.layer_decay, freeze=list(args.freeze),
                         warmup_steps=args.warmup_steps, wandb=args.wandb, overrides=list(args.set))
    return AdaptOptions(feature=args.feature, weights=args.weights, image_size=args.image_size,
                        batch_size=args.batch_size, device=_device(args.device), workers=args.workers,
                        cache_dir=args.cache, k=args.k, temperature=args.temperature, holdout=args.holdout,
                        probe_lr=args.probe_lr, probe_epochs=args.probe_epochs,
                        probe_batch_size=args.probe_batch_size,
                        train_split=args.train_split, val_split=args.val_split, finetune=ft)


def run_cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.suite:
        from foundation.adapt.suite import run_suite

        table = run_suite(args.suite, options(args), out=args.out, checkpoint=args.checkpoint)
        print(table["markdown"])
        print(f"{table['files']['json']}\n{table['files']['markdown']}\n{table['files']['html']}")
        return 0
    if not args.checkpoint or not args.data:
        raise DataError("foundation adapt needs --checkpoint and --data (or --suite FILE)")
    out = Path(args.out) if args.out else _default_out(args.checkpoint, args.data)
    adaptation = Adaptation(args.checkpoint, args.data, out, options(args))
    cells = [adaptation.cell(m, fraction=args.fraction, shots=args.shots, seeds=args.seeds, split_file=args.split_file)
             for m in args.method]
    name = Path(args.data).resolve()
    dataset = name.parent.name if name.name == "manifest.json" else name.name
    model = architecture(args.checkpoint)
    rows = write_csv([row for c in cells for row in csv_rows(c, dataset, model, args.checkpoint)], out / "results.csv")
    summary = {"out": str(out), "csv": str(rows), "results": [
        {k: c[k] for k in ("method", "fraction", "shots", "seeds", "train_samples", "top1", "top1_std", "top5", "file")}
        for c in cells]}
    print(json.dumps(summary, indent=2))
    return 0


__all__ = ["add_cli", "options", "run_cli"]
