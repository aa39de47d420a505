"""``foundation pipeline PIPELINE.yaml``: named stages run in order, each started from an earlier one
(INTERN: amateur -> experts -> generalist -> distilled -> adaptation).

A training stage is a recipe file plus dotted overrides (what ``foundation train`` takes) and
``init: {stage: NAME, part: backbone|all}``, which becomes ``model.init: {path: <that stage's run dir>,
part: ...}``. A stage may list ``experts``: several runs from the same init, each its own recipe and
overrides. ``experts_from: STAGE`` hands a stage the run directories of that stage's experts
(``model.kwargs.experts``, read by ``intern_generalist``); ``teacher_from: STAGE`` hands it that stage's
run (``task.distill.teacher``). The last stage may be ``adapt:``: every earlier model exported as timm
weights and put through an adaptation suite at one fraction, the first model also trained from scratch
on 100%, and INTERN's comparison table written.

Runs go to ``<output_dir>/<pipeline>/<stage>[/<expert>]``. A stage is finished when its run directory has
``summary.json`` with ``steps`` equal to the recipe's ``train.steps``; finished stages are skipped, an
unfinished one is run again and continues from its newest checkpoint (``train.resume: auto``). Each
stage runs as its own process (the command ``--print-commands`` prints), every run in one W&B group.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from foundation.config import RecipeError, format_errors, read_yaml, suggest

log = logging.getLogger("foundation.pipeline")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageInit(_Strict):
    """Where a stage starts: an earlier stage's run (``stage`` or ``stage/expert``) -> ``model.init``."""

    stage: str
    part: Literal["backbone", "all"] = "backbone"
    remap: dict[str, str] = {}  # as model.init.remap, e.g. {"": "main."} into the generalist's main backbone
    include: list[str] = []
    exclude: list[str] = []


class Expert(_Strict):
    """One expert of a stage: its own recipe (default: the stage's) and overrides (after the stage's)."""

    recipe: str | None = None
    overrides: list[str] = []


class AdaptStage(_Strict):
    """The comparison: each model stage exported as timm weights and adapted with ``suite`` at ``fraction``;
    ``scratch_from`` (default: the first model) also trains its architecture from scratch on 100%."""

    suite: str  # an adaptation suite file (recipes/adapt/*.yaml): datasets, methods, fine-tuning settings
    models: list[str] | None = None  # stages to compare (default: every training stage before this one)
    fraction: float = Field(0.1, gt=0, le=1)
    scratch_from: str | None = None


class Stage(_Strict):
    """A training stage (``recipe``) or the adaptation stage (``adapt``)."""

    recipe: str | None = None  # a training recipe file (path from the working directory)
    overrides: list[str] = []  # dotted key=value, as `foundation train` takes them
    init: StageInit | None = None
    experts: dict[str, Expert] | None = None  # several runs from the same init
    experts_from: str | None = None  # model.kwargs.experts = that stage's expert run directories
    teacher_from: str | None = None  # task.distill.teacher = that stage's run directory
    nproc: int | None = Field(None, gt=0)  # processes (GPUs) per node for this stage (default: launcher.nproc)
    adapt: AdaptStage | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Stage:
        if (self.recipe is None) == (self.adapt is None):
            raise ValueError("a stage has either recipe (a training stage) or adapt (the comparison), not both")
        if self.experts is not None and not self.experts:
            raise ValueError("experts: name at least one expert (or leave experts out)")
        return self


class Launcher(_Strict):
    """How stage commands run: ``local`` (``foundation train``), ``torchrun`` (launch/torchrun.sh, one node)
    or ``slurm`` (launch/slurm.sbatch; printed with --print-commands, submitted by the user)."""

    kind: Literal["local", "torchrun", "slurm"] = "local"
    nproc: int = Field(1, gt=0)  # processes per node (GPUs per node)
    nodes: int = Field(1, gt=0)  # slurm only
    sbatch_args: list[str] = []  # e.g. ["--partition=gpu", "--time=48:00:00"]


