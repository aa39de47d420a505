"""The ``foundation`` command: recipes | train | data | eval | predict | export | quantize | report | sweep.

Errors the user can fix (a bad recipe, a missing shard, a refused checkpoint) print one clear message
and exit with code 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from foundation.config import RecipeError
    from foundation.data import DataError
    from foundation.checkpoint_io import CheckpointError

    return RecipeError, DataError, CheckpointError, FileNotFoundError


def cmd_train(args: argparse.Namespace) -> int:
    from foundation.train import load_checked, train

    recipe = load_checked(args.recipe, args.overrides)
    summary = train(recipe)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from foundation.pipeline import print_commands, run_pipeline

    if args.print_commands:
        print(print_commands(args.pipeline, args.overrides, launcher=args.launcher), end="")
        return 0
    summary = run_pipeline(args.pipeline, args.overrides, only=args.only, launcher=args.launcher)
    print(summary["markdown"], end="")
    return 0


def recipe_loaders() -> dict:
    """Recipe kind -> loader. A file's kind is the name of the directory it sits in (``recipes/quant/x.yaml``
    is a ``quant`` recipe); a file in any other directory is a training recipe. Adding a kind is one line."""
    from foundation.adapt.suite import load_suite
    from foundation.pipeline import load_pipeline
    from foundation.quant.config import load_quant_config
    from foundation.train import load_checked

    return {"training": load_checked, "quant": load_quant_config, "adapt": load_suite, "intern": load_pipeline}


def cmd_recipes_check(args: argparse.Namespace) -> int:
    from foundation.config import RecipeError

    loaders = recipe_loaders()
    paths: list[Path] = []
    for p in map(Path, args.paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such recipe file or directory")
        paths.extend(sorted(p.rglob("*.yaml")) if p.is_dir() else [p])
    failed = 0
    for path in paths:
        kind = path.parent.name if path.parent.name in loaders else "training"
        try:
            loaders[kind](path)
            print(f"ok    {path} ({kind})")
        except RecipeError as e:
            failed += 1
            print(f"FAIL  {e}")
    print(f"{len(paths) - failed} valid, {failed} invalid")
    return 2 if failed else 0


def _run_eval(args: argparse.Namespace, evaluate, dual_encoder: bool = False) -> int:
    """Load the checkpoint, build the eval loader over ``--data`` with the recipe's preprocessing, run
    ``evaluate(model, loader, device)``, print the JSON result and write it to ``--out``. ``dual_encoder``:
    the evaluation needs a clip/declip checkpoint (else a classifier); the other kind is refused."""
    import torch

    from foundation.data.shards import build_eval_loader
    from foundation.artefacts import load_model
    from foundation.checkpoint_io import CheckpointError
    from foundation.models.dual_encoder import DualEncoder

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, recipe = load_model(args.checkpoint, device, task=args.task)
    if isinstance(model, DualEncoder) != dual_encoder:
        wanted, instead = (("a clip/declip", "eval classification") if dual_encoder else
                           ("a classification", "eval zeroshot or eval retrieval"))
        raise CheckpointError(f"{args.checkpoint}: eval {args.eval_command} needs {wanted} checkpoint; this one is "
                              f"task {recipe.task.name!r} (use {instead})")
    loader = build_eval_loader(args.data, recipe.data, batch_size=args.batch_size, split=args.split)
    result = {"checkpoint": str(args.checkpoint), "data": args.data,
              **evaluate(model, loader, device), "skipped": getattr(loader, "skipped", 0)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def cmd_eval_classification(args: argparse.Namespace) -> int:
    from evaluation.classification import evaluate_classification

    return _run_eval(args, evaluate_classification)


def cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    from evaluation.zeroshot import evaluate_zeroshot
    from foundation.data.shards import class_names

    names = class_names(args.data)
    return _run_eval(args, lambda model, loader, device: evaluate_zeroshot(
        model, loader, device, class_names=names), dual_encoder=True)


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from evaluation.retrieval import evaluate_retrieval

    return _run_eval(args, evaluate_retrieval, dual_encoder=True)


def cmd_eval_unihcp(args: argparse.Namespace) -> int:
    """``foundation eval unihcp_<task>``: one task of a UniHCP checkpoint with its human-centric metrics."""
    from evaluation import EVALS

    return _run_eval(args, EVALS[args.eval_command])


def cmd_eval_deployment(args: argparse.Namespace) -> int:
    """``foundation eval robustness | sysnoise``: a UniHCP checkpoint's task (--task) is scored with its own metric
    (evaluation/unihcp_robustness.py, which builds on the classifier modules), any other checkpoint as a classifier."""
    from evaluation import robustness, sysnoise, unihcp_robustness
    from foundation.models.unihcp_export import is_unihcp_checkpoint

    if args.eval_command == "robustness":
        run = unihcp_robustness.run_robustness_cli if is_unihcp_checkpoint(args.checkpoint) else robustness.run_cli
    else:
        run = unihcp_robustness.run_sysnoise_cli if is_unihcp_checkpoint(args.checkpoint) else sysnoise.run_cli
    return run(args)


def cmd_predict(args: argparse.Namespace) -> int:
    from foundation.predict import PredictError, run_predict

    try:
        result = run_predict(args.checkpoint, args.image, args.task, args.out, args.device, args.score_threshold,
                             args.mode)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)} | {
        k: sorted(v) for k, v in result.items() if isinstance(v, dict)}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from foundation.export import export_checkpoint

    try:
        result = export_checkpoint(args.checkpoint, args.out, args.format, args.name, task=args.task,
                                   scene_size=args.scene_size, max_people=args.max_people,
                                   score_threshold=args.score_threshold)
    except ValueError as e:  # a model part the target format cannot represent: say which, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other error (``--help`` shows the usage); subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="foundation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe (plain, under torchrun, or under deepspeed)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=100")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pipeline", help="run the stages of a pipeline file in order (INTERN), resumable")
    p.add_argument("pipeline", help="pipeline YAML file (recipes/intern/*.yaml)")
    p.add_argument("overrides", nargs="*", help="name=..., output_dir=..., wandb_group=...")
    p.add_argument("--print-commands", action="store_true", help="print every stage's command (bash; SLURM jobs "
                   "chained with afterok) instead of running")
    p.add_argument("--launcher", choices=["local", "torchrun", "slurm"], help="replaces the file's launcher.kind")
    p.add_argument("--only", nargs="+", help="run only these stages (the others must be finished for them)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("recipes", help="work with recipe files")
    rsub = p.add_subparsers(dest="recipes_command", required=True)
    c = rsub.add_parser("check", help="validate recipe files (or directories of them) without running")
    c.add_argument("paths", nargs="+")
    c.set_defaults(func=cmd_recipes_check)

    from foundation.data.cli import add_cli as add_data_cli

    add_data_cli(sub)

    p = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = p.add_subparsers(dest="eval_command", required=True)
    for name, helptext, func in (
        ("classification", "top-1/top-5 of a classifier on classification shards", cmd_eval_classification),
        ("zeroshot", "zero-shot top-1/top-5 of a clip/declip checkpoint on classification shards (class names "
                     "from the manifest; single prompt and 80-prompt ensemble)", cmd_eval_zeroshot),
        ("retrieval", "image<->text recall@1/5/10 of a clip/declip checkpoint on caption shards", cmd_eval_retrieval),
        ("unihcp_pose", "UniHCP pose: COCO keypoint AP/AR (OKS) on pose shards", cmd_eval_unihcp),
        ("unihcp_parsing", "UniHCP parsing: mIoU, pixel accuracy on parsing shards", cmd_eval_unihcp),
        ("unihcp_attributes", "UniHCP attributes: mA, instance accuracy/precision/recall/F1", cmd_eval_unihcp),
        ("unihcp_reid", "UniHCP ReID: CMC rank-1/5/10, mAP (--data QUERY_SHARDS::GALLERY_SHARDS)", cmd_eval_unihcp),
        ("unihcp_detection", "UniHCP detection: AP50, MR-2, JI with ignore regions", cmd_eval_unihcp),
    ):
        c = esub.add_parser(name, help=helptext)
        c.add_argument("--checkpoint", required=True, help="checkpoint directory (step_N) or run directory")
        c.add_argument("--data", required=True, help="shards: brace pattern, directory or manifest.json")
        c.add_argument("--split", default="val")
        c.add_argument("--batch-size", type=int, default=256)
        c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        c.add_argument("--out", help="also write the JSON result here")
        c.add_argument("--task", help="which task of a multi-task run to evaluate (its head on the shared backbone)")
        c.set_defaults(func=func)
    p = sub.add_parser("predict", help="run a UniHCP checkpoint on one image: PNG with skeleton, parsing, boxes, "
                                       "attributes; JSON; ReID embedding (.npy)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (step_N) or run directory")
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--task", default="all", help="a task name of the run, or all (default)")
    p.add_argument("--out", default="prediction", help="output directory")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--score-threshold", type=float, default=0.3, help="detection boxes drawn at or above this score")
    p.add_argument("--mode", default="auto", choices=["auto", "scene", "single"],
                   help="scene: detect people, then pose/parsing/attributes/ReID per person crop (top-down); single: "
                        "every task on the whole image; auto (default): scene when the detector finds more than one "
                        "person or one covering under half the picture")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("export", help="export a checkpoint: open_clip (dual encoders), timm (the vision tower) or "
                                      "unihcp_scene (a UniHCP run's detection -> person crops -> person tasks as one "
                                      "ONNX graph)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (step_N) or run directory")
    p.add_argument("--format", required=True, choices=["open_clip", "timm", "unihcp_scene"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", help="open_clip model config name (default: the recipe's name)")
    p.add_argument("--task", help="open_clip: which clip/declip task of a multi-task run (timm exports a "
                                  "multi-task run's shared backbone)")
    p.add_argument("--scene-size", type=int, nargs=2, default=[720, 1280], metavar=("H", "W"),
                   help="unihcp_scene: the graph's fixed input size (default 720 1280)")
    p.add_argument("--max-people", type=int, default=20, help="unihcp_scene: boxes kept after NMS (fixed count; "
                                                               "those under the threshold are flagged invalid)")
    p.add_argument("--score-threshold", type=float, default=0.3, help="unihcp_scene: a box's lowest valid score")
    p.set_defaults(func=cmd_export)

    from evaluation import readiness, robustness, sysnoise
    from foundation.quant import cli as quant_cli

    robustness.add_cli(esub)
    sysnoise.add_cli(esub)
    for name in ("robustness", "sysnoise"):
        esub.choices[name].set_defaults(func=cmd_eval_deployment)
    quant_cli.add_cli(sub)
    from foundation.adapt.cli import add_cli as add_adapt_cli

    add_adapt_cli(sub)
    readiness.add_cli(sub)
    from foundation.sweep import add_cli as add_sweep_cli

    add_sweep_cli(sub)
    return parser


def _device_problem(name: str | None) -> str | None:
    """Why ``--device NAME`` cannot work on this machine (None when it can): found before any work starts."""
    if name in (None, "auto", "cpu"):
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: no CUDA device on this machine; use --device cpu (or auto)"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def main(argv: list[str] | None = None) -> int:
    from foundation.trust import hubs_offline

    hubs_offline()  # the whole process: nothing read from an artefact can reach a hub (FOUNDATION_ALLOW_HUB=1 opts in)
    args = build_parser().parse_args(argv)
    problem = _device_problem(getattr(args, "device", None))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except _user_errors() as e:  # one line: a validation error's per-key lines are joined with '; '
        head, *rest = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        print(f"error: {head}{': ' + '; '.join(rest) if rest else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
