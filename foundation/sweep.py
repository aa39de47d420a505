"""``foundation sweep RECIPE --seeds 0,1,2 [--grid KEY=V1,V2 ...] [--variant NAME KEY=V ...]``: one recipe over
seeds x variants, and one table of mean ± std per variant.

A variant is a set of dotted overrides (what ``foundation train`` takes): each ``--variant NAME KEY=V ...`` is
one (e.g. an ablation ladder, where a step changes several keys), each ``--grid KEY=V1,V2`` multiplies the
variants by its values (a value holding commas goes in brackets: ``data.augment.scale=[0.2,1.0],[0.6,1.0]``).
Run ``(variant, seed)`` trains in ``OUT/<variant>/seed_<seed>`` with ``seed=<seed>`` and
``logging.group=<group>`` (one W&B group for the sweep). A run is finished when its ``summary.json`` says
the recipe's ``train.steps`` were reached with a checkpoint: finished runs are skipped, an unfinished one
is started again and continues from its newest checkpoint (``train.resume: auto``), so a killed sweep
is resumed by running the same command again. ``--print-commands`` prints every run's command (plain,
torchrun or SLURM) for another launcher, and ``--aggregate`` writes the table from the runs finished so far.

The evaluation is the recipe's own: ``train.evals`` run at the last step and land in the run's summary as
``eval/*``; the table holds, per variant and key, the mean and the sample standard deviation (n - 1) over
the seeds, with n (``OUT/sweep.{json,md,csv}``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from foundation.config import RecipeError

log = logging.getLogger("foundation.sweep")

LAUNCHERS = ("local", "torchrun", "slurm")
COUNT_KEYS = ("samples", "images", "texts")  # eval/* keys that count inputs: in JSON/CSV, not in the Markdown table


@dataclass
class Variant:
    name: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepRun:
    variant: str
    seed: int
    overrides: list[str]  # the recipe's full overrides for this run (the sweep's, the variant's, seed, dirs)
    run_dir: Path


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (or both: ``0-2,7``) -> the seeds, in order, without repeats."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise RecipeError(f"--seeds {text!r}: {part!r} is not a seed (give e.g. 0,1,2 or 0-4)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise RecipeError(f"--seeds {text!r}: the range {part!r} is empty")
        seeds += [s for s in range(lo, hi + 1) if s not in seeds]
    if not seeds:
        raise RecipeError("--seeds: no seed given (e.g. --seeds 0,1,2)")
    return seeds


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets: ``[0.2,1.0],[0.6,1.0]`` -> two values."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    values.append(cur)
    return values


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``KEY=V1,V2`` entries -> [(key, [values])]; a key given twice or an empty value is an error."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in _split_values(rest)] if sep else []
        if not key or not sep or not values or any(v == "" for v in values):
            raise RecipeError(f"--grid {item!r}: give KEY=V1,V2,... (a dotted recipe key and its values)")
        if any(k == key for k, _ in grid):
            raise RecipeError(f"--grid {key}: given twice; list all its values in one --grid")
        grid.append((key, values))
    return grid


def slug(text: str) -> str:
    """A directory name for a variant: letters, digits and ``._=-+`` kept, anything else ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "base"


def make_variants(named: list[list[str]] | None, grid: list[tuple[str, list[str]]]) -> list[Variant]:
    """The named variants (or one unnamed base variant) times every combination of the grid's values."""
    base: list[Variant] = []
    for entry in named or []:
        name, overrides = entry[0], entry[1:]
        if "=" in name:
            raise RecipeError(f"--variant {shlex.join(entry)}: the first word is the variant's name (then KEY=V ...)")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise RecipeError(f"--variant {name}: {bad[0]!r} is not KEY=VALUE")
        base.append(Variant(name, list(overrides)))
    if not base:
        base = [Variant("", [])]
    names = [v.name for v in base]
    if len(set(names)) != len(names):
        raise RecipeError(f"--variant: a name given twice in {names}")
    out = []
    for v in base:
        for combo in itertools.product(*[[(k, val) for val in vals] for k, vals in grid]):
            extra = [f"{k}={val}" for k, val in combo]
            name = ",".join(filter(None, [v.name, *extra])) or "base"
            out.append(Variant(name, v.overrides + extra))
    return out