class Pipeline(_Strict):
    """A pipeline file (``recipes/intern/*.yaml``)."""

    name: str
    output_dir: str = "runs"
    wandb_group: str | None = None  # default: the pipeline's name
    launcher: Launcher = Field(default_factory=Launcher)
    stages: dict[str, Stage]

    @model_validator(mode="after")
    def _references(self) -> Pipeline:
        if not self.stages:
            raise ValueError("stages: name at least one stage")
        seen: dict[str, Stage] = {}
        for name, stage in self.stages.items():
            if "/" in name or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"stages.{name}: stage names are letters, digits, '_' and '-'")
            refs = [("init.stage", stage.init.stage if stage.init else None), ("experts_from", stage.experts_from),
                    ("teacher_from", stage.teacher_from)]
            if stage.adapt:
                refs += [(f"adapt.models.{i}", m) for i, m in enumerate(stage.adapt.models or [])]
                refs.append(("adapt.scratch_from", stage.adapt.scratch_from))
            for key, ref in refs:
                if ref is None:
                    continue
                head, _, expert = ref.partition("/")
                if head not in seen or seen[head].recipe is None:
                    earlier = [n for n, s in seen.items() if s.recipe is not None]
                    raise ValueError(f"stages.{name}.{key}: {ref!r} is not an earlier training stage"
                                     f"{suggest(head, earlier)}; earlier: {earlier}")
                experts = seen[head].experts
                if expert and (experts is None or expert not in experts):
                    raise ValueError(f"stages.{name}.{key}: stage {head!r} has no expert {expert!r}; its experts: "
                                     f"{sorted(experts or {})}")
                if key == "experts_from" and experts is None:
                    raise ValueError(f"stages.{name}.experts_from: stage {head!r} has no experts")
                if key in ("init.stage", "teacher_from") and experts is not None and not expert:
                    raise ValueError(f"stages.{name}.{key}: stage {head!r} has experts; name one: "
                                     f"{[f'{head}/{e}' for e in experts]}")
            if stage.adapt and name != list(self.stages)[-1]:
                raise ValueError(f"stages.{name}.adapt: the adaptation stage comes last")
            seen[name] = stage
        return self

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def group(self) -> str:
        return self.wandb_group or self.name

    def run_dir(self, ref: str) -> Path:
        """``stage`` -> <root>/<stage>; ``stage/expert`` -> <root>/<stage>/<expert>."""
        return self.root / ref


# --------------------------------------------------------------------------------------------------
# loading




def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Validate a pipeline file and every stage's recipe with the overrides the runner will pass."""
    path = Path(path)
    data = read_yaml(path, "pipeline")
    for o in overrides:  # top-level only: output_dir=..., name=..., wandb_group=...
        key, sep, value = o.partition("=")
        if not sep or key not in ("name", "output_dir", "wandb_group"):
            raise RecipeError(f"pipeline override {o!r}: only name=, output_dir= and wandb_group= are taken")
        data[key] = yaml.safe_load(value)
    stages = data.get("stages")
    for name, stage in (stages.items() if isinstance(stages, dict) else []):
        try:  # each stage on its own first, so an error names the stage and the key within it
            Stage.model_validate(stage if stage is not None else {})
        except ValidationError as e:
            raise RecipeError(format_errors(e, f"{path}: stages.{name}", Stage, "stage")) from None
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_errors(e, str(path), Pipeline, "pipeline")) from None
    from foundation.train import load_checked

    for run in plan(pipeline):
        if run.recipe is None:
            continue
        try:
            load_checked(run.recipe, run.overrides)
        except RecipeError as e:
            raise RecipeError(f"{path}: stages.{run.stage}{'/' + run.expert if run.expert else ''}: {e}") from None
    if any(s.adapt for s in pipeline.stages.values()):
        from foundation.adapt.suite import load_suite

        load_suite(next(s.adapt for s in pipeline.stages.values() if s.adapt).suite)
    return pipeline


# --------------------------------------------------------------------------------------------------
# planning: what each stage runs


