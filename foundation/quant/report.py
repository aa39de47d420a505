"""Result tables: ``results.json`` (one row per method × bits) and ``results.md``, merged across runs."""

from __future__ import annotations

import json
from pathlib import Path

KEY = ("model", "method", "bits", "backend", "outlier_suppression")


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Rows already in ``path`` (if any) updated with ``rows`` (same key → replaced)."""
    old = json.loads(path.read_text()) if path.exists() else []
    index = {tuple(r.get(k) for k in KEY): r for r in old}
    for r in rows:
        index[tuple(r.get(k) for k in KEY)] = r
    return list(index.values())


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | method | bits | backend | OS | top-1 | Δ vs FP | agreement w/ FP | deployed | deployed top-1 "
            "| sim↔deployed agreement | PTQ time (s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        onnx = r.get("onnx") or {}
        delta = None if r.get("top1") is None or r.get("top1_fp") is None else r["top1"] - r["top1_fp"]
        lines.append(
            f"| {r.get('model', '')} | {r['method']} | {r.get('bits', '')} | {r.get('backend', '')} "
            f"| {'yes' if r.get('outlier_suppression') else ''} | {_pct(r.get('top1'))} "
            f"| {'' if delta is None else f'{100 * delta:+.2f}'} | {_pct(r.get('agreement_fp'))} "
            f"| {onnx.get('deployment', '')} | {_pct(onnx.get('top1'))} | {_pct(onnx.get('agreement_sim'))} "
            f"| {'' if r.get('ptq_seconds') is None else r['ptq_seconds']} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: list[dict]) -> tuple[Path, Path]:
    """Merge ``rows`` into ``out_dir/results.json`` and rewrite ``out_dir/results.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    merged = merge_rows(json_path, rows)
    json_path.write_text(json.dumps(merged, indent=2))
    md_path.write_text("# Post-training quantization results\n\nTop-1 and agreement in %; agreement = share of "
                       "images where two models predict the same class.\n\n" + markdown_table(merged))
    return json_path, md_path
