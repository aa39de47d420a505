"""THE training loop. Read ``train`` top to bottom:

    set up (process group, task, optimizer, schedule, engine) → resume → data → for each step:
    fetch micro-batches → forward → NaN/inf guard → backward → clip + step → schedule → log → eval → save

It runs a *task* (model + loss → dict with "loss") on one process, under torchrun (DDP) or under
DeepSpeed; ``foundation.engine.distributed.Engine`` holds the backend differences.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from evaluation import EVALS
from foundation.config import OptimConfig, Recipe, RecipeError, dump_recipe, load_recipe, lookup
from foundation.data.shards import build_eval_loader, build_train_loader
from foundation.engine.checkpoint import (
    CheckpointError, find_latest, load_state, load_task_weights, load_weights, read_tensors, rng_state,
    save_checkpoint, set_rng_state,
)
from foundation.engine.distributed import DistInfo, Engine, close_distributed, gather_objects, init_distributed
from foundation.engine.tracking import Tracker, format_duration, setup_logging
from foundation.tasks import TASKS

log = logging.getLogger("foundation")


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.nan_patience`` non-finite steps in a row."""


def build_optimizer(task: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on 1-D parameters (norms, biases, temperatures) and the names the
    model lists in ``no_weight_decay()`` (position embeddings, class tokens)."""
    skip = getattr(task, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(task, cfg.weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


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
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
    problems = []
    for where, registry, name in [("task.name", TASKS, recipe.task.name)] + [
            (f"train.evals.{i}", EVALS, e) for i, e in enumerate(recipe.train.evals or [])]:
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


def _train(recipe: Recipe, info: DistInfo) -> dict:
    cfg = recipe.train
    run_dir, ckpt_root = recipe.run_dir, recipe.run_dir / "checkpoints"
    setup_logging(run_dir, info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))

    # -- task, optimizer, schedule, engine. Same seed on every rank for the initial weights.
    seed_everything(recipe.seed)
    task = TASKS[recipe.task.name].build(recipe.model, recipe.task, recipe.data).to(info.device)
    if cfg.compile:
        task.model.compile()
    optimizer = build_optimizer(task, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.optim, cfg.steps)

    # -- resume: weights and optimizer before wrapping (DDP broadcasts rank 0's weights when wrapping)
    ckpt = resolve_resume(cfg.resume, ckpt_root)
    state = load_state(ckpt) if ckpt else None
    if state is not None and info.backend != "deepspeed":
        load_task_weights(task, ckpt)
        optimizer.load_state_dict(state["optimizer"])
    engine = Engine(task, optimizer, info, recipe.parallel, cfg)
    if state is not None:
        if info.backend == "deepspeed":
            engine.wrapped.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_lr_scheduler_states=False)
        if engine.scaler is not None and "scaler" in state:
            engine.scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
    ema = None
    if cfg.ema_decay:
        if info.backend == "deepspeed" and engine.ds_config["zero_optimization"]["stage"] == 3:
            raise ValueError("train.ema_decay: not available with ZeRO-3 (the weights are partitioned)")
        ema = ModelEmaV3(task.model, decay=cfg.ema_decay)
        if state is not None and (ckpt / "ema.safetensors").is_file():
            load_weights(ema.module, read_tensors(ckpt / "ema.safetensors"))
    start_step = state["step"] if state else 0
    same_world = state is not None and state["world_size"] == info.world_size
    if state is not None and not same_world:
        log.warning("resuming %d ranks from a %d-rank checkpoint: data streams and RNG restart from the seed",
                    info.world_size, state["world_size"])
    counters = dict(state["counters"]) if state else {"nonfinite_steps": 0, "samples": 0}

    # -- data. Starting workers must not disturb the RNG that the resumed state restores below.
    with preserved_rng():
        loader = build_train_loader(
            recipe.data, batch_size=cfg.batch_size, seed=recipe.seed, rank=info.rank,
            world_size=info.world_size, position=state["data"][info.rank] if same_world else None,
            tokenizer=getattr(task, "tokenizer", None),
        )
        batches = iter(loader)
    if same_world:
        set_rng_state(state["rng"][info.rank])
    else:
        seed_everything(recipe.seed + 1000 * info.rank + start_step)  # per-rank streams: dropout, mixup

    tracker = Tracker.create(
        run_dir, info.is_main, recipe.model_dump(mode="json"), wandb_mode=recipe.logging.wandb,
        project=recipe.logging.project, entity=recipe.logging.entity, tags=recipe.logging.tags, name=recipe.name,
        wandb_id=state.get("wandb_id") if state else None, total_steps=cfg.steps, start_step=start_step,
        progress=recipe.logging.progress,
    )
    if ckpt:
        log.info("resumed from %s at step %d", ckpt, start_step)
    samples_per_step = cfg.batch_size * cfg.grad_accum * info.world_size
    log.info("%s: %s on %s, %d rank(s) [%s], %d steps x %d samples, precision %s", recipe.name,
             recipe.model.backbone, info.device, info.world_size, info.backend, cfg.steps, samples_per_step,
             cfg.precision)

    def evaluate(step: int) -> dict[str, float]:
        results: dict[str, float] = {}
        if not recipe.data.val:
            return results
        models = {"": engine.module.model, "_ema": ema.module if ema is not None else None}
        with preserved_rng():
            for name in cfg.evals if cfg.evals is not None else task.default_evals:
                for suffix, model in models.items():
                    if model is None:
                        continue
                    eval_loader = build_eval_loader(
                        recipe.data.val, recipe.data, batch_size=cfg.batch_size, rank=info.rank,
                        world_size=info.world_size, tokenizer=getattr(task, "tokenizer", None),
                    )
                    out = EVALS[name](model, eval_loader, info.device, engine.all_reduce, cfg.eval_batches)
                    results.update({f"eval/{name}{suffix}/{k}": v for k, v in out.items()})
        log.info("step %d eval: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results

    def save(step: int) -> Path:
        state_out = {
            "step": step,
            "optimizer": optimizer.state_dict() if info.backend != "deepspeed" else {},
            "scheduler": scheduler.state_dict(),
            "rng": gather_objects(rng_state()),
            "data": gather_objects(loader.position()),
            "counters": dict(counters),
            "world_size": info.world_size,
            "backend": info.backend,
            "wandb_id": tracker.wandb_id,
        }
        if engine.scaler is not None:
            state_out["scaler"] = engine.scaler.state_dict()
        weights = _full_state_dict(engine)
        path = save_checkpoint(
            ckpt_root, step, weights, state_out, dump_recipe(recipe), info.is_main, cfg.keep_last,
            deepspeed_engine=engine.wrapped if info.backend == "deepspeed" else None,
            extra_files={"ema.safetensors": ema.module.state_dict()} if ema is not None else None,
        )
        log.info("saved %s", path)
        return path

    # -- the loop
    task.train()
    nonfinite_run, eval_results, last_ckpt = 0, {}, ckpt
    t_start, steps_done, step_time = time.perf_counter(), 0, None
    for step in range(start_step + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        scheduler.step_update(step - 1)  # lr of this step
        terms: dict[str, torch.Tensor] = {}
        dropped, bad_terms = False, None
        for micro in range(cfg.grad_accum):
            batch = to_device(next(batches), info.device)
            with engine.accumulating(last=micro == cfg.grad_accum - 1):
                with engine.autocast():
                    out = engine(batch)
                finite = engine.all_true(bool(torch.isfinite(out["loss"]).all()))
                if not finite:
                    dropped, bad_terms = True, out
                engine.backward(out["loss"] if finite else None, cfg.grad_accum, drop_step=dropped)
            for k, v in out.items():
                terms[k] = terms.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        grad_norm = engine.step(cfg.clip_grad, skip=dropped)
        if ema is not None and grad_norm is not None:
            ema.update(engine.module.model, step=step)

        # -- NaN/inf guard: skipped steps are counted; too many in a row stop the run
        if dropped or grad_norm is None:
            counters["nonfinite_steps"] += 1
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
        counters["samples"] += samples_per_step
        steps_done += 1

        # -- speed, log, eval, save
        dt = time.perf_counter() - t0
        step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
        if step % cfg.log_every == 0 or step == cfg.steps or step == start_step + 1:
            values = engine.all_reduce(torch.stack([terms[k].reshape(()) for k in terms])) / info.world_size
            metrics = {f"train/{k}": v.item() for k, v in zip(terms, values)}
            metrics.update({
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/grad_norm": grad_norm if grad_norm is not None else float("nan"),
                "train/samples_per_s": samples_per_step / dt,
                "train/nonfinite_steps": counters["nonfinite_steps"],
                "data/skipped": int(engine.all_reduce(torch.tensor([float(loader.skipped)])).item()),
                "data/epoch": loader.epoch(),
            })
            metrics = {k: v for k, v in metrics.items() if v is not None}
            for report in loader.pop_skip_reports():
                log.warning("skipped sample: %s", report)
            tracker.log(step, metrics)
            eta = format_duration(step_time * (cfg.steps - step))
            tracker.progress(step, {"loss": metrics["train/loss"], "lr": metrics["train/lr"],
                                    "samples/s": samples_per_step / step_time, "eta": eta})
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            eval_results = evaluate(step)
            if eval_results:
                tracker.log(step, eval_results)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            last_ckpt = save(step)

    elapsed = time.perf_counter() - t_start
    digest = weights_digest(engine)
    digests = gather_objects(digest)
    if len(set(digests)) > 1:
        log.error("ranks disagree on the final weights: %s", digests)
    summary = {
        "steps": cfg.steps,
        "steps_this_run": steps_done,
        "wall_time_s": round(elapsed, 2),
        "samples_per_s": round(samples_per_step * steps_done / elapsed, 2) if steps_done else 0.0,
        "nonfinite_steps": counters["nonfinite_steps"],
        "data_skipped": int(engine.all_reduce(torch.tensor([float(loader.skipped)])).item()),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "run_dir": str(run_dir),
        "weights_sha256": digest,
        "ranks_agree": len(set(digests)) == 1,
        **eval_results,
    }
    tracker.summary(summary)
    tracker.close()
    log.info("done: %s", ", ".join(f"{k}={v}" for k, v in summary.items()))
    return summary


def weights_digest(engine: Engine) -> str:
    """sha256 of this rank's parameters (ZeRO-3 partitions are gathered first), to check ranks agree."""
    import hashlib

    h = hashlib.sha256()
    params = list(engine.module.parameters())
    gather = contextlib.nullcontext()
    if engine.is_deepspeed and engine.ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        for p in params:
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _full_state_dict(engine: Engine) -> dict[str, torch.Tensor] | None:
    """The unwrapped task's weights on rank 0; ZeRO-3 gathers its partitions (collective)."""
    if engine.is_deepspeed and engine.ds_config["zero_optimization"]["stage"] == 3:
        return engine.wrapped._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if engine.info.is_main else None