class Run(_Strict):
    """One training run (a stage, or one expert of it) or the adaptation stage."""

    stage: str
    expert: str | None = None
    recipe: str | None = None
    overrides: list[str] = []
    run_dir: str
    nproc: int = 1

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.expert}" if self.expert else self.stage


def _init_value(pipeline: Pipeline, init: StageInit) -> str:
    value = {"path": str(pipeline.run_dir(init.stage)), "part": init.part}
    for key in ("remap", "include", "exclude"):
        if getattr(init, key):
            value[key] = getattr(init, key)
    return json.dumps(value)


def plan(pipeline: Pipeline) -> list[Run]:
    """Every run in order, with the overrides that place it and start it from its ``init``."""
    runs = []
    for name, stage in pipeline.stages.items():
        nproc = stage.nproc or pipeline.launcher.nproc
        if stage.adapt is not None:
            runs.append(Run(stage=name, run_dir=str(pipeline.run_dir(name)), nproc=nproc))
            continue
        generated = [f"logging.group={json.dumps(pipeline.group)}"]
        if stage.init is not None:
            generated.append(f"model.init={_init_value(pipeline, stage.init)}")
        if stage.experts_from:
            dirs = [str(pipeline.run_dir(f"{stage.experts_from}/{e}")) for e in pipeline.stages[stage.experts_from].experts]
            generated.append(f"model.kwargs.experts={json.dumps(dirs)}")
        if stage.teacher_from:
            generated.append(f"task.distill.teacher={json.dumps(str(pipeline.run_dir(stage.teacher_from)))}")
        for expert, spec in (stage.experts or {None: Expert()}).items():
            ref = f"{name}/{expert}" if expert else name
            where = pipeline.run_dir(ref)
            place = [f"output_dir={json.dumps(str(where.parent))}", f"name={json.dumps(where.name)}"]
            runs.append(Run(stage=name, expert=expert, recipe=spec.recipe or stage.recipe,
                            overrides=[*generated, *stage.overrides, *spec.overrides, *place], run_dir=str(where),
                            nproc=nproc))
    return runs


def train_command(run: Run, launcher: Launcher, python: str = sys.executable) -> list[str]:
    """The command that trains ``run``: what the runner executes (local, torchrun) or prints (slurm)."""
    if launcher.kind == "torchrun" or (launcher.kind == "local" and run.nproc > 1):
        return ["launch/torchrun.sh", str(run.nproc), run.recipe, *run.overrides]
    if launcher.kind == "slurm":
        return ["sbatch", "--parsable", f"--nodes={launcher.nodes}", f"--gpus-per-node={run.nproc}",
                f"--job-name={run.ref.replace('/', '-')}", *launcher.sbatch_args, "launch/slurm.sbatch", run.recipe,
                *run.overrides]
    return [python, "-m", "foundation.cli", "train", run.recipe, *run.overrides]


def finished_summary(run_dir: Path, steps: int | None = None) -> dict | None:
    """The run's ``summary.json`` when it says the run finished (``steps`` reached, a checkpoint written)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if steps is not None and summary.get("steps") != steps:
        return None
    return summary if summary.get("checkpoint") else None


def finished(run: Run) -> bool:
    """``summary.json`` in the run directory says the recipe's ``train.steps`` were reached."""
    from foundation.train import load_checked

    return finished_summary(run.run_dir, load_checked(run.recipe, run.overrides).train.steps) is not None


# --------------------------------------------------------------------------------------------------
# running


class _State:
    """``<root>/pipeline.json``: each run's status and wall time (summed over attempts)."""

    def __init__(self, root: Path):
        self.file = root / "pipeline.json"
        self.data = json.loads(self.file.read_text()) if self.file.is_file() else {"runs": {}}

    def run(self, ref: str) -> dict:
        return self.data["runs"].setdefault(ref, {"status": "pending", "wall_time_s": 0.0, "attempts": 0})

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.file)


