"""The suite's table: JSON (the cells), Markdown, HTML with accuracy-vs-fraction plots, W&B, and CSV rows
in CLIP_benchmark's format.

Rows are (dataset, method), columns zero-shot, the K-shot subsets and the training fractions; a value is
top-1 (%) as mean ± std over the seeds. The from-scratch baseline (100% of the data) is a row of its own
and a dashed line in the plots, zero-shot a dotted one.

``results.csv`` holds one row per run (per seed) with the columns ``clip_benchmark build`` writes from its
result files (``dataset, model, pretrained, task, language, model_fullname`` and the task's metrics:
``acc1, acc5, mean_per_class_recall`` for ``zeroshot_classification``; ``lp_acc1, lp_acc5,
lp_mean_per_class_recall, weight_decay, epochs, seed, fewshot_k, normalized`` for ``linear_probe``), in
CLIP_benchmark's units (accuracies as fractions of 1; acc5 NaN below 5 classes), so the rows can be
concatenated with OpenCLIP's published ``benchmark.csv``. k-NN / fine-tuning / scratch rows use our method
name as ``task`` and the zero-shot metric columns; ``fraction`` and ``method`` are columns of ours.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

METHOD_ORDER = ("zeroshot", "linear", "knn", "finetune", "scratch")
CSV_COLUMNS = ("dataset", "model", "pretrained", "task", "language", "model_fullname",
               "acc1", "acc5", "mean_per_class_recall",  # clip_benchmark zeroshot_classification
               "lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay", "epochs", "seed", "fewshot_k",
               "normalized",  # clip_benchmark linear_probe
               "fraction", "method")  # ours
CSV_TASKS = {"zeroshot": "zeroshot_classification", "linear": "linear_probe"}  # CLIP_benchmark's task names


def column(cell: dict) -> tuple[int, float]:
    """Where a cell sits in the table: (0, 0) zero-shot, (1, K) K shots per class, (2, f) a fraction f."""
    if cell.get("method") == "zeroshot":
        return (0, 0.0)
    if cell.get("shots"):
        return (1, float(cell["shots"]))
    return (2, float(cell["fraction"]))


def column_label(key: tuple[int, float]) -> str:
    kind, value = key
    return "zero-shot" if kind == 0 else f"{value:g}-shot" if kind == 1 else f"{value * 100:.4g}%"


def _value(cell: dict) -> str:
    if "error" in cell:
        return "—"
    std = f" ± {cell['top1_std']:.1f}" if cell.get("seeds", 1) > 1 and cell.get("top1_std") else ""
    return f"{cell['top1']:.1f}{std}"


def _grid(cells: list[dict]) -> tuple[list[str], list[tuple[str, str]], dict]:
    columns = sorted({column(c) for c in cells})
    labels = [column_label(k) for k in columns]
    rows = sorted({(c["dataset"], c["method"]) for c in cells},
                  key=lambda r: ([c["dataset"] for c in cells].index(r[0]), METHOD_ORDER.index(r[1])))
    at = {(c["dataset"], c["method"], column(c)): c for c in cells}
    return labels, rows, {"fractions": columns, "at": at}


def markdown_table(name: str, checkpoint: str, cells: list[dict]) -> str:
    labels, rows, g = _grid(cells)
    lines = [f"# Adaptation suite `{name}`", "", f"checkpoint: `{checkpoint}` — top-1 (%) on each dataset's val "
             "split: zero-shot (class-name prompts, no training data), K shots per class, and fractions of the "
             "training split (stratified, seeded; several seeds: mean ± std); scratch: trained from random "
             "initialisation on 100%.", "",
             "| dataset | method | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for dataset, method in rows:
        values = [_value(g["at"][(dataset, method, f)]) if (dataset, method, f) in g["at"] else ""
                  for f in g["fractions"]]
        lines.append(f"| {dataset} | {method} | " + " | ".join(values) + " |")
    errors = [c for c in cells if "error" in c]
    if errors:
        lines += ["", "—: not run:"] + [f"- {c['dataset']} {c['method']} {column_label(column(c))}: {c['error']}"
                                        for c in errors]
    return "\n".join(lines) + "\n"


def plot(cells: list[dict]):
    """One panel per dataset: top-1 against the training fraction (log scale), a line per method (K-shot cells
    are in the table only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(c["dataset"] for c in cells))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [c for c in cells if c["dataset"] == dataset and "error" not in c and column(c)[0] != 1]
        for method in METHOD_ORDER:
            points = sorted((c["fraction"] or 0.0, c["top1"], c.get("top1_std", 0.0)) for c in mine
                            if c["method"] == method)
            if not points:
                continue
            if method in ("scratch", "zeroshot"):
                ax.axhline(points[-1][1], color="grey", linestyle="--" if method == "scratch" else ":",
                           label="scratch (100%)" if method == "scratch" else "zero-shot")
                continue
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_title(dataset)
        ax.set_xlabel("fraction of training data")
        ax.set_ylabel("top-1 (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_table(name: str, checkpoint: str, cells: list[dict], out: Path, *, wandb_mode: str = "disabled",
                project: str = "foundation", config: dict | None = None) -> dict:
    """Write table.json / table.md / table.html / accuracy_vs_fraction.png / results.csv into ``out`` (and to W&B).

    ``cells`` are suite cells (with their ``dataset`` name and ``runs``)."""
    out.mkdir(parents=True, exist_ok=True)
    keep = ("dataset", "method", "fraction", "shots", "seeds", "top1", "top1_std", "top5", "mean_per_class_recall",
            "train_samples", "error", "file", "reused")
    table = {"suite": name, "checkpoint": checkpoint,
             "cells": [{k: c[k] for k in keep if k in c} for c in cells]}
    files = {"json": out / "table.json", "markdown": out / "table.md", "html": out / "table.html",
             "plot": out / "accuracy_vs_fraction.png", "csv": out / "results.csv"}
    files["json"].write_text(json.dumps(table, indent=2) + "\n")
    model = architecture(checkpoint)
    write_csv([row for c in cells if "error" not in c for row in csv_rows(c, c["dataset"], model, checkpoint)],
              files["csv"])
    md = markdown_table(name, checkpoint, cells)
    files["markdown"].write_text(md)
    fig = plot(cells)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    files["plot"].write_bytes(buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)
    labels, rows, g = _grid(cells)
    body = "".join(
        f"<tr><td>{html.escape(d)}</td><td>{m}</td>"
        + "".join(f"<td>{_value(g['at'][(d, m, f)]) if (d, m, f) in g['at'] else ''}</td>" for f in g["fractions"])
        + "</tr>" for d, m in rows)
    files["html"].write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title><style>"
        "body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
        "td:first-child,td:nth-child(2){text-align:left}</style></head><body>"
        f"<h1>Adaptation suite {html.escape(name)}</h1><p>checkpoint: <code>{html.escape(checkpoint)}</code>; "
        "top-1 (%) on val by fraction of the training split</p>"
        f"<table><tr><th>dataset</th><th>method</th>{''.join(f'<th>{x}</th>' for x in labels)}</tr>{body}</table>"
        f"<p><img alt='accuracy vs fraction' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
        "</p></body></html>\n")
    _to_wandb(name, table, files["plot"], out, wandb_mode, project, config or {})
    return {**table, "markdown": md, "files": {k: str(v) for k, v in files.items()}}


