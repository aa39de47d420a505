"""The ship-readiness report's UniHCP part: one row per task with its own metric — clean, under the
corruptions, under PGD, the worst SysNoise change, and the INT8 (W8A8) change — from the JSON the other
commands write (``foundation report`` evaluates nothing):

- clean: ``<run>/eval/<task>.json`` (``foundation eval unihcp_<kind> ... --out``), else the robustness run's clean;
- ``<run>/eval/robustness_<task>/robustness.json`` and ``<run>/eval/sysnoise_<task>/sysnoise.json`` (the default
  outputs of ``foundation eval robustness|sysnoise --task <task>``);
- ``<runs dir>/quant/<run name>_<task>/results.json``, ``<run>/quant/<task>/results.json`` or, relative to the
  working directory, ``runs/quant/<run name>_<task>/results.json`` (``foundation quantize``'s default).
"""

from __future__ import annotations

from pathlib import Path

from evaluation.report import read_json as _read

PRIMARY = {"pose": "AP", "parsing": "mIoU", "attributes": "mA", "reid": "mAP", "detection": "AP"}


def unihcp_tasks(run_dir: Path) -> dict[str, str]:
    """``{task name: kind}`` of a run's UniHCP tasks, from its recipe.yaml ({} for other runs)."""
    import yaml

    try:
        recipe = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return {}
    if not isinstance(recipe, dict):
        return {}
    entries = recipe.get("tasks") if isinstance(recipe.get("tasks"), dict) else {None: {"task": recipe.get("task")}}
    out = {}
    for name, entry in entries.items():
        task = (entry or {}).get("task") if isinstance(entry, dict) else None
        tname = task.get("name") if isinstance(task, dict) else None
        if isinstance(tname, str) and tname.startswith("unihcp_"):
            out[name or tname] = tname[len("unihcp_"):]
    return out




def collect_unihcp(run_dir: Path, tasks: dict[str, str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """(one row per task, the missing parts with their commands)."""
    run_dir = Path(run_dir)
    ev, run = run_dir / "eval", str(run_dir)
    rows, missing = [], []
    for name, kind in tasks.items():
        metric = PRIMARY[kind]
        row: dict = {"task": name, "kind": kind, "metric": metric}
        clean = _read(ev / f"{name}.json")
        rob = _read(ev / f"robustness_{name}" / "robustness.json")
        if clean is not None:
            row["clean"] = clean.get(metric)
        elif rob is not None:
            row["clean"] = rob["clean"].get(metric)
        else:
            missing.append((f"{name}: accuracy", f"foundation eval unihcp_{kind} --checkpoint {run} --task {name} "
                                                 f"--data VAL_SHARDS --out {ev / (name + '.json')}"))
        if rob is None:
            missing.append((f"{name}: robustness", f"foundation eval robustness --checkpoint {run} --task {name} "
                                                   "--data VAL_SHARDS"))
        else:
            row["mean_corrupted"] = rob.get("mean_corrupted")
            pgd = [a for a in rob.get("adversarial", []) if a["attack"] == "pgd"]
            if pgd:
                worst = max(pgd, key=lambda a: a["eps"])
                row["pgd"], row["pgd_eps"] = worst.get(metric), worst["eps"]
        sn = _read(ev / f"sysnoise_{name}" / "sysnoise.json")
        if sn is None:
            missing.append((f"{name}: sysnoise", f"foundation eval sysnoise --checkpoint {run} --task {name} "
                                                 "--data VAL_SHARDS"))
        else:
            ok = [r for r in sn["rows"] if r.get("delta") is not None]
            if ok:
                worst = min(ok, key=lambda r: r["delta"])
                row["sysnoise_worst"] = f"{worst['axis']}/{worst['variant']}"
                row["sysnoise_delta"] = worst["delta"]
        quant = None
        for d in (run_dir.parent / "quant" / f"{run_dir.name}_{name}", run_dir / "quant" / name,
                  Path("runs") / "quant" / f"{run_dir.name}_{name}"):  # the quantize CLI's default, from here
            quant = _read(d / "results.json")
            if quant is not None:
                break
        w8 = [r for r in quant or [] if r.get("bits") == "W8A8" and r.get("value") is not None]
        if w8:
            best = max(w8, key=lambda r: r["value"])
            row["int8_method"], row["int8_delta"] = best["method"], best.get("delta")
        else:
            missing.append((f"{name}: quantization", f"foundation quantize --checkpoint {run} --task {name} "
                                                     f"--data CALIB_SHARDS --method rtn,brecq --wbits 8 --abits 8"))
        rows.append(row)
    return rows, missing


def unihcp_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The report table: one line per task."""
    head = ["task", "metric", "clean", "mean over corruptions", "PGD (largest eps)", "worst SysNoise Δ",
            "SysNoise variant", "INT8 W8A8 Δ", "INT8 method"]
    return head, [[r["task"], r["metric"], r.get("clean"), r.get("mean_corrupted"), r.get("pgd"),
                   r.get("sysnoise_delta"), r.get("sysnoise_worst"), r.get("int8_delta"), r.get("int8_method")]
                  for r in rows]


__all__ = ["collect_unihcp", "unihcp_table", "unihcp_tasks"]
