"""The ship-readiness report: one page per run joining what the other commands measured — accuracy,
corruption and adversarial robustness, SysNoise and the INT8 delta — with the command for each part
that has not been run yet.

    foundation report runs/resnet18_fmnist [--quant DIR ...] [--out DIR]

It reads only the JSON the other commands write (it evaluates nothing), so it takes a second:
``<run>/summary.json``, ``<run>/eval/{classification,zeroshot}.json``,
``<run>/eval/robustness/robustness.json``, ``<run>/eval/sysnoise/sysnoise.json`` and the
``results.json`` of ``foundation quantize`` (``<run>/quant/`` and ``runs/quant/<run name>/`` unless
``--quant`` names others). Writes ``report.json``, ``report.md`` and ``report.html`` to
``<run>/eval/report/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.report import _fmt, _Page
from evaluation.report import read_json as _read




DUAL_ENCODER_TASKS = ("clip", "declip")
RETRIEVAL_KEYS = ("image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10", "text_to_image_R@1",
                  "text_to_image_R@5", "text_to_image_R@10", "mean_recall", "images", "texts", "data", "source")


def _task_name(run_dir: Path) -> str | None:
    """The run's ``task.name`` from its ``recipe.yaml`` (None when absent or a multi-task run)."""
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return None
    task = recipe.get("task") if isinstance(recipe, dict) else None
    return task.get("name") if isinstance(task, dict) else None


def quant_dirs(run_dir: Path) -> list[Path]:
    """Where ``foundation quantize`` puts a run's results by default or by the demo's convention."""
    return [d for d in (run_dir / "quant", run_dir.parent / "quant" / run_dir.name) if (d / "results.json").is_file()]