def _to_wandb(name: str, table: dict, plot_file: Path, out: Path, mode: str, project: str, config: dict) -> None:
    from foundation.engine.tracking import resolve_wandb_mode

    mode = resolve_wandb_mode(mode)
    if mode == "disabled":
        return
    import wandb

    columns = ["dataset", "method", "fraction", "shots", "seeds", "top1", "top1_std", "top5", "train_samples"]
    rows = [[c.get(k) for k in columns] for c in table["cells"] if "error" not in c]
    run = wandb.init(project=project, name=f"adapt-{name}", dir=str(out), mode=mode, config=config,
                     tags=["adapt", "suite"], reinit=True)
    run.log({"adapt/table": wandb.Table(columns=columns, data=rows), "adapt/accuracy_vs_fraction": wandb.Image(str(plot_file))})
    for c in table["cells"]:
        if "error" not in c:
            run.summary[f"adapt/{c['dataset']}/{c['method']}/{column_label(column(c))}/top1"] = c["top1"]
    run.finish()
    log.info("W&B %s run adapt-%s", mode, name)


def architecture(checkpoint: str) -> str:
    """The architecture's name for CSV ``model`` (CLIP_benchmark's ``model``: ViT-B-32 ...), read from the
    checkpoint's own description without loading weights: ``timm:NAME``, a timm export's ``config.json``, a run's
    ``recipe.yaml`` (``model.backbone``); an open_clip export is named by its folder. Empty when unknown."""
    if checkpoint.startswith("timm:"):
        return checkpoint[len("timm:"):]
    path = Path(checkpoint).expanduser()
    try:
        if (path / "open_clip_config.json").is_file():
            return f"open_clip:{path.resolve().name}"
        if (path / "config.json").is_file() and not (path / "recipe.yaml").is_file():
            return str(json.loads((path / "config.json").read_text()).get("architecture", ""))
        recipe = path / "recipe.yaml"
        if recipe.is_file():
            return str((yaml.safe_load(recipe.read_text()) or {}).get("model", {}).get("backbone", ""))
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        pass
    return ""


def _fraction_of_one(value: float | None, num_classes: int | None = None, top5: bool = False) -> float | str:
    if value is None:
        return ""
    if top5 and num_classes is not None and num_classes < 5:
        return math.nan  # CLIP_benchmark: no top-5 below 5 classes
    return value / 100.0


def csv_rows(cell: dict, dataset: str, model: str, pretrained: str) -> list[dict]:
    """One CLIP_benchmark-style row per run (seed) of a cell; see the module docstring for the columns."""
    method = cell["method"]
    task = CSV_TASKS.get(method, method)
    shots, fraction = cell.get("shots"), cell.get("fraction")
    fewshot_k = shots if shots else (-1 if fraction is not None and fraction >= 1 else "")
    rows = []
    for run in cell.get("runs", []):
        n = run.get("num_classes")
        metrics = {"acc1": _fraction_of_one(run["top1"]), "acc5": _fraction_of_one(run.get("top5"), n, top5=True),
                   "mean_per_class_recall": _fraction_of_one(run.get("mean_per_class_recall"))}
        row = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "language": "en",
               "model_fullname": f"{model} {pretrained}", "fraction": "" if fraction is None else fraction,
               "method": method}
        if method == "linear":
            row |= {f"lp_{k}": v for k, v in metrics.items()}
            row |= {"weight_decay": run["weight_decay"], "epochs": run["epochs"], "seed": run["seed"],
                    "fewshot_k": fewshot_k, "normalized": run["normalized"]}
        else:
            row |= metrics
            if method != "zeroshot":
                row |= {"seed": run["seed"], "fewshot_k": fewshot_k}
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    """``rows`` under the header ``CSV_COLUMNS`` (missing values empty)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


__all__ = ["CSV_COLUMNS", "architecture", "column", "column_label", "csv_rows", "markdown_table", "plot", "write_csv",
           "write_table"]
