"""Reports for the robustness and SysNoise evaluations: JSON, an HTML page and a Markdown page with
tables, PNG plots, and (on request) the same figures and tables in W&B.

Only the CLIs call W&B (``log_to_wandb``, imported lazily); the evaluation code never does.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path


def read_json(path: Path) -> dict | list | None:
    """A JSON file a command wrote; None when it is missing, one error line when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rerun the command that writes it") from None


AXIS_COLOURS = {"decoder": "#4C72B0", "resize": "#55A868", "colour": "#C44E52", "precision": "#8172B2",
                "architecture": "#CCB974"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


class _Page:
    """Builds the same content as HTML and Markdown."""

    def __init__(self, title: str):
        self.title = title
        self.html: list[str] = []
        self.md: list[str] = [f"# {title}", ""]

    def heading(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md += [f"## {text}", ""]

    def para(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md += [text, ""]

    def table(self, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

        def cell(v) -> str:
            return _fmt(v).replace("|", "\\|")

        self.md += ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
        self.md += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
        self.md.append("")

    def image(self, path: Path, alt: str) -> None:
        self.html.append(f'<p><img src="{html.escape(path.name)}" alt="{html.escape(alt)}"></p>')
        self.md += [f"![{alt}]({path.name})", ""]

    def write(self, out: Path) -> tuple[Path, Path]:
        style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}img{max-width:100%}")
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body><h1>{html.escape(self.title)}</h1>"
                + "\n".join(self.html) + "</body></html>")
        (out / "report.html").write_text(page)
        (out / "report.md").write_text("\n".join(self.md))
        return out / "report.html", out / "report.md"


# --------------------------------------------------------------------------------------------------
# robustness


def plot_corruptions(result: dict, path: Path) -> Path:
    """Accuracy vs severity (0 = clean), one panel per corruption; the reference model dashed when known."""
    plt = _pyplot()
    acc = result["corruptions"]["accuracy"]
    sev = [0] + result["corruptions"]["severities"]
    ref = result.get("reference") or {}
    names = list(acc)
    cols = 5
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot(sev, [result["clean_accuracy"]] + acc[name], marker="o", label="model")
        if "error" in ref and name in ref["error"] and ref.get("clean_error") is not None:
            ax.plot(sev, [100 - ref["clean_error"]] + [100 - e for e in ref["error"][name]], marker=".",
                    linestyle="--", color="grey", label="reference")
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("severity")
    for ax in axes[:, 0]:
        ax.set_ylabel("top-1 %")
    if ref.get("error"):
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_adversarial(result: dict, path: Path) -> Path:
    """Adversarial robustness (clean-correct samples that stay correct) vs eps, one panel per norm."""
    plt = _pyplot()
    rows = result["adversarial"]["attacks"]
    norms = sorted({r["norm"] for r in rows}, key=["linf", "l2"].index)
    fig, axes = plt.subplots(1, len(norms), figsize=(5 * len(norms), 3.6), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        for attack in ("fgsm", "pgd"):
            pts = sorted((r["eps"], r["robustness"]) for r in rows
                         if r["norm"] == norm and r["attack"] == attack and r["robustness"] is not None)
            if pts:
                ax.plot([0] + [p[0] for p in pts], [100] + [p[1] for p in pts], marker="o", label=attack.upper())
        ax.set_title(f"{'L∞' if norm == 'linf' else 'L2'} attacks")
        ax.set_xlabel("eps (pixel units, [0, 1] scale)")
        ax.set_ylabel("robustness %")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_robustness_report(result: dict, out: Path) -> dict[str, Path]:
    """robustness.json, report.html, report.md and the PNG plots in ``out``; returns the paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"json": out / "robustness.json"}
    files["json"].write_text(json.dumps(result, indent=2))
    page = _Page("Robustness")
    page.para(f"Checkpoint: {result.get('checkpoint', '–')} · data: {result.get('data', '–')} · "
              f"{result['samples']} samples · clean top-1 {result['clean_accuracy']:.2f}% · "
              f"wall time {result.get('wall_s', 0):.1f} s")
    if result.get("skipped_samples", {}).get("count"):
        page.para(f"Skipped {result['skipped_samples']['count']} unreadable samples.")
    if result.get("pipeline_matches_training") is False:
        page.para("Warning: this pipeline did not reproduce the recipe's eval transform bit for bit.")

    corr = result["corruptions"]
    if corr["accuracy"]:
        mce = result.get("mce") or {}
        page.heading("Corruptions")
        summary = [f"mean corruption error (unnormalised, ImageNet-C 15): {_fmt(corr['mean_corruption_error'])}%"]
        if mce:
            summary.append(f"mCE {_fmt(mce.get('mce'))}% (over {len(mce.get('mce_corruptions', []))} corruptions) · "
                           f"relative mCE {_fmt(mce.get('relative_mce'))}% "
                           f"(over {len(mce.get('relative_mce_corruptions', []))})")
        page.para(" · ".join(summary))
        headers = ["corruption"] + [f"err s{s}" for s in corr["severities"]] + ["mean err", "CE", "rel. CE"]
        rows = []
        for name, errs in corr["error"].items():
            rows.append([name, *errs, corr["mean_error"][name], (mce.get("ce") or {}).get(name),
                         (mce.get("relative_ce") or {}).get(name)])
        page.table(headers, rows)
        if corr["not_applicable"]:
            page.para(f"Not applicable to {result['settings']['in_chans']}-channel images: "
                      + ", ".join(corr["not_applicable"]))
        if corr.get("frost_source") == "imagenet-c":
            page.para("Frost: ImageNet-C's frost photographs (package imagecorruptions).")
        elif corr.get("frost_source") == "generated":
            page.para("Frost: generated texture (imagecorruptions not installed); it degrades images less than "
                      "ImageNet-C's photographs, so frost errors are not comparable with published ones.")
        files["corruptions_png"] = plot_corruptions(result, out / "corruption_accuracy.png")
        page.image(files["corruptions_png"], "accuracy vs severity")

    adv = result.get("adversarial")
    if adv and adv["attacks"]:
        page.heading("Adversarial")
        page.para(f"{adv['clean_correct']} of {adv['samples']} attacked samples are correct when clean; "
                  "robustness is the share of those that stay correct under attack.")
        page.table(["attack", "norm", "eps", "steps", "step size", "random start", "robustness %", "accuracy %"],
                   [[r["attack"], r["norm"], _fmt(r["eps"], 4), r["steps"], _fmt(r["step_size"], 5),
                     r["random_start"], r["robustness"], r["accuracy"]] for r in adv["attacks"]])
        files["adversarial_png"] = plot_adversarial(result, out / "adversarial.png")
        page.image(files["adversarial_png"], "robustness vs eps")
    files["html"], files["md"] = page.write(out)
    return files


# --------------------------------------------------------------------------------------------------
# SysNoise


def plot_sysnoise(result: dict, path: Path) -> Path:
    """Δtop-1 and flip rate per variant, bars coloured by axis."""
    plt = _pyplot()
    rows = [r for r in result["variants"] if r["status"] == "ok"]
    labels = [f"{r['axis']}: {r['name']}" for r in rows]
    colours = [AXIS_COLOURS.get(r["axis"], "grey") for r in rows]
    height = max(2.5, 0.28 * len(rows) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    y = list(range(len(rows)))
    a.barh(y, [r["delta_top1"] for r in rows], color=colours)
    a.axvline(0, color="black", linewidth=0.8)
    a.set_xlabel("Δ top-1 vs reference (points)")
    a.set_yticks(y, labels, fontsize=8)
    a.invert_yaxis()
    b.barh(y, [r["flip_rate"] for r in rows], color=colours)
    b.set_xlabel("prediction flip rate (%)")
    for ax in (a, b):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"SysNoise (reference top-1 {result['reference']['top1']:.2f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sysnoise_report(result: dict, out: Path) -> dict[str, Path]:
    """sysnoise.json, report.html, report.md and sysnoise.png in ``out``; returns the paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"json": out / "sysnoise.json"}
    files["json"].write_text(json.dumps(result, indent=2))
    page = _Page("SysNoise")
    page.para(f"Checkpoint: {result.get('checkpoint', '–')} · data: {result.get('data', '–')} · "
              f"{result['samples']} samples · wall time {result.get('wall_s', 0):.1f} s")
    page.para(f"Reference: {result['reference']['pipeline']} → top-1 {result['reference']['top1']:.2f}%")
    if "decoder_reference" in result:
        d = result["decoder_reference"]
        page.para(f"Decoder variants compare with PIL on the same JPEG bytes ({d['reencoded_as_jpeg']} lossless "
                  f"images re-encoded at quality {d['jpeg_quality']}): top-1 {d['top1']:.2f}%.")
    if result.get("pipeline_matches_training") is False:
        page.para("Warning: the reference did not reproduce the recipe's eval transform bit for bit.")
    page.heading("Variants")
    page.table(["axis", "variant", "status", "top-1 %", "Δ top-1", "flip %", "mean abs Δpixel (0-255)",
                "pixels changed %", "note"],
               [[r["axis"], r["name"], r["status"], r.get("top1"), r.get("delta_top1"), r.get("flip_rate"),
                 r.get("pixel_mean_abs_diff"), r.get("pixel_changed"), r.get("mode") or r.get("note", "")]
                for r in result["variants"]])
    if any(r["status"] == "ok" for r in result["variants"]):
        files["sysnoise_png"] = plot_sysnoise(result, out / "sysnoise.png")
        page.image(files["sysnoise_png"], "SysNoise bars")
    files["html"], files["md"] = page.write(out)
    return files


# --------------------------------------------------------------------------------------------------
# W&B


def log_to_wandb(result: dict, files: dict[str, Path], *, kind: str, recipe=None) -> None:
    """Log the PNG figures, the tables and the headline numbers to a W&B run of job type ``eval``.

    Project/entity come from the recipe's ``logging`` section; the mode is the recipe's unless it is
    "auto" or "disabled" (the --wandb flag asked for logging): online with credentials, else offline."""
    import wandb

    logging = getattr(recipe, "logging", None)
    mode = getattr(logging, "wandb", "auto")
    if mode not in ("online", "offline"):
        has_key = bool(os.environ.get("WANDB_API_KEY")) or bool(getattr(getattr(wandb, "api", None), "api_key", None))
        mode = "online" if has_key else "offline"
    out = next(iter(files.values())).parent
    run = wandb.init(project=getattr(logging, "project", "foundation"), entity=getattr(logging, "entity", None),
                     dir=str(out), job_type="eval", name=f"{getattr(recipe, 'name', 'run')}-{kind}", mode=mode,
                     config={"kind": kind, "checkpoint": result.get("checkpoint"), **result.get("settings", {})})
    log: dict = {f"{kind}/{name}": wandb.Image(str(p)) for name, p in files.items() if p.suffix == ".png"}
    if kind == "robustness":
        log[f"{kind}/clean_accuracy"] = result["clean_accuracy"]
        corr = result["corruptions"]
        log[f"{kind}/errors"] = wandb.Table(columns=["corruption"] + [f"s{s}" for s in corr["severities"]],
                                            data=[[n, *e] for n, e in corr["error"].items()])
        if corr["mean_corruption_error"] is not None:
            log[f"{kind}/mean_corruption_error"] = corr["mean_corruption_error"]
        if result.get("mce") and result["mce"]["mce"] is not None:
            log[f"{kind}/mce"] = result["mce"]["mce"]
        if result.get("adversarial"):
            rows = result["adversarial"]["attacks"]
            log[f"{kind}/adversarial"] = wandb.Table(
                columns=["attack", "norm", "eps", "robustness"],
                data=[[r["attack"], r["norm"], r["eps"], r["robustness"]] for r in rows])
    elif kind == "quantize":
        cols = ["model", "method", "bits", "backend", "outlier_suppression", "top1", "agreement_fp",
                "deployment", "deployed_top1", "sim_deployed_agreement", "ptq_seconds"]
        data = []
        for r in result["rows"]:
            onnx = r.get("onnx") or {}
            data.append([r.get("model"), r["method"], r.get("bits"), r.get("backend"), bool(r.get("outlier_suppression")),
                         r.get("top1"), r.get("agreement_fp"), onnx.get("deployment"), onnx.get("top1"),
                         onnx.get("agreement_sim"), r.get("ptq_seconds")])
            if r["method"] != "fp32":
                tag = f"{r['method']}_{str(r.get('bits', '')).lower()}{'_os' if r.get('outlier_suppression') else ''}"
                log[f"{kind}/{tag}/top1"] = r.get("top1")
        log[f"{kind}/results"] = wandb.Table(columns=cols, data=data)
    else:
        log[f"{kind}/reference_top1"] = result["reference"]["top1"]
        log[f"{kind}/variants"] = wandb.Table(
            columns=["axis", "variant", "status", "delta_top1", "flip_rate"],
            data=[[r["axis"], r["name"], r["status"], r.get("delta_top1"), r.get("flip_rate")]
                  for r in result["variants"]])
    run.log(log)
    run.finish()