def collect(run_dir: str | Path, quant: list[str | Path] | None = None) -> dict:
    """The joined, JSON-able figures of one run, plus ``missing``: the parts not run, with commands."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    ev = run_dir / "eval"
    summary = _read(run_dir / "summary.json") or {}
    out: dict = {"run": str(run_dir), "checkpoint": summary.get("checkpoint"), "steps": summary.get("steps"),
                 "missing": []}
    run = str(run_dir)
    from evaluation.unihcp_report import collect_unihcp, unihcp_tasks

    if unihcp := unihcp_tasks(run_dir):  # UniHCP: one row per task, each with its own metric
        out["kind"] = "unihcp"
        out["unihcp"], out["missing"] = collect_unihcp(run_dir, unihcp)
        out["sources"] = [str(p) for p in sorted(ev.glob("*_*/report.md"))] if ev.is_dir() else []
        return out

    cls = _read(ev / "classification.json")
    if cls is None and "eval/classification/top1" in summary:
        cls = {"top1": summary["eval/classification/top1"], "top5": summary.get("eval/classification/top5"),
               "samples": summary.get("eval/classification/samples"), "source": "end-of-training evaluation"}
    zs = _read(ev / "zeroshot.json")
    if zs is None and "eval/zeroshot/top1" in summary:
        zs = {"top1": summary["eval/zeroshot/top1"], "top1_ensemble": summary.get("eval/zeroshot/top1_ensemble"),
              "samples": summary.get("eval/zeroshot/samples"), "source": "end-of-training evaluation"}
    if cls is not None:
        out["classification"] = {k: cls.get(k) for k in ("top1", "top5", "samples", "data", "source")}
    if zs is not None:
        out["zeroshot"] = {k: zs.get(k) for k in ("top1", "top1_ensemble", "samples", "data", "source")}
    ret = _read(ev / "retrieval.json")
    ret_summary = {k[len("eval/retrieval/"):]: v for k, v in summary.items() if k.startswith("eval/retrieval/")}
    if ret is None and ret_summary:
        ret = {**ret_summary, "source": "end-of-training evaluation"}
    dual = zs is not None or ret is not None or _task_name(run_dir) in DUAL_ENCODER_TASKS
    out["kind"] = "dual encoder" if dual else "classifier"
    if ret is not None:
        out["retrieval"] = {k: ret.get(k) for k in RETRIEVAL_KEYS if ret.get(k) is not None}
    elif dual:
        out["missing"].append(("retrieval", f"foundation eval retrieval --checkpoint {run} --data CAPTION_SHARDS "
                                            f"--out {ev / 'retrieval.json'}"))
    if cls is None and zs is None:
        what, name = ("zeroshot", "zeroshot.json") if dual else ("classification", "classification.json")
        out["missing"].append(("accuracy", f"foundation eval {what} --checkpoint {run} --data VAL_SHARDS "
                                           f"--out {ev / name}"))

    rob = _read(ev / "robustness" / "robustness.json")
    if rob is None:
        out["missing"].append(("robustness", f"foundation eval robustness --checkpoint {run} --reference REF_RUN"))
    else:
        mce = rob.get("mce") or {}
        adv = rob.get("adversarial") or {}
        out["robustness"] = {
            "samples": rob["samples"], "clean_accuracy": rob["clean_accuracy"],
            "mean_corruption_error": rob["corruptions"].get("mean_corruption_error"),
            "mce": mce.get("mce"), "relative_mce": mce.get("relative_mce"),
            "reference": (rob.get("reference") or {}).get("checkpoint"),
            "attacks": [{k: a[k] for k in ("attack", "norm", "eps", "steps", "robustness")}
                        for a in adv.get("attacks", [])],
        }

    sn = _read(ev / "sysnoise" / "sysnoise.json")
    if sn is None:
        out["missing"].append(("sysnoise", f"foundation eval sysnoise --checkpoint {run} [--int8 QUANT_DIR]"))
    else:
        axes: dict[str, dict] = {}  # per axis: the lowest Δtop-1, ties broken by the higher flip rate
        for v in sn["variants"]:
            if v["status"] == "ok":
                worst = axes.get(v["axis"])
                if worst is None or (v["delta_top1"], -v["flip_rate"]) < (worst["delta_top1"], -worst["flip_rate"]):
                    axes[v["axis"]] = {"variant": v["name"], "delta_top1": v["delta_top1"], "flip_rate": v["flip_rate"]}
        out["sysnoise"] = {
            "samples": sn["samples"], "reference_top1": sn["reference"]["top1"], "worst_per_axis": axes,
            "errors": [{"axis": v["axis"], "variant": v["name"], "note": v.get("note")}
                       for v in sn["variants"] if v["status"] == "error"],
        }

    rows = []
    dirs = [Path(q) for q in quant] if quant else quant_dirs(run_dir)
    for d in dirs:
        data = _read(d / "results.json")
        if data is None:
            raise FileNotFoundError(f"{d}: no results.json (run `foundation quantize ... --out {d}`)")
        rows += [{**r, "results": str(d / "results.json")} for r in data]
    if rows:
        out["quantization"] = rows
    else:
        out["missing"].append(("quantization", f"foundation quantize --checkpoint {run} --data CALIB_SHARDS "
                                               f"--val VAL_SHARDS --recipe recipes/quant/w8a8_rtn.yaml --onnx "
                                               f"--out {run_dir / 'quant'}"))
    out["sources"] = [str(p) for p in (ev / "classification.json", ev / "zeroshot.json", ev / "retrieval.json",
                                       ev / "robustness" / "report.md", ev / "sysnoise" / "report.md") if p.is_file()]
    out["sources"] += [str(d / "results.md") for d in dirs]
    return out


def _best_int8(rows: list[dict]) -> dict | None:
    """The best W8A8 row of our methods (ties: the deployed one first)."""
    ours = [r for r in rows if r.get("bits") == "W8A8" and r["method"] != "ort_quantize_static"
            and r.get("top1") is not None]
    return max(ours, key=lambda r: (r["top1"], bool(r.get("onnx")))) if ours else None


def write_report(result: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "report.json"}
    files["json"].write_text(json.dumps(result, indent=2))
    page = _Page(f"Ship-readiness: {Path(result['run']).name}")
    page.para(f"Run {result['run']} · checkpoint {result.get('checkpoint') or '–'} · {result.get('steps') or '–'} steps")

    head: list[list] = []
    if "classification" in result:
        c = result["classification"]
        head.append(["top-1 (%)", c["top1"], f"{c.get('samples') or '–'} images; top-5 {_fmt(c.get('top5'))}"])
    if "zeroshot" in result:
        z = result["zeroshot"]
        head.append(["zero-shot top-1 (%)", z["top1"], f"80-prompt ensemble {_fmt(z.get('top1_ensemble'))}"])
    if "retrieval" in result:
        r = result["retrieval"]
        head.append(["retrieval mean recall (%)", r.get("mean_recall"),
                     f"image→text R@1 {_fmt(r.get('image_to_text_R@1'))}, text→image R@1 "
                     f"{_fmt(r.get('text_to_image_R@1'))}; {r.get('images') or '–'} images"])
    if "robustness" in result:
        r = result["robustness"]
        ref = f" vs {r['reference']}" if r.get("reference") else ""
        head.append(["mCE (%)", r.get("mce"), f"relative mCE {_fmt(r.get('relative_mce'))}{ref}; "
                                             f"{r['samples']} images"])
        head.append(["mean corruption error (%)", r.get("mean_corruption_error"), "ImageNet-C 15, unnormalised"])
        for a in r["attacks"]:
            if a["attack"] == "pgd":
                head.append([f"PGD {a['norm']} eps {a['eps']:.4f} robustness (%)", a["robustness"],
                             f"{a['steps']} steps; share of clean-correct kept"])
    if "sysnoise" in result:
        s = result["sysnoise"]
        for axis, w in s["worst_per_axis"].items():
            head.append([f"SysNoise worst Δtop-1, {axis}", w["delta_top1"],
                         f"{w['variant']}; flips {_fmt(w['flip_rate'])}%"])
        for e in s["errors"]:
            head.append([f"SysNoise {e['axis']} {e['variant']}", "fails", e.get("note") or ""])
    best = _best_int8(result.get("quantization", []))
    if best is not None:
        zero_shot = best.get("eval") == "zero-shot"
        metric = "zero-shot top-1" if zero_shot else "top-1"
        delta = None if best.get("top1_fp") is None else 100 * (best["top1"] - best["top1_fp"])
        towers = (f"; image tower alone {_fmt(100 * best['top1_image_tower_only'])}%, text tower alone "
                  f"{_fmt(100 * best['top1_text_tower_only'])}%" if best.get("top1_image_tower_only") is not None else "")
        head.append([f"INT8 (W8A8) Δ{metric}", delta, f"{best['method']} / {best.get('backend')}; agreement with FP "
                                                      f"{_fmt(100 * best['agreement_fp'])}%{towers}"])
        onnx = best.get("onnx") or {}
        if onnx.get("top1") is not None and best.get("top1_fp") is not None:
            head.append([f"INT8 deployed in onnxruntime: Δ{metric}", 100 * (onnx["top1"] - best["top1_fp"]),
                         ("both towers deployed; " if zero_shot else "") + onnx.get("deployment", "")])
        if onnx.get("agreement_sim") is not None:
            head.append(["INT8 deployed in onnxruntime: agreement with simulation (%)", 100 * onnx["agreement_sim"],
                         onnx.get("deployment", "")])
    if result.get("unihcp"):
        from evaluation.unihcp_report import unihcp_table

        page.heading("UniHCP tasks (each with its own metric)")
        page.table(*unihcp_table(result["unihcp"]))
    page.heading("Headline")
    page.table(["check", "figure", "detail"], head)

    if result.get("quantization"):
        rows = [r for r in result["quantization"] if r.get("top1") is not None]
        towers = any(r.get("top1_image_tower_only") is not None for r in rows)

        def pct(v):
            return None if v is None else 100 * v

        page.heading("Quantization" + (" (zero-shot top-1 of the dual encoder)" if towers else ""))
        page.table(["method", "bits", "backend", "OS", "top-1 %", "Δ vs FP", "agreement w/ FP %", "deployed top-1 %"]
                   + (["image tower only %", "text tower only %"] if towers else []) + ["PTQ s"],
                   [[r["method"], r.get("bits"), r.get("backend"), "yes" if r.get("outlier_suppression") else "",
                     100 * r["top1"], None if r.get("top1_fp") is None else 100 * (r["top1"] - r["top1_fp"]),
                     pct(r.get("agreement_fp")), None if not (r.get("onnx") or {}).get("top1") else 100 * r["onnx"]["top1"]]
                    + ([pct(r.get("top1_image_tower_only")), pct(r.get("top1_text_tower_only"))] if towers else [])
                    + [r.get("ptq_seconds")] for r in rows])
    if result["missing"]:
        page.heading("Not run yet")
        page.table(["part", "command"], result["missing"])
    page.para("Details: each command's own report — " + ", ".join(result["sources"]) + ".")
    files["html"], files["md"] = page.write(out)
    return files


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="ship-readiness report of a run: accuracy, robustness, SysNoise, INT8 delta",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (runs/NAME)")
    p.add_argument("--quant", nargs="*", help="`foundation quantize` output directories (default: <run>/quant and "
                                              "runs/quant/<run name> where they exist)")
    p.add_argument("--out", help="output directory (default: <run>/eval/report)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    try:
        result = collect(args.run, args.quant)
    except ValueError as e:  # a corrupt JSON: name it
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = write_report(result, Path(args.out) if args.out else Path(args.run) / "eval" / "report")
    print(files["md"].read_text())
    print(f"report: {files['md']} and {files['html']}")
    return 0