def _execute(cmd: list[str], env: dict, log_file: Path) -> None:
    log.info("$ %s", shlex.join(cmd))
    with open(log_file, "a") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode == 2:  # the command's own one-line `error:` (missing shards, refused checkpoint, ...)
        from foundation.data import DataError

        errors = [line for line in log_file.read_text().splitlines() if line.startswith("error: ")]
        what = errors[-1].removeprefix("error: ") if errors else "exit code 2"
        raise DataError(f"{what} (from: {shlex.join(cmd)}; output in {log_file})")
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {shlex.join(cmd)}\n"
                           f"last lines of {log_file}:\n{tail}")


def run_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = (), only: list[str] | None = None,
                 launcher: str | None = None) -> dict:
    """Run (or resume) every stage; returns the summary (also ``<root>/summary.{json,md}``)."""
    pipeline = load_pipeline(path, overrides)
    if launcher:
        pipeline = pipeline.model_copy(update={"launcher": pipeline.launcher.model_copy(update={"kind": launcher})})
    if pipeline.launcher.kind == "slurm":
        raise RecipeError("launcher.kind slurm: the pipeline cannot wait on SLURM jobs; submit the script that "
                          "`foundation pipeline FILE --print-commands` writes, or run here with --launcher local")
    unknown = [s for s in only or [] if s not in pipeline.stages]
    if unknown:
        raise RecipeError(f"--only {unknown[0]!r}: no such stage{suggest(unknown[0], pipeline.stages)}; stages: "
                          f"{list(pipeline.stages)}")
    root = pipeline.root
    root.mkdir(parents=True, exist_ok=True)
    state = _State(root)
    env = {**os.environ, "WANDB_RUN_GROUP": pipeline.group}
    for run in plan(pipeline):
        if only and run.stage not in only:
            continue
        entry = state.run(run.ref)
        if run.recipe is not None and finished(run):
            if entry["status"] != "done":
                entry["status"] = "done"
                state.save()
            log.info("stage %s: finished (%s), skipped", run.ref, run.run_dir)
            continue
        log.info("stage %s: %s", run.ref, "resuming" if entry["attempts"] else "starting")
        entry["status"], entry["attempts"] = "running", entry["attempts"] + 1
        state.save()
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            if run.recipe is not None:
                _execute(train_command(run, pipeline.launcher), env, root / "pipeline.log")
            else:
                entry["comparison"] = run_adapt_stage(pipeline, run, env)
        except BaseException:
            entry["status"] = "failed"
            raise
        finally:
            entry["wall_time_s"] = round(entry["wall_time_s"] + time.perf_counter() - t0, 1)
            state.save()
        entry["status"] = "done"
        state.save()
    return write_summary(pipeline, state)


# --------------------------------------------------------------------------------------------------
# the adaptation stage


def _models(pipeline: Pipeline, adapt: AdaptStage) -> list[str]:
    """Run references (``stage`` or ``stage/expert``) of the models to compare, in stage order."""
    names = adapt.models or [n for n, s in pipeline.stages.items() if s.recipe is not None]
    refs = []
    for n in names:
        head, _, expert = n.partition("/")
        experts = pipeline.stages[head].experts
        refs += [n] if expert or experts is None else [f"{head}/{e}" for e in experts]
    return refs


def adapt_commands(pipeline: Pipeline, run: Run, python: str = sys.executable,
                   write: bool = True) -> list[tuple[str, list[str], Path]]:
    """(model, command, suite file) for each model: export as timm weights, then the suite at one fraction
    (the derived suite files are written when ``write``)."""
    from foundation.adapt.suite import load_suite

    adapt = pipeline.stages[run.stage].adapt
    suite = load_suite(adapt.suite)
    models = _models(pipeline, adapt)
    scratch = adapt.scratch_from or models[0]
    root = Path(run.run_dir)
    out = []
    for ref in models:
        key = ref.replace("/", "-")
        export = root / "exports" / key
        derived = suite.model_copy(update={"name": f"{pipeline.name}-{key}", "checkpoint": str(export),
                                           "fractions": [adapt.fraction], "scratch": ref == scratch and suite.scratch,
                                           "out": str(root / key)})
        suite_file = root / "suites" / f"{key}.yaml"
        if write:
            suite_file.parent.mkdir(parents=True, exist_ok=True)
            suite_file.write_text(yaml.safe_dump(derived.model_dump(mode="json"), sort_keys=False))
        out.append((ref, [python, "-m", "foundation.cli", "export", "--checkpoint", str(pipeline.run_dir(ref)),
                          "--format", "timm", "--out", str(export)], suite_file))
        out.append((ref, [python, "-m", "foundation.cli", "adapt", "--suite", str(suite_file)], suite_file))
    return out


