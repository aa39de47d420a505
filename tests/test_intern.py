"""INTERN: the pipeline runner (stages in order, init from earlier stages, kill + resume inside a stage,
finished stages untouched), the generalist (frozen experts, zero adapters = the main backbone) and the
distilled student (a plain timm model)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import PYTHON, REPO, TINY_VIT, tiny_recipe, write_recipe
from foundation.cli import main
from foundation.config import RecipeError
from foundation.engine.checkpoint import find_latest, load_model, load_state
from foundation.engine.transfer import source_tensors
from foundation.pipeline import load_pipeline, print_commands
from foundation.train import load_checked, train

VIT_KW = {"img_size": 32, "patch_size": 8, **TINY_VIT["kwargs"]}  # embed 64, depth 2, heads 2


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# the generalist


def _expert_files(tmp_path: Path, base: str, n: int, **kw) -> list[str]:
    paths = []
    for i in range(n):
        torch.manual_seed(100 + i)
        expert = timm.create_model(base, num_classes=0, in_chans=1, **kw)
        paths.append(str(tmp_path / f"expert{i}.safetensors"))
        save_file(expert.state_dict(), paths[-1])
    return paths


@pytest.mark.parametrize("base,kw,stages", [("vit_tiny_patch16_224", {**VIT_KW, "depth": 4}, [0, 2]),
                                            ("resnet10t", {"channels": [16, 32, 64, 128], "stem_width": 16}, [0, 2])])
def test_zero_adapters_give_the_main_backbone(tmp_path, base, kw, stages):
    experts = _expert_files(tmp_path, base, 2, **kw)
    g = timm.create_model("intern_generalist", base=base, experts=experts, adapter_stages=stages, num_classes=5,
                          in_chans=1, **kw).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(g(x), g.main(x))
        # the experts are the files' weights, and the adapters are wired in: a non-zero one changes the output
        assert torch.equal(g.experts[1].state_dict()[next(iter(load_file(experts[1])))],
                           next(iter(load_file(experts[1]).values())))
        # Central_Model's wiring: main stage i takes every expert's fusion stages j <= i (a finer layer1 reaches
        # layer3 through two stride-2 convs), each path linear and zero at start through its last BatchNorm
        assert {i: sorted(g.adapters[i][1]) for i in g.adapters} == {str(i): [str(j) for j in stages if j <= i]
                                                                     for i in stages}
        cross = g.adapters[str(stages[-1])][1][str(stages[0])]
        norms = [m for m in cross.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
        assert not any(isinstance(m, (torch.nn.GELU, torch.nn.ReLU)) for m in list(cross.modules())[-1:])
        torch.nn.init.normal_(norms[-1].weight, std=0.5)
        assert not torch.allclose(g(x), g.main(x))
    g.train()
    assert not any(e.training for e in g.experts) and g.main.training
    assert not any(p.requires_grad for p in g.experts.parameters())


def test_generalist_fusion_stages_and_experts_by_count(tmp_path):
    kw = {**VIT_KW, "depth": 4}
    experts = _expert_files(tmp_path, "vit_tiny_patch16_224", 2, **kw)
    # never the last stage; the default is Central_Model's (every stage but the last; ViT-B: 2, 5, 8)
    with pytest.raises(RecipeError, match="last stage"):
        timm.create_model("intern_generalist", experts=experts, adapter_stages=[1, 3], in_chans=1, **kw)
    g = timm.create_model("intern_generalist", experts=experts, num_classes=5, in_chans=1, **kw)
    assert g.adapter_stages == [0, 1, 2]
    from foundation.models.intern import default_stages

    assert default_stages(12, "vit") == [2, 5, 8] and default_stages(4, "resnet") == [0, 1, 2]
    # a checkpoint names its experts by number: built empty, their weights come from the generalist's state dict
    for p in g.adapters.parameters():
        torch.nn.init.normal_(p, std=0.1)
    rebuilt = timm.create_model("intern_generalist", experts=2, num_classes=5, in_chans=1, **kw)
    rebuilt.load_state_dict(g.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), g.eval()(x), rtol=0, atol=0)
        assert not torch.allclose(g(x), g.main(x))
    with pytest.raises(RecipeError, match="experts"):
        timm.create_model("intern_generalist", experts=0, in_chans=1, **kw)


def test_generalist_refuses_an_expert_of_another_architecture(tmp_path):
    other = _expert_files(tmp_path, "vit_tiny_patch16_224", 1, img_size=32, patch_size=8, embed_dim=32, depth=2,
                          num_heads=2)
    with pytest.raises(Exception, match="does not fit the base architecture"):
        timm.create_model("intern_generalist", base="vit_tiny_patch16_224", experts=other, in_chans=1, **VIT_KW)


# --------------------------------------------------------------------------------------------------
# a three-stage pipeline, killed in stage 2 and resumed


def _pipeline_files(digits: Path, root: Path) -> Path:
    """amateur (two heads on one tiny ViT) -> experts (two single-task runs from it) -> generalist."""
    base = tiny_recipe(digits, root / "unused", "x")
    data, task = base.pop("data"), base.pop("task")
    common = {"logging": {"wandb": "disabled", "progress": False}, "optim": base["optim"],
              "train": {"steps": 4, "batch_size": 16, "log_every": 1, "eval_batches": 1}}
    model = {k: v for k, v in TINY_VIT.items() if k != "num_classes"}
    tasks = {"digits": {"task": task, "data": data, "num_classes": 10},
             "parity": {"task": {"name": "classification"}, "data": data, "num_classes": 10, "batch_size": 8}}
    amateur = {"name": "a", "model": model, "tasks": tasks, **common}
    expert = {"name": "e", "model": TINY_VIT, "task": task, "data": data, **common,
              "train": {**common["train"], "steps": 12, "save_every": 2}}
    generalist = {"name": "g", "model": {**model, "backbone": "intern_generalist",
                                         "kwargs": {**model["kwargs"], "base": "vit_tiny_patch16_224",
                                                    "adapter_stages": [0]}}, "tasks": tasks, **common}
    for name, r in (("amateur", amateur), ("expert", expert), ("generalist", generalist)):
        write_recipe(root / f"{name}.yaml", r)
    pipeline = {
        "name": "tiny", "output_dir": str(root / "runs"),
        "stages": {
            "amateur": {"recipe": str(root / "amateur.yaml")},
            "experts": {"recipe": str(root / "expert.yaml"), "init": {"stage": "amateur"},
                        "experts": {"digits": {}, "slow": {"overrides": ["optim.lr=1e-3"]}}},
            "generalist": {"recipe": str(root / "generalist.yaml"), "experts_from": "experts",
                           "init": {"stage": "amateur", "remap": {"": "main."}, "include": ["main.*"]}},
        },
    }
    return write_recipe(root / "pipeline.yaml", pipeline)


@pytest.fixture(scope="module")
def pipeline_run(digits_shards, tmp_path_factory) -> dict:
    """The pipeline run as a subprocess, killed (its process group, by PID) once stage 2 has a checkpoint,
    then run again to the end."""
    root = tmp_path_factory.mktemp("intern")
    path = _pipeline_files(digits_shards, root)
    runs = root / "runs" / "tiny"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([PYTHON, "-m", "foundation.cli", "pipeline", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    try:
        while find_latest(runs / "experts" / "digits" / "checkpoints") is None:
            assert proc.poll() is None, "the pipeline ended before stage 2 saved a checkpoint"
            assert time.time() < deadline, "stage 2 never saved a checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = find_latest(runs / "experts" / "digits" / "checkpoints")
    amateur = runs / "amateur"
    before = {"ckpt": _sha(find_latest(amateur / "checkpoints") / "model.safetensors"),
              "summary": (amateur / "summary.json").read_text(), "log": (amateur / "train.log").read_text()}
    assert not (runs / "experts" / "digits" / "summary.json").exists()
    result = subprocess.run([PYTHON, "-m", "foundation.cli", "pipeline", str(path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "runs": runs, "path": path, "before": before, "killed_at": killed_at, "stdout": result.stdout}


@pytest.mark.slow
def test_pipeline_runs_every_stage_in_order(pipeline_run):
    runs = pipeline_run["runs"]
    for ref, steps in (("amateur", 4), ("experts/digits", 12), ("experts/slow", 12), ("generalist", 4)):
        summary = json.loads((runs / ref / "summary.json").read_text())
        assert summary["steps"] == steps, ref
    # each stage started from the one its init names (the loaded tensors are reported per run)
    init = json.loads((runs / "experts" / "slow" / "init_report.json").read_text())
    assert init["path"] == str(runs / "amateur") and init["loaded"] and not init["mismatched"]
    g_init = json.loads((runs / "generalist" / "init_report.json").read_text())
    assert all(k.startswith("main.") for k in g_init["loaded"]) and not g_init["missing"]
    # the stage's overrides came after the recipe's, the runner's placement last
    assert yaml.safe_load((runs / "experts" / "slow" / "recipe.yaml").read_text())["optim"]["lr"] == 1e-3
    summary = json.loads((runs / "summary.json").read_text())
    assert [r["stage"] for r in summary["rows"]] == ["amateur", "experts/digits", "experts/slow", "generalist"]
    assert all(r["status"] == "done" for r in summary["rows"])
    assert "| generalist | done | 4 |" in pipeline_run["stdout"]


@pytest.mark.slow
def test_killed_pipeline_resumes_inside_stage_2(pipeline_run):
    runs, before = pipeline_run["runs"], pipeline_run["before"]
    amateur = runs / "amateur"
    assert _sha(find_latest(amateur / "checkpoints") / "model.safetensors") == before["ckpt"]
    assert (amateur / "summary.json").read_text() == before["summary"]
    assert (amateur / "train.log").read_text() == before["log"]  # not run again
    log = (runs / "experts" / "digits" / "train.log").read_text()
    assert f"resumed from {pipeline_run['killed_at']}" in log
    state = json.loads((runs / "pipeline.json").read_text())["runs"]
    assert state["amateur"]["attempts"] == 1 and state["experts/digits"]["attempts"] == 2
    assert state["generalist"]["attempts"] == 1
    # a third run finds everything finished and runs nothing
    out = subprocess.run([PYTHON, "-m", "foundation.cli", "pipeline", str(pipeline_run["path"])], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0
    assert json.loads((runs / "pipeline.json").read_text())["runs"]["generalist"]["attempts"] == 1


@pytest.mark.slow
def test_generalist_experts_stay_frozen(pipeline_run):
    runs = pipeline_run["runs"]
    ckpt = find_latest(runs / "generalist" / "checkpoints")
    weights = load_file(str(ckpt / "model.safetensors"))
    for k, name in enumerate(["digits", "slow"]):
        expert = source_tensors(runs / "experts" / name, "backbone")
        saved = {n[len(f"backbone.experts.{k}."):]: v for n, v in weights.items()
                 if n.startswith(f"backbone.experts.{k}.")}
        assert saved.keys() == {n for n in expert if not n.startswith("head.")}
        assert all(torch.equal(saved[n], expert[n]) for n in saved), name
    # the fusion paths trained (their last BatchNorm left zero); the optimizer holds state for trainable tensors only
    assert any(weights[n].abs().sum() > 0 for n in weights if n.startswith("backbone.adapters.") and n.endswith(".norm.weight"))
    recipe = load_checked(ckpt / "recipe.yaml")
    from foundation.tasks import build_task

    task = build_task(recipe)
    trainable = [p for p in task.parameters() if p.requires_grad]
    frozen = sum(1 for n, p in task.named_parameters() if n.startswith("backbone.experts."))
    assert frozen and all(not p.requires_grad for n, p in task.named_parameters() if n.startswith("backbone.experts."))
    optimizer = load_state(ckpt)["optimizer"]
    assert len(optimizer["state"]) == len(trainable)
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(trainable)


@pytest.mark.slow
def test_generalist_works_after_its_expert_runs_are_gone(pipeline_run, digits_shards, tmp_path):
    """The generalist's run holds its experts (weights in the checkpoint, their number in the recipe): with the
    expert runs moved away, eval and export of the generalist still work and give the same figures."""
    runs = pipeline_run["runs"]
    gen = runs / "generalist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

    def evaluate(out: Path) -> dict:
        res = subprocess.run([PYTHON, "-m", "foundation.cli", "eval", "classification", "--checkpoint", str(gen),
                              "--task", "digits", "--data", str(digits_shards), "--out", str(out)],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(out.read_text())

    before = evaluate(tmp_path / "before.json")
    away = tmp_path / "experts-away"
    (runs / "experts").rename(away)
    try:
        after = evaluate(tmp_path / "after.json")
        assert after == before
        res = subprocess.run([PYTHON, "-m", "foundation.cli", "export", "--checkpoint", str(gen), "--task", "digits",
                              "--format", "timm", "--out", str(tmp_path / "export")],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    finally:
        away.rename(runs / "experts")


@pytest.mark.slow
def test_distilled_student_is_a_plain_timm_model(pipeline_run, digits_shards, tmp_path):
    teacher = pipeline_run["runs"] / "generalist"
    raw = tiny_recipe(digits_shards, tmp_path, "distill", model=TINY_VIT,
                      task={"name": "distill", "distill": {"teacher": str(teacher), "head": "digits", "ce_weight": 0.5}},
                      train={"steps": 3})
    summary = train(load_checked(write_recipe(tmp_path / "d.yaml", raw)))
    ckpt = Path(summary["checkpoint"])
    metrics = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert {"train/feature", "train/kl", "train/ce"} <= set(metrics[0])
    # model.safetensors is the student alone (the teacher is not saved; the projection is a task tensor)
    assert set(load_file(str(ckpt / "task.safetensors"))) == {"proj.weight", "proj.bias"}
    state = load_file(str(ckpt / "model.safetensors"))
    student = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, **VIT_KW)
    student.load_state_dict(state, strict=True)
    model, recipe = load_model(ckpt)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(student.eval()(x), model(x))
    # the exported backbone loads into timm without a classifier, strictly
    assert main(["export", "--checkpoint", str(ckpt), "--format", "timm", "--out", str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    backbone = timm.create_model(config["architecture"], num_classes=0, in_chans=config["in_chans"], **config["kwargs"])
    backbone.load_state_dict({k: v for k, v in load_file(str(tmp_path / "export" / "model.safetensors")).items()
                              if not k.startswith("head.")}, strict=True)
    # the deployment tools take it as any classifier
    val = str(digits_shards / "val-000000.tar")
    assert main(["eval", "robustness", "--checkpoint", str(ckpt), "--data", val, "--max-samples", "16",
                 "--corruptions", "gaussian_noise", "--severities", "1", "--attacks", "none", "--workers", "0",
                 "--out", str(tmp_path / "rob"), "--quiet"]) == 0
    robustness = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    assert robustness["samples"] == 16 and robustness["pipeline_matches_training"] is True
    assert robustness["clean_accuracy"] == pytest.approx(100 * _top1(model, recipe.data, val, 16), abs=1e-6)
    assert main(["quantize", "--checkpoint", str(ckpt), "--data", val, "--method", "rtn", "--wbits", "8",
                 "--abits", "8", "--calib-images", "16", "--val-images", "32", "--out", str(tmp_path / "q")]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "q" / "results.json").read_text())}
    assert rows["rtn"]["eval_images"] == 16  # no --val: scored on the 16 calibration images
    assert rows["fp32"]["top1"] == pytest.approx(_top1(model, recipe.data, val, 16), abs=1e-6)
    assert rows["rtn"]["bits"] == "W8A8" and rows["rtn"]["agreement_fp"] >= 0.8  # W8A8 keeps most predictions


def _top1(model: torch.nn.Module, data, shards: str, n: int) -> float:
    """Top-1 of ``model`` on the first ``n`` samples of ``shards`` through the eval transform of ``data``."""
    from foundation.data.shards import build_eval_loader

    batch = next(iter(build_eval_loader(shards, data, batch_size=n, split="val")))
    with torch.no_grad():
        return (model(batch["image"]).argmax(1) == batch["label"]).float().mean().item()


@pytest.mark.slow
def test_distill_needs_a_teacher_and_matching_classes(pipeline_run, digits_shards, tmp_path):
    raw = tiny_recipe(digits_shards, tmp_path, "d", model={**TINY_VIT, "num_classes": 3},
                      task={"name": "distill", "distill": {"teacher": str(pipeline_run["runs"] / "generalist"),
                                                           "head": "digits"}})
    with pytest.raises(RecipeError, match="model.num_classes: 3, but the teacher's head has 10"):
        train(load_checked(write_recipe(tmp_path / "d.yaml", raw)))
    raw["task"]["distill"]["head"] = "nope"
    with pytest.raises(RecipeError, match="task.distill.head: 'nope'"):
        train(load_checked(write_recipe(tmp_path / "d.yaml", raw)))


# --------------------------------------------------------------------------------------------------
# the pipeline file and printed commands


def test_pipeline_file_errors(tmp_path, digits_shards, capsys):
    good = yaml.safe_load(_pipeline_files(digits_shards, tmp_path).read_text())
    bad = {**good, "stages": {**good["stages"], "experts": {**good["stages"]["experts"], "inti": {}}}}
    with pytest.raises(RecipeError, match=r"stages.experts: invalid stage\n  inti: unknown key \(did you mean 'init'\?\)"):
        load_pipeline(write_recipe(tmp_path / "bad.yaml", bad))
    later = {**good, "stages": {"generalist": good["stages"]["generalist"], "amateur": good["stages"]["amateur"]}}
    with pytest.raises(RecipeError, match="stages.generalist.experts_from: 'experts' is not an earlier training stage; earlier: \\['amateur'\\]"):
        load_pipeline(write_recipe(tmp_path / "later.yaml", later))
    ambiguous = {**good, "stages": {**good["stages"], "generalist": {**good["stages"]["generalist"],
                                                                       "init": {"stage": "experts"}}}}
    with pytest.raises(RecipeError, match="has experts; name one"):
        load_pipeline(write_recipe(tmp_path / "amb.yaml", ambiguous))
    typo = {**good, "stages": {**good["stages"], "amateur": {**good["stages"]["amateur"], "overrides": ["optim.lrr=1"]}}}
    assert main(["pipeline", str(write_recipe(tmp_path / "typo.yaml", typo))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "stages.amateur" in err and "optim.lrr" in err and err.count("\n") == 1
    assert main(["recipes", "check", str(REPO / "recipes" / "intern")]) == 0


def test_print_commands(tmp_path, digits_shards):
    path = _pipeline_files(digits_shards, tmp_path)
    script = print_commands(path)
    lines = [line for line in script.splitlines() if line.startswith("python -m foundation.cli train")]
    assert len(lines) == 4 and all("logging.group=" in line for line in lines)
    assert f'model.init={{"path": "{tmp_path}/runs/tiny/amateur", "part": "backbone"}}' in lines[1]
    assert "model.kwargs.experts=" in lines[3] and f"{tmp_path}/runs/tiny/experts/slow" in lines[3]
    slurm = print_commands(path, launcher="slurm")
    assert "job_generalist=$(sbatch --parsable --dependency=afterok:$job_amateur:$job_experts_digits:$job_experts_slow" \
        in slurm
    assert "launch/slurm.sbatch" in slurm
    result = subprocess.run(["bash", "-n"], input=slurm, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_failing_stage_is_one_error_line(tmp_path, digits_shards, capsys):
    raw = yaml.safe_load(_pipeline_files(digits_shards, tmp_path).read_text())
    recipe = yaml.safe_load((tmp_path / "amateur.yaml").read_text())
    recipe["tasks"]["digits"]["data"]["train"] = str(tmp_path / "no-such-shards")
    write_recipe(tmp_path / "amateur.yaml", recipe)
    assert main(["pipeline", str(write_recipe(tmp_path / "p.yaml", raw))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "error: error" not in err and "no-such-shards" in err and err.count("\n") == 1
    state = json.loads((tmp_path / "runs" / "tiny" / "pipeline.json").read_text())["runs"]
    assert state["amateur"]["status"] == "failed" and "experts/digits" not in state


def test_amateur_text_tower_carries_into_the_captions_expert_and_the_generalist(tmp_path):
    """recipes/intern/tiny_cpu.yaml's inits: the captions expert and the generalist start with the amateur's
    backbone and its captions text tower (part: all), not a text tower from random."""
    from foundation.config import InitConfig, load_recipe
    from foundation.engine.transfer import apply_init
    from foundation.pipeline import load_pipeline
    from foundation.tasks import build_task

    stages = load_pipeline(REPO / "recipes/intern/tiny_cpu.yaml").stages
    counts = ["tasks.fmnist.num_classes=10", "tasks.openclipart.num_classes=11", "tasks.digits.num_classes=10"]
    amateur = build_task(load_recipe(REPO / "recipes/intern/stages/amateur_tiny.yaml", counts))
    source = tmp_path / "amateur.safetensors"
    save_file({k: v.contiguous() for k, v in amateur.state_dict().items()}, str(source))
    src = amateur.state_dict()
    text = [k for k in src if k.startswith("tasks.captions.model.")]
    assert text
    for stage, recipe, extra, to_main in (("experts", "expert_captions_tiny.yaml", [], ""),
                                          ("generalist", "generalist_tiny.yaml", counts + ["model.kwargs.experts=2"], "main.")):
        init = stages[stage].init
        assert init.part == "all"
        task = build_task(load_recipe(REPO / "recipes/intern/stages" / recipe, extra))
        apply_init(task, InitConfig(path=str(source), part=init.part, remap=init.remap, include=init.include,
                                    exclude=init.exclude))
        got = task.state_dict()
        assert all(torch.equal(got[k], src[k]) for k in text), stage
        assert all(torch.equal(got[f"backbone.{to_main}{k[len('backbone.'):]}"], src[k]) for k in src
                   if k.startswith("backbone.")), stage
