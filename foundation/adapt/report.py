"""The suite's table: JSON (the cells), Markdown, HTML with accuracy-vs-fraction plots, and W&B.

Rows are (dataset, method), columns the training fractions; a value is top-1 (%) as mean ± std over the
seeds. The from-scratch baseline (100% of the data) is a row of its own and a dashed line in the plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

METHOD_ORDER = ("linear", "knn", "finetune", "scratch")


def _value(cell: dict) -> str:
    if "error" in cell:
        return "—"
    std = f" ± {cell['top1_std']:.1f}" if cell.get("seeds", 1) > 1 and cell.get("top1_std") else ""
    return f"{cell['top1']:.1f}{std}"


def _grid(cells: list[dict]) -> tuple[list[str], list[tuple[str, str]], dict]:
    fractions = sorted({float(c["fraction"]) for c in cells})
    labels = [f"{f * 100:.4g}%" for f in fractions]
    rows = sorted({(c["dataset"], c["method"]) for c in cells},
                  key=lambda r: ([c["dataset"] for c in cells].index(r[0]), METHOD_ORDER.index(r[1])))
    at = {(c["dataset"], c["method"], float(c["fraction"])): c for c in cells}
    return labels, rows, {"fractions": fractions, "at": at}


def markdown_table(name: str, checkpoint: str, cells: list[dict]) -> str:
    labels, rows, g = _grid(cells)
    lines = [f"# Adaptation suite `{name}`", "", f"checkpoint: `{checkpoint}` — top-1 (%) on each dataset's val "
             "split, by fraction of the training split (stratified, seeded); scratch: trained from random "
             "initialisation on 100%.", "",
             "| dataset | method | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for dataset, method in rows:
        values = [_value(g["at"][(dataset, method, f)]) if (dataset, method, f) in g["at"] else ""
                  for f in g["fractions"]]
        lines.append(f"| {dataset} | {method} | " + " | ".join(values) + " |")
    errors = [c for c in cells if "error" in c]
    if errors:
        lines += ["", "—: not run:"] + [f"- {c['dataset']} {c['method']} {c['fraction']:g}: {c['error']}" for c in errors]
    return "\n".join(lines) + "\n"


def plot(cells: list[dict]):
    """One panel per dataset: top-1 against the training fraction (log scale), a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(c["dataset"] for c in cells))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [c for c in cells if c["dataset"] == dataset and "error" not in c]
        for method in METHOD_ORDER:
            points = sorted((c["fraction"], c["top1"], c.get("top1_std", 0.0)) for c in mine if c["method"] == method)
            if not points:
                continue
            if method == "scratch":
                ax.axhline(points[-1][1], color="grey", linestyle="--", label="scratch (100%)")
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
    """Write table.json / table.md / table.html / accuracy_vs_fraction.png into ``out`` (and to W&B)."""
    out.mkdir(parents=True, exist_ok=True)
    keep = ("dataset", "method", "fraction", "seeds", "top1", "top1_std", "top5", "train_samples", "error", "file",
            "reused")
    table = {"suite": name, "checkpoint": checkpoint,
             "cells": [{k: c[k] for k in keep if k in c} for c in cells]}
    files = {"json": out / "table.json", "markdown": out / "table.md", "html": out / "table.html",
             "plot": out / "accuracy_vs_fraction.png"}
    files["json"].write_text(json.dumps(table, indent=2) + "\n")
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

    columns = ["dataset", "method", "fraction", "seeds", "top1", "top1_std", "top5", "train_samples"]
    rows = [[c.get(k) for k in columns] for c in table["cells"] if "error" not in c]
    run = wandb.init(project=project, name=f"adapt-{name}", dir=str(out), mode=mode, config=config,
                     tags=["adapt", "suite"], reinit=True)
    run.log({"adapt/table": wandb.Table(columns=columns, data=rows), "adapt/accuracy_vs_fraction": wandb.Image(str(plot_file))})
    for c in table["cells"]:
        if "error" not in c:
            run.summary[f"adapt/{c['dataset']}/{c['method']}/{c['fraction']:g}/top1"] = c["top1"]
    run.finish()
    log.info("W&B %s run adapt-%s", mode, name)


__all__ = ["markdown_table", "plot", "write_table"]
