"""THE training loop. Read ``_train`` top to bottom:

    set up (process group, task, model.init, freeze, optimizer, schedule, engine) → resume → data →
    for each step: fetch micro-batches → forward → NaN/inf guard → backward → clip + step → log → eval → save

It runs a *task* (model + loss → dict with "loss") on one process, under torchrun (DDP) or under
DeepSpeed; ``foundation.engine.distributed.Engine`` holds the backend differences. A multi-task recipe
(``tasks:``) runs a ``MultiTask`` — a shared backbone and one head per task — whose batch is
``{task: batch}`` for the tasks ``train.schedule`` trains at that step; everything else is the same loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from evaluation import EVALS
from foundation.config import OptimConfig, Recipe, RecipeError, dump_recipe, load_recipe, lookup, recipe_dict
from foundation.data import DataError
from foundation.data.shards import build_eval_loader, build_train_loader
from foundation.engine.checkpoint import (
    CheckpointError, find_latest, load_state, load_task_weights, load_weights, read_tensors, rng_state,
    save_checkpoint, set_rng_state,
)
from foundation.engine.distributed import (
    DistInfo, Engine, TaskGroups, close_distributed, gather_objects, init_distributed,
)
from foundation.engine import fsdp
from foundation.engine.resume import data_position, load_optimizer_across
from foundation.engine.streams import SingleStream, TaskStreams, stream_seed
from foundation.engine.tracking import Tracker, format_duration, setup_logging
from foundation.engine.transfer import apply_init, build_optimizer, freeze, write_init_report
from foundation.tasks import TASKS, build_task, network

log = logging.getLogger("foundation")

__all__ = ["NonFiniteLossError", "build_optimizer", "build_scheduler", "check_names", "load_checked", "train"]


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.nan_patience`` non-finite steps in a row."""


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps: int) -> CosineLRScheduler:
    """Linear warm-up for ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` (timm, per step)."""
    decay_steps = max(steps - cfg.warmup_steps, 1)
    return CosineLRScheduler(
        optimizer, t_initial=decay_steps, lr_min=cfg.lr if cfg.schedule == "constant" else cfg.min_lr,
        warmup_t=cfg.warmup_steps, warmup_lr_init=cfg.warmup_lr, warmup_prefix=True, t_in_epochs=False,
    )


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Work inside (evaluation, starting loader workers) leaves the training RNG streams untouched,
    so a resumed run draws exactly the numbers a straight run draws."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of a batch (or of every task's batch in ``{task: batch}``) on ``device``."""
    return {k: to_device(v, device) if isinstance(v, dict) else
            v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def resolve_resume(resume: str, checkpoints: Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(checkpoints)
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise CheckpointError(f"train.resume: {path} is not a checkpoint directory (no state.pt in it)")
    return path


def check_names(recipe: Recipe) -> None:
    """Task and evaluation names against their registries; one ``RecipeError`` listing every unknown one."""
    names = [("task.name", TASKS, recipe.task.name)] if recipe.tasks is None else []
    names += [(f"train.evals.{i}", EVALS, e) for i, e in enumerate(recipe.train.evals or [])]
    for key, entry in (recipe.tasks or {}).items():
        names.append((f"tasks.{key}.task.name", TASKS, entry.task.name))
        names += [(f"tasks.{key}.evals.{i}", EVALS, e) for i, e in enumerate(entry.evals or [])]
    problems = []
    for where, registry, name in names:
        try:
            lookup(registry, name, where)
        except RecipeError as e:
            problems.append(f"  {e}")
    if problems:
        raise RecipeError("\n".join(["invalid recipe", *problems]))


def load_checked(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """``load_recipe`` plus the registry names (``check_names``): what ``foundation train`` runs."""
    recipe = load_recipe(path, overrides)
    check_names(recipe)
    return recipe


def train(recipe: Recipe) -> dict:
    """Run the recipe to ``train.steps`` (resuming when a checkpoint says so); returns the summary."""
    check_names(recipe)
    info = init_distributed(recipe.parallel, recipe.train.device)
    try:
        return _train(recipe, info)
    finally:
        close_distributed()


@dataclass
class Run:
    """What the loop works with, made by ``set_up``."""

    recipe: Recipe
    info: DistInfo
    task: nn.Module
    engine: Engine
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    ema: ModelEmaV3 | None
    streams: SingleStream | TaskStreams
    tracker: Tracker
    groups: TaskGroups | None
    start_step: int
    last_ckpt: Path | None
    counters: dict


def _train(recipe: Recipe, info: DistInfo) -> dict:
    cfg = recipe.train
    run = set_up(recipe, info)
    nonfinite_run, eval_results = 0, {}
    t_start, steps_done, step_time = time.perf_counter(), 0, None
    run.task.train()
    for step in range(run.start_step + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        run.scheduler.step_update(step - 1)  # lr of this step
        terms, dropped, bad_terms = forward_backward(run, step)
        grad_norm = run.engine.step(cfg.clip_grad, skip=dropped)
        if run.ema is not None and grad_norm is not None:
            run.ema.update(network(run.engine.module), step=step)

        # -- NaN/inf guard: skipped steps are counted; too many in a row stop the run
        if dropped or grad_norm is None:
            run.counters["nonfinite_steps"] += 1
            nonfinite_run += 1
            what = "loss" if dropped else "gradients"
            described = ", ".join(f"{k}={v.item():.4g}" for k, v in (bad_terms or terms).items() if v.numel() == 1)
            log.warning("step %d: non-finite %s (%s); step skipped (%d in a row)", step, what, described, nonfinite_run)
            if nonfinite_run >= cfg.nan_patience:
                raise NonFiniteLossError(
                    f"stopping at step {step}: {nonfinite_run} non-finite steps in a row (train.nan_patience="
                    f"{cfg.nan_patience}); last loss terms: {described}. Lower optim.lr, raise optim.warmup_steps,"
                    " set train.clip_grad, or use train.precision=bf16/fp32."
                )
        else:
            nonfinite_run = 0
        samples = step_samples(run, step)
        run.counters["samples"] += sum(samples.values())
        run.counters["samples_this_run"] += sum(samples.values())
        steps_done += 1

        # -- speed, log, eval, save
        dt = time.perf_counter() - t0
        step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
        if step % cfg.log_every == 0 or step == cfg.steps or step == run.start_step + 1:
            log_step(run, step, terms, grad_norm, samples, dt, step_time)
        if cfg.eval_every != 0 and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            with run.engine.gathered() if run.info.backend == "fsdp2" else contextlib.nullcontext():
                eval_results = evaluate(run, step)
            if eval_results:
                run.tracker.log(step, eval_results)
        if cfg.save_every != 0 and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps):
            run.last_ckpt = save(run, step)

    if steps_done == 0 and run.start_step == cfg.steps and cfg.eval_every != 0:
        # resumed at the final checkpoint (killed after saving it, before the summary): evaluate the final weights,
        # so the summary is the one a straight run writes
        with run.engine.gathered() if run.info.backend == "fsdp2" else contextlib.nullcontext():
            eval_results = evaluate(run, cfg.steps)
    elapsed = time.perf_counter() - t_start
    if run.groups is not None:
        run.groups.broadcast_task_params(run.engine.module)
    else:
        run.engine.sync_buffers()
    digest = weights_digest(run.engine)
    digests = gather_objects(digest)
    if len(set(digests)) > 1:
        log.error("ranks disagree on the final weights: %s", digests)
    skipped = _reduce_skipped(run)
    summary = {
        "steps": cfg.steps,
        "steps_this_run": steps_done,
        "wall_time_s": round(elapsed, 2),
        "samples_per_s": round(run.counters["samples_this_run"] / elapsed, 2) if steps_done else 0.0,
        "nonfinite_steps": run.counters["nonfinite_steps"],
        "data_skipped": int(sum(skipped.values())),
        "checkpoint": str(run.last_ckpt) if run.last_ckpt else None,
        "run_dir": str(recipe.run_dir),
        "weights_sha256": digest,
        "ranks_agree": len(set(digests)) == 1,
        **eval_results,
    }
    run.tracker.summary(summary)
    run.tracker.close()
    log.info("done: %s", ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


# --------------------------------------------------------------------------------------------------
# set-up


def set_up(recipe: Recipe, info: DistInfo) -> Run:
    """Task (with ``model.init`` and ``model.freeze``), optimizer, schedule, engine, EMA, resume, data, tracking."""
    from foundation.artefacts import self_contained

    recipe = self_contained(recipe)  # class counts and vocabularies from the shards, into the run's recipe.yaml
    cfg = recipe.train
    run_dir, ckpt_root = recipe.run_dir, recipe.run_dir / "checkpoints"
    setup_logging(run_dir, info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    groups = None
    if cfg.schedule == "groups":
        groups = TaskGroups({n: e.share for n, e in recipe.tasks.items()}, info.world_size, info.rank)
        log.info("schedule groups: %s; this rank trains %s", groups.ranks, groups.task)

    ckpt = resolve_resume(cfg.resume, ckpt_root)
    state = load_state(ckpt) if ckpt else None
    if state is not None:
        check_resumable(state, recipe, info, ckpt)

    # -- task, transfer, optimizer, schedule. Same seed on every rank for the initial weights.
    seed_everything(recipe.seed)
    task = build_task(recipe, groups.sizes if groups else None, info.world_size).to(info.device)
    if groups is not None:
        groups.check_shared(task)
    if recipe.model.init is not None and state is None:
        report = apply_init(task, recipe.model.init)
        log.info("model.init from %s (%s): %s", recipe.model.init.path, recipe.model.init.part, report.summary())
        if info.is_main:
            write_init_report(report, recipe.model.init, run_dir)
    frozen = freeze(task, recipe.model.freeze)
    if frozen:
        log.info("model.freeze: %d parameter tensors frozen (%s%s)", len(frozen), ", ".join(frozen[:4]),
                 ", ..." if len(frozen) > 4 else "")
    # -- resume: weights before wrapping (DDP broadcasts rank 0's weights when wrapping; FSDP2 shards them)
    if state is not None and info.backend != "deepspeed":
        load_task_weights(task, ckpt)
    if info.backend == "fsdp2":  # sharded in place before the optimizer, which steps the shards
        fsdp.shard(task, recipe, info)
    optimizer = build_optimizer(task, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, cfg.steps)  # from the recipe, also when resuming
    if state is not None and info.backend != "deepspeed":
        if not load_optimizer_across(task, optimizer, state, ckpt, info.backend):  # another form (FSDP2's dcp/)
            load_optimizer_state(optimizer, state["optimizer"], ckpt)
    ema = None
    if cfg.ema_decay:  # before compiling: the copy must hold its own (uncompiled) module
        if info.backend == "deepspeed" and recipe.parallel.zero_stage == 3:
            raise ValueError("train.ema_decay: not available with ZeRO-3 (the weights are partitioned)")
        ema = ModelEmaV3(network(task), decay=cfg.ema_decay)
    if cfg.compile:
        (task.model if recipe.tasks is None else task.backbone).compile()
    parallel = recipe.parallel
    if recipe.tasks is not None and cfg.schedule == "sample":  # heads of the tasks not drawn get no gradient
        parallel = parallel.model_copy(update={"find_unused_parameters": True})
    engine = (fsdp.FSDPEngine if info.backend == "fsdp2" else Engine)(task, optimizer, info, parallel, cfg, groups=groups)
    if state is not None:
        if info.backend == "deepspeed":
            engine.wrapped.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_lr_scheduler_states=False)
        if engine.scaler is not None and "scaler" in state:
            engine.scaler.load_state_dict(state["scaler"])
        if ema is not None and (ckpt / "ema.safetensors").is_file():
            load_weights(ema.module, read_tensors(ckpt / "ema.safetensors"))
    start_step = state["step"] if state else 0
    same_world = state is not None and state["world_size"] == info.world_size
    if state is not None and not same_world:
        log.warning("resuming %d ranks from a %d-rank checkpoint: each rank continues its stream if it had one, "
                    "else starts a new one; RNG restarts from the seed", info.world_size, state["world_size"])
    position = data_position(state, recipe, info) if state is not None and cfg.resume_data == "exact" else None
    if state is not None and same_world and cfg.resume_data == "restart":
        log.warning("train.resume_data=restart: the data streams start afresh (new order, seeded by the step)")
    counters = dict(state["counters"]) if state else {"nonfinite_steps": 0, "samples": 0}
    counters["samples_this_run"] = 0

    # -- data. Starting workers must not disturb the RNG that the resumed state restores below.
    with preserved_rng():
        streams = build_streams(recipe, task, info, groups, position, start_step if position is None else 0)
    if same_world:
        set_rng_state(state["rng"][info.rank])
    else:
        seed_everything(recipe.seed + 1000 * info.rank + start_step)  # per-rank streams: dropout, mixup

    tracker = Tracker.create(
        run_dir, info.is_main, recipe_dict(recipe), wandb_mode=recipe.logging.wandb,
        project=recipe.logging.project, entity=recipe.logging.entity, tags=recipe.logging.tags, name=recipe.name,
        wandb_id=state.get("wandb_id") if state else None, total_steps=cfg.steps, start_step=start_step,
        progress=recipe.logging.progress,
    )
    if ckpt:
        log.info("resumed from %s at step %d", ckpt, start_step)
    tasks = ", ".join(f"{n} (x{e.loss_weight:g})" for n, e in recipe.tasks.items()) if recipe.tasks else recipe.task.name
    log.info("%s: %s [%s] on %s, %d rank(s) [%s], %d steps, precision %s%s", recipe.name, recipe.model.backbone,
             tasks, info.device, info.world_size, info.backend, cfg.steps, cfg.precision,
             f", schedule {cfg.schedule}" if recipe.tasks else "")
    return Run(recipe, info, task, engine, optimizer, scheduler, ema, streams, tracker, groups, start_step, ckpt,
               counters)


def check_resumable(state: dict, recipe: Recipe, info: DistInfo, ckpt: Path) -> None:
    """Stop with what to do when a checkpoint cannot continue under this recipe; log what changed."""
    was, now = state.get("backend", info.backend), info.backend
    if was == now == "deepspeed" and state["world_size"] != info.world_size:
        raise CheckpointError(
            f"{ckpt} was written by {state['world_size']} DeepSpeed rank(s) and this run has {info.world_size}: "
            "DeepSpeed's optimizer state is in its own files (ZeRO partitions per rank). Resume at the same world "
            f"size, or start a new run from its weights with model.init: {{path: {ckpt}, part: all}} (and "
            "train.resume=none)")
    if (was == "deepspeed") != (now == "deepspeed"):
        raise CheckpointError(
            f"{ckpt} was written by a {was} run and this one is {now}: the optimizer state is in a different "
            f"form. Resume with parallel.backend={was}, or start a new run from its weights with "
            f"model.init: {{path: {ckpt}, part: all}} (and train.resume=none)")
    if not (ckpt / "recipe.yaml").is_file():
        return
    from foundation.artefacts import load_artefact_recipe
    from foundation.trust import ArtefactRefused

    try:
        old = load_artefact_recipe(ckpt)  # through the artefact gate: no base: include, local names only
    except ArtefactRefused:
        raise
    except RecipeError:  # an older schema: nothing to compare
        return
    for section, key in (("train", "steps"), ("optim", "lr"), ("optim", "min_lr"), ("optim", "warmup_steps"),
                         ("optim", "warmup_lr"), ("optim", "schedule"), ("optim", "weight_decay")):
        a, b = getattr(getattr(old, section), key), getattr(getattr(recipe, section), key)
        if a != b:
            log.info("%s.%s changed since %s (%s -> %s): the learning-rate schedule and optimizer settings follow "
                     "the new recipe from step %d on", section, key, ckpt.name, a, b, state["step"] + 1)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, ckpt: Path) -> None:
    """The saved optimizer state (moments, step counts) under this recipe's hyperparameters (lr,
    weight decay, betas), so a recipe changed between runs takes effect."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"{ckpt}: its optimizer state does not fit this recipe's parameters ({e}); model.freeze, optim.name, "
            "optim.layer_decay or the tasks changed. Restore them, or start from its weights with model.init "
            "and train.resume=none") from None
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)


def build_streams(recipe: Recipe, task: nn.Module, info: DistInfo, groups: TaskGroups | None,
                  position: dict | None, reseed: int) -> SingleStream | TaskStreams:
    """The training stream(s); ``position`` continues a saved one exactly; ``reseed`` (the start step of a
    run whose streams restart) gives a restarted stream a new order."""
    cfg = recipe.train

    def loader(data, batch_size, seed, rank, world, pos, tokenizer):
        try:
            return build_train_loader(data, batch_size=batch_size, seed=seed + reseed, rank=rank, world_size=world,
                                      position=pos, tokenizer=tokenizer)
        except DataError as e:
            if pos is None:
                raise
            raise DataError(f"{e}; or continue with the new settings and a fresh data order: "
                            "train.resume_data=restart") from None

    if recipe.tasks is None:
        return SingleStream(loader(recipe.data, cfg.batch_size, recipe.seed, info.rank, info.world_size, position,
                                   getattr(task, "tokenizer", None)))
    loaders = {}
    for name, entry in recipe.tasks.items():
        if groups is not None and name != groups.task:
            continue
        rank, world = (groups.group_rank, groups.group_size) if groups else (info.rank, info.world_size)
        loaders[name] = loader(entry.data, entry.batch_size or cfg.batch_size, stream_seed(recipe.seed, name),
                               rank, world, (position or {}).get(name), getattr(task.tasks[name], "tokenizer", None))
    weights = {name: entry.loss_weight for name, entry in recipe.tasks.items()}
    return TaskStreams(loaders, cfg.schedule, weights, recipe.seed)


# --------------------------------------------------------------------------------------------------
# one step


def micro_batches(run: Run, step: int) -> Iterator[tuple[dict, int]]:
    """The step's micro-batches, each with the number it is averaged over: ``train.grad_accum`` of them, and
    with several tasks ``tasks.<name>.grad_accum`` of each task in each. With several tasks and a backend
    that accumulates gradients itself (single, DDP, groups, FSDP2), each task's batch is its own micro-batch:
    its graph is freed by its backward before the next task's forward (the same gradient as one backward of
    the weighted sum, with one task's activations in memory at a time). DeepSpeed counts micro-batches
    itself: there all the step's tasks go through one forward (and tasks accumulate nothing of their own)."""
    accum = run.recipe.train.grad_accum
    for _ in range(accum):
        batch = run.streams.next(step)
        if run.recipe.tasks is None or run.engine.is_deepspeed:
            yield batch, accum
            continue
        for name, task_batch in batch.items():
            own = run.recipe.tasks[name].grad_accum
            yield {name: task_batch}, accum * own
            for _ in range(own - 1):
                yield {name: run.streams.next_of(name)}, accum * own


def _padding_agreements(run: Run) -> int:
    """Under ``groups`` a rank trains one task, and tasks may accumulate different numbers of micro-batches:
    the ranks of the others join that many more finiteness agreements, so every rank runs as many."""
    if run.groups is None or run.recipe.tasks is None:
        return 0
    most = max(e.grad_accum for e in run.recipe.tasks.values())
    return (most - run.recipe.tasks[run.groups.task].grad_accum) * run.recipe.train.grad_accum


def forward_backward(run: Run, step: int) -> tuple[dict[str, torch.Tensor], bool, dict | None]:
    """The step's micro-batches: fetch → forward → NaN/inf guard (all ranks agree) → backward.
    Returns the step's loss terms (averaged over micro-batches), whether it is dropped, and the bad terms."""
    engine = run.engine
    terms: dict[str, torch.Tensor] = {}
    dropped, bad_terms = False, None
    batches = list(micro_batches(run, step))
    for micro, (batch, accum) in enumerate(batches):
        batch = to_device(batch, run.info.device)
        with engine.accumulating(last=micro == len(batches) - 1):
            with engine.autocast():
                out = engine(batch)
            finite = engine.all_true(bool(torch.isfinite(out["loss"]).all()))
            if not finite:
                dropped, bad_terms = True, out
            engine.backward(out["loss"] if finite else None, accum, drop_step=dropped)
        for k, v in out.items():
            terms[k] = terms.get(k, 0.0) + v.detach().float() / accum  # each task's "loss" adds up to the sum
    for _ in range(_padding_agreements(run)):
        dropped = not engine.all_true(True) or dropped
    return terms, dropped, bad_terms


def step_samples(run: Run, step: int) -> dict[str, int]:
    """Samples trained at ``step`` over all ranks, per task ("" for a single-task run)."""
    recipe, world = run.recipe, run.info.world_size
    accum, batch = recipe.train.grad_accum, recipe.train.batch_size
    if recipe.tasks is None:
        return {"": batch * accum * world}
    sizes = run.groups.sizes if run.groups else {name: world for name in recipe.tasks}
    names = run.streams.tasks_at(step) if recipe.train.schedule == "sample" else list(recipe.tasks)
    return {n: (recipe.tasks[n].batch_size or batch) * recipe.tasks[n].grad_accum * accum * sizes[n] for n in names}


# --------------------------------------------------------------------------------------------------
# logging, evaluation, saving


def _reduce_skipped(run: Run) -> dict[str, float]:
    """Bad samples skipped so far, per task, summed over ranks (a fixed-length vector on every rank)."""
    names = list(run.recipe.tasks) if run.recipe.tasks else [""]
    local = run.streams.skipped
    counts = run.engine.all_reduce(torch.tensor([float(local.get(n, 0)) for n in names]))
    return dict(zip(names, counts.tolist()))


def _mean_terms(run: Run, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms averaged over the ranks that computed them."""
    if run.groups is None:  # every rank has the same terms
        values = run.engine.all_reduce(torch.stack([terms[k].reshape(()) for k in terms])) / run.info.world_size
        return {k: v.item() for k, v in zip(terms, values)}
    gathered = gather_objects({k: v.item() for k, v in terms.items() if v.numel() == 1})
    keys = dict.fromkeys(k for g in gathered for k in g)
    return {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys}


def log_step(run: Run, step: int, terms: dict, grad_norm: float | None, samples: dict[str, int], dt: float,
             step_time: float) -> None:
    cfg = run.recipe.train
    metrics = {f"train/{k}": v for k, v in _mean_terms(run, terms).items()}
    metrics.update({
        "train/lr": run.optimizer.param_groups[0]["lr"],
        "train/grad_norm": grad_norm if grad_norm is not None else float("nan"),
        "train/samples_per_s": sum(samples.values()) / dt,
        "train/nonfinite_steps": run.counters["nonfinite_steps"],
    })
    skipped = _reduce_skipped(run)
    metrics["data/skipped"] = int(sum(skipped.values()))
    epochs = run.streams.epoch()
    if run.recipe.tasks is None:
        metrics["data/epoch"] = epochs[""]
    else:
        for name, n in samples.items():
            metrics[f"train/{name}/samples_per_s"] = n / dt
        for name, n in skipped.items():
            metrics[f"data/{name}/skipped"] = int(n)
        metrics.update({f"data/{name}/epoch": e for name, e in epochs.items()})
    metrics = {k: v for k, v in metrics.items() if v is not None}
    for report in run.streams.pop_skip_reports():
        log.warning("skipped sample: %s", report)
    run.tracker.log(step, metrics)
    bar = {"loss": metrics["train/loss"], "lr": metrics["train/lr"]}
    if run.recipe.tasks is not None:
        bar.update({name: metrics[f"train/{name}/loss"] for name in run.recipe.tasks if f"train/{name}/loss" in metrics})
    eta = format_duration(step_time * (cfg.steps - step))
    run.tracker.progress(step, {**bar, "samples/s": sum(samples.values()) / step_time, "eta": eta})


def evaluate(run: Run, step: int) -> dict[str, float]:
    """Each task's evaluations on its ``data.val`` (and on the EMA weights): ``eval/<eval>/<metric>`` for a
    single task, ``eval/<task>/<eval>/<metric>`` for several."""
    recipe, info, cfg = run.recipe, run.info, run.recipe.train
    if run.groups is not None:  # every head current on every rank
        run.groups.broadcast_task_params(run.engine.module)
        if run.ema is not None:
            run.groups.broadcast_task_params(run.ema.module)
    results: dict[str, float] = {}
    module = run.engine.module
    for name, entry in recipe.task_entries.items():
        if not entry.data.val:
            continue
        single = recipe.tasks is None
        task = module if single else module.tasks[name]
        models = {"": task.model}
        if run.ema is not None:
            models["_ema"] = run.ema.module if single else run.ema.module.tasks[name].model
        evals = (cfg.evals if single else entry.evals)
        prefix = "eval/" if single else f"eval/{name}/"
        with preserved_rng():
            for eval_name in evals if evals is not None else task.default_evals:
                for suffix, model in models.items():
                    eval_loader = build_eval_loader(
                        entry.data.val, entry.data, batch_size=entry.batch_size or cfg.batch_size, rank=info.rank,
                        world_size=info.world_size, tokenizer=getattr(task, "tokenizer", None),
                    )
                    out = EVALS[eval_name](model, eval_loader, info.device, run.engine.all_reduce, cfg.eval_batches)
                    results.update({f"{prefix}{eval_name}{suffix}/{k}": v for k, v in out.items()})
    log.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
    return results


def save(run: Run, step: int) -> Path:
    """Write ``checkpoints/step_<step>`` (collective: every rank calls it)."""
    info, engine = run.info, run.engine
    if run.groups is not None:
        run.groups.broadcast_task_params(engine.module)
        if run.ema is not None:
            run.groups.broadcast_task_params(run.ema.module)
        optimizer_state = run.groups.optimizer_state(engine.module, run.optimizer)
    else:
        optimizer_state = run.optimizer.state_dict() if info.backend not in ("deepspeed", "fsdp2") else {}
    state_out = {
        "step": step,
        "optimizer": optimizer_state,
        "scheduler": run.scheduler.state_dict(),
        "rng": gather_objects(rng_state()),
        "data": gather_objects(run.streams.position()),
        "counters": {k: v for k, v in run.counters.items() if k != "samples_this_run"},
        "world_size": info.world_size,
        "backend": info.backend,
        "wandb_id": run.tracker.wandb_id,
    }
    if engine.scaler is not None:
        state_out["scaler"] = engine.scaler.state_dict()
    path = save_checkpoint(
        run.recipe.run_dir / "checkpoints", step, _full_state_dict(engine), state_out, dump_recipe(run.recipe),
        info.is_main, run.recipe.train.keep_last, deepspeed_engine=engine.wrapped if engine.is_deepspeed else None,
        extra_files={"ema.safetensors": run.ema.module.state_dict()} if run.ema is not None else None,
        model_prefix=getattr(engine.module, "model_prefix", "model."),
        sharded_writer=engine.save_sharded if info.backend == "fsdp2" else None,
    )
    log.info("saved %s", path)
    return path


def weights_digest(engine: Engine) -> str:
    """sha256 of this rank's parameters (ZeRO-3 partitions are gathered first) and buffers (BatchNorm
    statistics, counters), to check ranks agree."""
    import hashlib

    if engine.info.backend == "fsdp2":
        return engine.weights_digest()
    h = hashlib.sha256()
    params = list(engine.module.parameters())
    gather = contextlib.nullcontext()
    if engine.is_deepspeed and engine.ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        for p in params:
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    for b in engine.module.buffers():
        h.update(b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _full_state_dict(engine: Engine) -> dict[str, torch.Tensor] | None:
    """The unwrapped task's weights on rank 0; ZeRO-3 gathers its partitions (collective)."""
    if engine.is_deepspeed and engine.ds_config["zero_optimization"]["stage"] == 3:
        return engine.wrapped._zero3_consolidated_16bit_state_dict()
    if engine.info.backend == "fsdp2":
        return engine.full_state_dict()
    return engine.module.state_dict() if engine.info.is_main else None