def plan(recipe: str | Path, overrides: list[str], seeds: list[int], variants: list[Variant], out: Path,
         group: str) -> list[SweepRun]:
    """Every (variant, seed) run, each recipe loaded and checked now: a bad key fails before any run starts."""
    from foundation.train import load_checked

    runs, dirs = [], set()
    for v in variants:
        vdir = out / slug(v.name)
        if vdir in dirs:
            raise RecipeError(f"variant {v.name!r}: its directory {vdir} is another variant's; rename one")
        dirs.add(vdir)
        for seed in seeds:
            ov = [*overrides, *v.overrides, f"seed={seed}", f"output_dir={vdir}", f"name=seed_{seed}",
                  f"logging.group={group}"]
            r = load_checked(recipe, ov)
            runs.append(SweepRun(v.name, seed, ov, r.run_dir))
    return runs


def read_summary(run: SweepRun, steps: int | None = None) -> dict | None:
    """The run's summary when it finished (``steps`` reached, with a checkpoint), else None."""
    from foundation.pipeline import finished_summary

    return finished_summary(run.run_dir, steps)


def train_command(recipe: str | Path, run: SweepRun, launcher: str = "local", nproc: int = 1,
                  python: str = sys.executable) -> list[str]:
    """The command that trains ``run``: what ``run_sweep`` executes (local, torchrun) or prints (slurm too)."""
    if launcher == "torchrun" or (launcher == "local" and nproc > 1):
        return ["launch/torchrun.sh", str(nproc), str(recipe), *run.overrides]
    if launcher == "slurm":
        return ["sbatch", "--parsable", "--nodes=1", f"--gpus-per-node={nproc}",
                f"--job-name=sweep-{slug(run.variant)}-{run.seed}", "launch/slurm.sbatch", str(recipe), *run.overrides]
    return [python, "-m", "foundation.cli", "train", str(recipe), *run.overrides]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation with n - 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Per-run rows ``{"variant", "seed", "eval": {key: value}}`` -> ``{variant: {key: {mean, std, n, values}}}``,
    variants and keys in first-seen order; a key counts only the runs that report it."""
    table: dict[str, dict[str, dict]] = {}
    for row in rows:
        for key, value in row["eval"].items():
            table.setdefault(row["variant"], {}).setdefault(key, {"values": []})["values"].append(float(value))
        table.setdefault(row["variant"], {})
    for metrics in table.values():
        for cell in metrics.values():
            cell["mean"], cell["std"] = mean_std(cell["values"])
            cell["n"] = len(cell["values"])
    return table


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def to_markdown(table: dict[str, dict[str, dict]], title: str) -> str:
    keys = list(dict.fromkeys(k for m in table.values() for k in m if not k.endswith(COUNT_KEYS)))
    lines = [f"# {title}", "", "mean ± sample std (n - 1) over seeds; n = runs finished", "",
             "| variant | n | " + " | ".join(k.removeprefix("eval/") for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for variant, metrics in table.items():
        n = max((c["n"] for c in metrics.values()), default=0)
        cells = [f"{_fmt(metrics[k]['mean'])} ± {_fmt(metrics[k]['std'])}" if k in metrics else "" for k in keys]
        lines.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: dict[str, dict[str, dict]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "metric", "mean", "std", "n"])
    for variant, metrics in table.items():
        for key, c in metrics.items():
            w.writerow([variant, key, repr(c["mean"]), "" if c["std"] is None else repr(c["std"]), c["n"]])
    return buf.getvalue()


def collect(runs: list[SweepRun], steps: dict[int, int]) -> list[dict]:
    """A row per run: its variant, seed, run dir, whether it finished and (finished) its ``eval/*`` values."""
    rows = []
    for i, run in enumerate(runs):
        summary = read_summary(run, steps[i])
        evals = {k: v for k, v in (summary or {}).items() if k.startswith("eval/") and isinstance(v, (int, float))}
        rows.append({"variant": run.variant, "seed": run.seed, "run_dir": str(run.run_dir),
                     "finished": summary is not None, "eval": evals})
    return rows


def write_outputs(out: Path, header: dict, rows: list[dict]) -> dict:
    table = aggregate([r for r in rows if r["finished"]])
    result = {**header, "runs": rows, "table": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "sweep.md").write_text(to_markdown(table, f"Sweep `{header['group']}`: `{header['command']}`"))
    (out / "sweep.csv").write_text(to_csv(table))
    return result


def _execute(cmd: list[str], env: dict, log_file: Path) -> None:
    log.info("$ %s", shlex.join(cmd))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode == 2:  # the run's own one-line `error:` (missing shards, a refused checkpoint, ...)
        errors = [line for line in log_file.read_text().splitlines() if line.startswith("error: ")]
        raise RecipeError(f"{errors[-1].removeprefix('error: ') if errors else 'exit code 2'} "
                          f"(from: {shlex.join(cmd)}; output in {log_file})")
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {shlex.join(cmd)}\n"
                           f"last lines of {log_file}:\n{tail}")


def sweep(recipe: str | Path, overrides: list[str], seeds: list[int], grid: list[tuple[str, list[str]]],
          named: list[list[str]] | None = None, out: str | Path | None = None, group: str | None = None,
          launcher: str = "local", nproc: int = 1, mode: str = "run", command: str = "") -> dict | str:
    """``mode``: ``run`` (train what is unfinished, then write the table), ``aggregate`` (only the table) or
    ``print`` (the commands, as a bash script; returned as a string)."""
    from foundation.train import load_checked

    if launcher not in LAUNCHERS:
        raise RecipeError(f"--launcher {launcher!r}: choose from {LAUNCHERS}")
    base = load_checked(recipe, overrides)
    out = Path(out) if out else Path(base.output_dir) / f"{base.name}_sweep"
    group = group or out.name
    variants = make_variants(named, grid)
    runs = plan(recipe, overrides, seeds, variants, out, group)
    steps = {i: load_checked(recipe, r.overrides).train.steps for i, r in enumerate(runs)}
    header = {"recipe": str(recipe), "overrides": overrides, "seeds": seeds, "group": group, "out": str(out),
              "command": command or f"foundation sweep {recipe}",
              "variants": [{"name": v.name, "overrides": v.overrides} for v in variants]}

    if mode == "print":
        lines = ["#!/usr/bin/env bash", f"# sweep {group}: {len(runs)} runs under {out}", "set -euo pipefail",
                 f"export WANDB_RUN_GROUP={shlex.quote(group)}"]
        for i, run in enumerate(runs):
            done = read_summary(run, steps[i]) is not None
            cmd = shlex.join(train_command(recipe, run, launcher, nproc, python="python"))
            lines.append(("# finished: " if done else "") + cmd)
        again = [a for a in shlex.split(command)[1:] if a != "--print-commands"] if command else []
        lines.append("# then the table: " + shlex.join(["python", "-m", "foundation.cli", *again, "--aggregate"]))
        return "\n".join(lines) + "\n"

    if mode == "run":
        if launcher == "slurm":
            raise RecipeError("--launcher slurm: the sweep cannot wait on SLURM jobs; submit what --print-commands "
                              "writes, then run the same command with --aggregate")
        env = {**os.environ, "WANDB_RUN_GROUP": group}
        for i, run in enumerate(runs):
            if read_summary(run, steps[i]) is not None:
                log.info("finished, skipped: %s seed %d (%s)", run.variant, run.seed, run.run_dir)
                continue
            t0 = time.time()
            _execute(train_command(recipe, run, launcher, nproc), env,
                     out / "logs" / f"{slug(run.variant)}_seed_{run.seed}.log")
            log.info("trained %s seed %d in %.0f s", run.variant, run.seed, time.time() - t0)
    return write_outputs(out, header, collect(runs, steps))


def add_cli(sub) -> None:
    p = sub.add_parser("sweep", help="run a recipe over seeds x variants (resumable) and write one table of mean "
                                     "± std per variant (JSON, Markdown, CSV; one W&B group)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. train.steps=400")
    p.add_argument("--seeds", required=True, help="e.g. 0,1,2 or 0-4")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one variant per value (several --grid: every combination)")
    p.add_argument("--variant", action="append", nargs="+", metavar="NAME KEY=V",
                   help="a named variant: its overrides (repeat for several; --grid multiplies them)")
    p.add_argument("--out", help="sweep directory (default: <output_dir>/<name>_sweep)")
    p.add_argument("--group", help="W&B group (default: the sweep directory's name)")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS)
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run (torchrun, slurm)")
    p.add_argument("--print-commands", action="store_true", help="print every run's command instead of running")
    p.add_argument("--aggregate", action="store_true", help="only write the table from the runs finished so far")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    mode = "print" if args.print_commands else "aggregate" if args.aggregate else "run"
    result = sweep(args.recipe, args.overrides, parse_seeds(args.seeds), parse_grid(args.grid), args.variant,
                   args.out, args.group, args.launcher, args.nproc, mode,
                   command=shlex.join(["foundation", *sys.argv[1:]]) if sys.argv[1:2] == ["sweep"] else "")
    if mode == "print":
        print(result, end="")
    else:
        print((Path(result["out"]) / "sweep.md").read_text(), end="")
    return 0


__all__ = ["Variant", "SweepRun", "aggregate", "make_variants", "mean_std", "parse_grid", "parse_seeds", "sweep"]