def run_adapt_stage(pipeline: Pipeline, run: Run, env: dict) -> dict:
    """Export and adapt every model (suites resume cell by cell), then write the comparison table."""
    for ref, cmd, _ in adapt_commands(pipeline, run):
        if cmd[3] == "export" and (Path(cmd[-1]) / "config.json").is_file() and \
                (Path(cmd[-1]) / "model.safetensors").stat().st_mtime >= (Path(cmd[5]) / "summary.json").stat().st_mtime:
            continue  # exported after the run finished
        _execute(cmd, env, pipeline.root / "pipeline.log")
    return write_comparison(pipeline, run)


def write_comparison(pipeline: Pipeline, run: Run) -> dict:
    """INTERN's table: dataset x model (top-1 % at the fraction, per method) next to scratch on 100%."""
    adapt = pipeline.stages[run.stage].adapt
    models = _models(pipeline, adapt)
    root = Path(run.run_dir)
    cells: dict[tuple[str, str, str], float | None] = {}
    scratch: dict[str, float | None] = {}
    datasets, methods = [], []
    for ref in models:
        table = root / ref.replace("/", "-") / "table.json"
        if not table.is_file():
            continue
        for c in json.loads(table.read_text()).get("cells", []):
            if c["dataset"] not in datasets:
                datasets.append(c["dataset"])
            value = None if "error" in c else round(float(c["top1"]), 2)
            if c["method"] == "scratch":
                scratch[c["dataset"]] = value
                continue
            if c["method"] not in methods:
                methods.append(c["method"])
            cells[(c["dataset"], c["method"], ref)] = value
    experts = [m for m in models if "/" in m]
    pct = f"{adapt.fraction * 100:g}%"
    lines = [f"# INTERN comparison: `{pipeline.name}`", "",
             f"Top-1 (%) on each dataset's val split: every model adapted with {pct} of the training split "
             f"(stratified, seeded) next to the same architecture trained from scratch on 100%. "
             f"best expert: the best of {experts or 'no experts'} per dataset.", ""]
    rows = []
    for method in methods:
        cols = [*models, *(["best expert"] if experts else [])]
        lines += [f"## {method} at {pct}", "", "| dataset | " + " | ".join(cols) + " | scratch 100% |",
                  "|---|" + "---:|" * (len(cols) + 1)]
        for d in datasets:
            values = [cells.get((d, method, m)) for m in models]
            if experts:
                got = [cells.get((d, method, e)) for e in experts if cells.get((d, method, e)) is not None]
                values.append(max(got) if got else None)
            row = dict(zip(cols, values)) | {"dataset": d, "method": method, "scratch_100": scratch.get(d)}
            rows.append(row)
            lines.append(f"| {d} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in values)
                         + f" | {'—' if scratch.get(d) is None else f'{scratch[d]:.1f}'} |")
        lines.append("")
    result = {"fraction": adapt.fraction, "models": models, "rows": rows, "markdown": "\n".join(lines) + "\n",
              "files": {"json": str(root / "comparison.json"), "markdown": str(root / "comparison.md")}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "comparison.json").write_text(json.dumps(result, indent=1) + "\n")
    (root / "comparison.md").write_text(result["markdown"])
    return {"files": result["files"]}


# --------------------------------------------------------------------------------------------------
# summary and printed commands


def write_summary(pipeline: Pipeline, state: _State) -> dict:
    """One row per run: status, steps, wall time (summed over attempts), its evaluation figures."""
    rows = []
    for run in plan(pipeline):
        entry = state.data["runs"].get(run.ref, {"status": "pending", "wall_time_s": 0.0})
        summary_file = Path(run.run_dir) / "summary.json"
        summary = json.loads(summary_file.read_text()) if run.recipe and summary_file.is_file() else {}
        metrics = {k: v for k, v in summary.items() if k.startswith("eval/") and k.endswith("/top1")}
        rows.append({"stage": run.ref, "status": entry["status"], "steps": summary.get("steps"),
                     "wall_time_s": entry["wall_time_s"], "run_dir": run.run_dir, "metrics": metrics})
    lines = [f"# Pipeline `{pipeline.name}` (W&B group `{pipeline.group}`)", "",
             "| stage | status | steps | wall time (s) | metrics |", "|---|---|---:|---:|---|"]
    for r in rows:
        metrics = ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r["metrics"].items())
        lines.append(f"| {r['stage']} | {r['status']} | {r['steps'] or ''} | {r['wall_time_s']:.0f} | {metrics} |")
    comparison = pipeline.root / next((n for n, s in pipeline.stages.items() if s.adapt), "-") / "comparison.md"
    if comparison.is_file():
        lines += ["", comparison.read_text()]
    out = {"pipeline": pipeline.name, "root": str(pipeline.root), "rows": rows, "markdown": "\n".join(lines) + "\n"}
    (pipeline.root / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    (pipeline.root / "summary.md").write_text(out["markdown"])
    return out


def print_commands(path: str | Path, overrides: list[str] | tuple[str, ...] = (), launcher: str | None = None) -> str:
    """A bash script with every stage's command; under SLURM each job waits for the one before (afterok)."""
    pipeline = load_pipeline(path, overrides)
    if launcher:
        pipeline = pipeline.model_copy(update={"launcher": pipeline.launcher.model_copy(update={"kind": launcher})})
    slurm = pipeline.launcher.kind == "slurm"
    lines = ["#!/usr/bin/env bash", f"# pipeline {pipeline.name}: stages {', '.join(pipeline.stages)}",
             f"# runs under {pipeline.root}; W&B group {pipeline.group}", "set -euo pipefail",
             f"export WANDB_RUN_GROUP={shlex.quote(pipeline.group)}"]
    jobs: dict[str, list[str]] = {}  # stage -> its SLURM job variables; a job waits for every earlier stage's

    def after(stage: str) -> str:
        earlier = [v for s, vs in jobs.items() if s != stage for v in vs]
        return f"--dependency=afterok:{':'.join('$' + v for v in earlier)} " if earlier else ""

    for run in plan(pipeline):
        lines.append(f"# stage {run.ref}")
        if run.recipe is not None:
            cmd = train_command(run, pipeline.launcher, python="python")
            if slurm:
                var = "job_" + run.ref.replace("/", "_").replace("-", "_")
                lines.append(f"{var}=$(sbatch --parsable {after(run.stage)}{shlex.join(cmd[2:])})")
                jobs.setdefault(run.stage, []).append(var)
            else:
                lines.append(shlex.join(cmd))
            continue
        # one command: it writes the derived suite files, exports each model, runs the suites and the table
        lines += [f"#   {shlex.join(c)}" for _, c, _ in adapt_commands(pipeline, run, python="python", write=False)]
        cmd = f"python -m foundation.cli pipeline {shlex.quote(str(path))} --only {run.stage} --launcher local"
        if slurm:  # the adaptation stage as one job after every training stage
            lines.append(f"sbatch {after(run.stage)}--nodes=1 --gpus-per-node=1 --wrap={shlex.quote(cmd)}")
        else:
            lines.append(cmd)
    return "\n".join(lines) + "\n"


__all__ = ["Pipeline", "Stage", "load_pipeline", "plan", "print_commands", "run_pipeline", "train_command"]
