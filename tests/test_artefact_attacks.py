"""Every command that reads an artefact, run against crafted artefacts under a Python audit hook.

Each case copies a tiny trained checkpoint (or writes an export / quantized model folder), plants one
attack the way someone sharing it could, and runs the ``foundation`` command in a subprocess under
``tests/audited_cli.py``: process creation, network connections, unpickling, compiling or executing code
from the artefact and opening files outside the artefact, ``--data``, ``--out`` and the installed packages
are blocked and recorded. The command must refuse with exit code 2 and one ``error:`` line, and nothing may
be recorded. The corpus covers every path reproduced in issue 22, by kind of attack: a hub model name, a
file-loading model argument, a hub or outside Hugging Face directory, a pretrained download flag, an
include of another file, a pickle, a command or URL as data, and a crafted quantized architecture.

The subprocess cases train a checkpoint and start an interpreter each (slow tier). The fast tier checks that
the hook blocks and records each kind of violation, and runs the cheapest attacks in this process under the
same hook (``audited_cli.audited``) against a checkpoint directory written without training.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PYTHON, REPO, tiny_recipe

from audited_cli import audited

from foundation.cli import main
from foundation.config import dump_recipe, validate
from foundation.train import train

DRIVER = REPO / "tests" / "audited_cli.py"
MARKER = "PWNED-by-artefact"


class _Payload:
    """Unpickling this creates the marker file: the proof that a load executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# matplotlib's config and font cache for the audited commands (reports draw plots), built by the test once:
# building it runs `fc-list` and writes under ~/.cache, which an audited command may not
MPLCONFIG = REPO / ".cache" / "mplconfig-audit"


@pytest.fixture(scope="module")
def world(digits_shards, tmp_path_factory) -> dict:
    """A trained tiny classifier, an image, a secret file outside every root, and a file-loading pickle."""
    root = tmp_path_factory.mktemp("attacks")
    summary = train(validate(tiny_recipe(digits_shards, root / "runs", name="victim",
                                         train={"steps": 2, "log_every": 1, "save_every": 2})))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.yaml").write_text("model: {backbone: resnet10t}\n")
    from PIL import Image

    images = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (120, 80, 40)).save(images / "person.png")
    MPLCONFIG.mkdir(parents=True, exist_ok=True)
    subprocess.run([PYTHON, "-c", "import matplotlib.font_manager"], env={**os.environ, "MPLCONFIGDIR": str(MPLCONFIG)},
                   check=True, timeout=300)
    return {"ckpt": Path(summary["checkpoint"]), "run": Path(summary["run_dir"]), "outside": outside,
            "images": images, "data": digits_shards}


def _run(argv: list[str], roots: list[Path], tmp: Path, cwd: Path | None = None,
         spawn: list[list[str]] | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    report = tmp / "audit.log"
    site_dir = tmp / "site"  # children of the pipeline install the same hook
    site_dir.mkdir(exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\nimport audited_cli\naudited_cli.from_env()\n")
    roots = [*roots, MPLCONFIG]
    config = {"roots": [str(r) for r in roots], "marker": MARKER, "report": str(report), "spawn": spawn or []}
    env = {**os.environ, "AUDIT_CONFIG": json.dumps(config), "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(MPLCONFIG),
           "PYTHONPATH": os.pathsep.join([str(site_dir), str(REPO)])}
    env.pop("AUDIT_CHILDREN", None)
    proc = subprocess.run([PYTHON, str(DRIVER), *argv], cwd=cwd or tmp, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc, report.read_text().splitlines() if report.is_file() else []


def _refused(proc: subprocess.CompletedProcess, violations: list[str], *needles: str) -> None:
    err = proc.stderr.strip().splitlines()
    assert not violations, violations
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(err) == 1 and err[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def _checkpoint(world: dict, tmp: Path, edit=None, name: str = "step_2") -> Path:
    ckpt = tmp / "shared" / name
    shutil.copytree(world["ckpt"], ckpt)
    if edit is not None:
        recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
        edit(recipe, ckpt)
        (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return ckpt


def _evil_pickle(where: Path, marker: Path) -> Path:
    where.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    return where


# --------------------------------------------------------------------------------------------------
# the crafted checkpoints (recipe edits) and the commands that read them


def hub_backbone(r, ckpt):
    r["model"]["backbone"] = "hf-hub:timm/resnet18.a1_in1k"


def file_kwarg(r, ckpt):
    r["model"]["kwargs"]["checkpoint_path"] = str(_evil_pickle(ckpt / "evil.pth", ckpt / MARKER))


def overlay_kwarg(r, ckpt):
    r["model"]["kwargs"]["pretrained_cfg_overlay"] = {"file": str(_evil_pickle(ckpt / "evil.pth", ckpt / MARKER))}


def base_include(r, ckpt):
    r["base"] = str(Path(os.environ["ATTACK_OUTSIDE"]) / "secret.yaml")


def hf_text_tower(r, ckpt):
    r["model"]["dual_encoder"]["text"]["hf_model"] = "bert-base-uncased"


def open_clip_hub_tower(r, ckpt):
    r["model"]["dual_encoder"]["vision_open_clip"] = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def generalist_hub_base(r, ckpt):
    r["model"]["backbone"] = "intern_generalist"
    r["model"]["kwargs"] = {"base": "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "experts": []}


def generalist_outside_experts(r, ckpt):
    r["model"]["backbone"] = "intern_generalist"
    r["model"]["kwargs"] = {"base": "vit_tiny_patch16_224", "experts": ["../../../outside-expert"]}


def hf_text_tower_outside(r, ckpt):
    r["model"]["dual_encoder"]["text"]["hf_tokenizer"] = os.environ["ATTACK_OUTSIDE"]  # an existing directory


def impossible_size(r, ckpt):
    r["model"]["kwargs"]["stem_width"] = -4  # plain data the gate lets through; the model cannot take it


def pipe_data(r, ckpt):
    r["data"]["val"] = f"pipe:touch {ckpt / MARKER}; cat /dev/null"


def url_data(r, ckpt):
    r["data"]["val"] = "https://example.invalid/val-{000000..000009}.tar"


DATA = "{data}"
CHECKPOINT_CASES = {
    "eval-classification/hub-backbone": (hub_backbone, ["eval", "classification", "--data", DATA], "model.backbone"),
    "eval-classification/timm-checkpoint_path": (file_kwarg, ["eval", "classification", "--data", DATA],
                                                 "checkpoint_path"),
    "eval-zeroshot/base-include": (base_include, ["eval", "zeroshot", "--data", DATA], "includes no other file"),
    "eval-retrieval/hf-text-tower-id": (hf_text_tower, ["eval", "retrieval", "--data", DATA], "hf_model"),
    "eval-robustness/pipe-data": (pipe_data, ["eval", "robustness", "--corruptions", "none", "--attacks", "none",
                                              "--max-samples", "4", "--quiet"], "data.val"),
    "eval-sysnoise/url-data": (url_data, ["eval", "sysnoise", "--max-samples", "4", "--quiet"], "data.val"),
    "eval-unihcp_pose/generalist-hub-base": (generalist_hub_base, ["eval", "unihcp_pose", "--data", DATA],
                                             "kwargs.base"),
    "eval-unihcp_reid/open-clip-hub-tower": (open_clip_hub_tower, ["eval", "unihcp_reid", "--data", DATA],
                                             "vision_open_clip"),
    "export/generalist-hub-base": (generalist_hub_base, ["export", "--format", "timm", "--out", "{out}"],
                                   "kwargs.base"),
    # the expert paths are never opened (they only count the experts, whose weights the checkpoint must hold)
    "export/generalist-outside-experts": (generalist_outside_experts, ["export", "--format", "timm", "--out", "{out}"],
                                          "does not match the model"),
    "quantize/timm-pretrained_cfg_overlay": (overlay_kwarg, ["quantize", "--data", DATA, "--method", "rtn",
                                                             "--out", "{out}"], "pretrained_cfg_overlay"),
    "quantize/generalist-hub-base": (generalist_hub_base, ["quantize", "--data", DATA, "--method", "rtn",
                                                           "--out", "{out}"], "kwargs.base"),
    "adapt/generalist-hub-base": (generalist_hub_base, ["adapt", "--data", DATA, "--shots", "1", "--method", "knn",
                                                        "--out", "{out}", "--cache", "{out}/cache", "--workers", "0"],
                                  "kwargs.base"),
    "quantize/base-include": (base_include, ["quantize", "--data", DATA, "--out", "{out}"], "includes no other file"),
    "predict/hub-backbone": (hub_backbone, ["predict", "--image", "{image}", "--out", "{out}"], "model.backbone"),
    "export-unihcp_scene/hub-backbone": (hub_backbone, ["export", "--format", "unihcp_scene", "--out", "{out}"],
                                         "model.backbone"),
    "adapt/base-include": (base_include, ["adapt", "--data", DATA, "--shots", "1", "--method", "knn",
                                          "--out", "{out}", "--cache", "{out}/cache", "--workers", "0"],
                           "includes no other file"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_crafted_checkpoint_is_refused_without_side_effects(world, tmp_path, monkeypatch, case):
    edit, args, needle = CHECKPOINT_CASES[case]
    monkeypatch.setenv("ATTACK_OUTSIDE", str(world["outside"]))
    ckpt = _checkpoint(world, tmp_path, edit)
    out = tmp_path / "out"
    fill = {"data": str(world["data"]), "out": str(out), "image": str(world["images"] / "person.png")}
    argv = [a.format(**fill) for a in args]
    at = 2 if argv[0] == "eval" else 1  # after the (sub)command
    argv[at:at] = ["--checkpoint", str(ckpt)]
    proc, violations = _run(argv, [ckpt, world["data"], out, world["images"]], tmp_path)
    _refused(proc, violations, needle)
    assert not (ckpt / MARKER).exists()


# --------------------------------------------------------------------------------------------------
# exports, quantized models, reports


def _timm_export(world: dict, tmp: Path, **edit) -> Path:
    export = tmp / "export"
    export.mkdir()
    shutil.copy(world["ckpt"] / "model.safetensors", export / "model.safetensors")
    config = {"architecture": "resnet10t", "num_classes": 10, "in_chans": 1,
              "kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16},
              "pretrained_cfg": {"input_size": [1, 32, 32], "mean": [0.5], "std": [0.5], "interpolation": "bilinear",
                                 "crop_pct": 1.0}}
    for key, value in edit.items():
        config[key] = value(export) if callable(value) else value
    (export / "config.json").write_text(json.dumps(config))
    return export


def _open_clip_export(tmp: Path, text: dict | None = None, vision: dict | None = None, pickled: bool = False) -> Path:
    export = tmp / "export"
    export.mkdir()
    if pickled:  # open_clip's own format: a pickle, which adapt never reads
        _evil_pickle(export / "open_clip_pytorch_model.bin", export / MARKER)
    else:
        (export / "open_clip_model.safetensors").write_bytes(b"")  # never read: the model is refused first
    model_cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, **(vision or {})},
                 "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1, **(text or {})}}
    (export / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {"size": 32}}))
    return export


EXPORT_CASES = {
    "timm-kwargs-checkpoint_path": (lambda w, t: _timm_export(w, t, kwargs=lambda e: {
        "checkpoint_path": str(_evil_pickle(e / "evil.pth", e / MARKER))}), "checkpoint_path"),
    "timm-hub-architecture": (lambda w, t: _timm_export(w, t, architecture="hf-hub:timm/resnet18.a1_in1k"),
                              "architecture"),
    "timm-hub-pretrained_cfg": (lambda w, t: _timm_export(w, t, pretrained_cfg={"hf_hub_id": "timm/resnet18.a1_in1k"}),
                                "hf_hub_id"),
    "open_clip-hf_model_name-hub": (lambda w, t: _open_clip_export(t, text={"hf_model_name": "bert-base-uncased"}),
                                    "hf_model_name"),
    "open_clip-hf_model_pretrained": (lambda w, t: _open_clip_export(t, text={"hf_model_pretrained": True}),
                                      "hf_model_pretrained"),
    "open_clip-timm_model_pretrained": (lambda w, t: _open_clip_export(t, vision={
        "timm_model_name": "resnet10t", "timm_model_pretrained": True}), "timm_model_pretrained"),
    "open_clip-hf_tokenizer-outside": (lambda w, t: _open_clip_export(t, text={
        "hf_tokenizer_name": str(w["outside"])}), "hf_tokenizer_name"),
    "open_clip-pickled-weights": (lambda w, t: _open_clip_export(t, pickled=True), "open_clip_model.safetensors"),
    # plain sizes the gate lets through, which open_clip cannot build (3 heads do not divide a width of 32)
    "open_clip-impossible-size": (lambda w, t: _open_clip_export(t, text={"heads": 3}), "does not build"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_crafted_export_is_refused_by_adapt(world, tmp_path, case):
    make, needle = EXPORT_CASES[case]
    export = make(world, tmp_path)
    out = tmp_path / "out"
    proc, violations = _run(["adapt", "--checkpoint", str(export), "--data", str(world["data"]), "--shots", "1",
                             "--method", "knn", "--out", str(out), "--cache", str(out / "cache"), "--workers", "0"],
                            [export, world["data"], out], tmp_path)
    _refused(proc, violations, needle)
    assert not (export / MARKER).exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", [{"source": "timm", "name": "hf-hub:timm/resnet18.a1_in1k"},
                                  {"source": "timm", "name": "resnet10t", "kwargs": {"checkpoint_path": "/x.pth"}},
                                  {"source": "recipe", "model": {"backbone": "local-dir:/tmp/x"}, "in_chans": 1}],
                         ids=["hub-name", "checkpoint_path", "local-dir"])
def test_crafted_quant_json_is_refused(world, tmp_path, arch):
    qdir = tmp_path / "quant"
    qdir.mkdir()
    shutil.copy(world["ckpt"] / "model.safetensors", qdir / "model.safetensors")
    (qdir / "quant.json").write_text(json.dumps({"format": 1, "arch": arch, "folded_bn": [], "sites": []}))
    ckpt = _checkpoint(world, tmp_path)
    out = tmp_path / "out"
    proc, violations = _run(["eval", "sysnoise", "--checkpoint", str(ckpt), "--data", str(world["data"]),
                             "--int8", str(qdir), "--axes", "precision", "--max-samples", "4", "--quiet",
                             "--out", str(out)], [ckpt, qdir, world["data"], out], tmp_path)
    _refused(proc, violations, "arch")


@pytest.mark.slow
def test_report_on_a_crafted_run_reads_only_the_run(world, tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"checkpoint": str(world["outside"] / "secret.yaml"), "steps": 2}))
    (run / "eval" / "classification.json").write_text("{not json")
    proc, violations = _run(["report", str(run)], [run], tmp_path)
    _refused(proc, violations, "classification.json")


# --------------------------------------------------------------------------------------------------
# training from an artefact: model.init, resume, a distillation teacher, a pipeline stage


def _user_recipe(world: dict, tmp: Path, **sections) -> Path:
    sections["train"] = {"steps": 2, "log_every": 1, **sections.get("train", {})}
    recipe = tiny_recipe(world["data"], tmp / "runs", name="mine", **sections)
    path = tmp / "mine.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_model_init_from_a_crafted_run_is_refused(world, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTACK_OUTSIDE", str(world["outside"]))
    ckpt = _checkpoint(world, tmp_path, base_include)
    recipe = _user_recipe(world, tmp_path, model={**tiny_recipe(world["data"], tmp_path)["model"],
                                                  "init": {"path": str(ckpt)}})
    proc, violations = _run(["train", str(recipe)], [ckpt, world["data"], tmp_path / "runs", recipe], tmp_path)
    _refused(proc, violations, "includes no other file")


@pytest.mark.slow
def test_model_init_from_a_pickle_is_refused(world, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    evil = _evil_pickle(shared / "weights.pth", shared / MARKER)
    recipe = _user_recipe(world, tmp_path, model={**tiny_recipe(world["data"], tmp_path)["model"],
                                                  "init": {"path": str(evil)}})
    proc, violations = _run(["train", str(recipe)], [shared, world["data"], tmp_path / "runs", recipe], tmp_path)
    _refused(proc, violations, "pickled code")
    assert not (shared / MARKER).exists()


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["pickled-state", "recipe-base"])
def test_resume_from_a_crafted_checkpoint_is_refused(world, tmp_path, monkeypatch, attack):
    monkeypatch.setenv("ATTACK_OUTSIDE", str(world["outside"]))
    runs = tmp_path / "runs"
    ckpt = runs / "mine" / "checkpoints" / "step_2"
    shutil.copytree(world["ckpt"], ckpt)
    if attack == "pickled-state":
        _evil_pickle(ckpt / "state.pt", ckpt / MARKER)
        needle = "pickled code"
    else:
        recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
        base_include(recipe, ckpt)
        (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        needle = "includes no other file"
    recipe = _user_recipe(world, tmp_path, train={"steps": 4, "log_every": 1, "resume": "auto"})
    proc, violations = _run(["train", str(recipe)], [world["data"], runs, recipe], tmp_path)
    _refused(proc, violations, needle)
    assert not (ckpt / MARKER).exists()


@pytest.mark.slow
def test_distillation_teacher_from_a_crafted_run_is_refused(world, tmp_path):
    ckpt = _checkpoint(world, tmp_path, hub_backbone)
    recipe = _user_recipe(world, tmp_path, task={"name": "distill", "distill": {"teacher": str(ckpt)}})
    proc, violations = _run(["train", str(recipe)], [ckpt, world["data"], tmp_path / "runs", recipe], tmp_path)
    _refused(proc, violations, "model.backbone")


@pytest.mark.slow
def test_pipeline_stage_from_a_crafted_run_is_refused(world, tmp_path):
    """The pipeline starts its own ``python -m foundation.cli train`` (allowed); that child runs under the same
    hook, reads the crafted run as its ``model.init`` and refuses it; the pipeline reports the one line."""
    ckpt = _checkpoint(world, tmp_path, hub_backbone)
    stage = tiny_recipe(world["data"], tmp_path / "runs", name="stage", train={"steps": 2, "log_every": 1})
    stage["model"]["init"] = {"path": str(ckpt)}
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(stage))
    pipeline = {"name": "p", "output_dir": str(tmp_path / "runs"),
                "stages": {"only": {"recipe": str(tmp_path / "stage.yaml")}}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    proc, violations = _run(["pipeline", str(tmp_path / "pipeline.yaml")],
                            [ckpt, world["data"], tmp_path / "runs", tmp_path / "stage.yaml", tmp_path / "pipeline.yaml"],
                            tmp_path, spawn=[[PYTHON, "-m", "foundation.cli", "train"], [sys.executable, "-m",
                                                                                         "foundation.cli", "train"]])
    _refused(proc, violations, "model.backbone")


# --------------------------------------------------------------------------------------------------
# a legitimate artefact under the same hook: the harness allows what real work needs


@pytest.mark.slow
def test_a_moved_bare_checkpoint_evaluates_and_writes_only_inside_itself(world, tmp_path):
    """A step directory whose recipe names an output_dir elsewhere: robustness runs, and its report lands in
    the step directory (never the recipe's output_dir), with nothing opened outside."""
    ckpt = _checkpoint(world, tmp_path, lambda r, c: r.update(output_dir=str(world["outside"] / "runs")))
    proc, violations = _run(["eval", "robustness", "--checkpoint", str(ckpt), "--data", str(world["data"]),
                             "--corruptions", "gaussian_noise", "--severities", "1", "--attacks", "none",
                             "--max-samples", "8", "--quiet"], [ckpt, world["data"]], tmp_path)
    assert not violations, violations
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ckpt / "eval" / "robustness" / "robustness.json").is_file()
    assert not (world["outside"] / "runs").exists()


@pytest.mark.slow
def test_the_hook_catches_what_it_is_meant_to(world, tmp_path):
    """The harness can fail: a file opened outside the roots (here the user's own model.init file, left out of
    the roots on purpose) is recorded and blocked."""
    secret = world["outside"] / "secret.yaml"
    recipe = _user_recipe(world, tmp_path)
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["init"] = {"path": str(secret)}  # a legitimate user choice: the user's own file, outside the roots
    recipe.write_text(yaml.safe_dump(raw))
    proc, violations = _run(["train", str(recipe)], [world["data"], tmp_path / "runs", recipe], tmp_path)
    assert any(str(secret) in v and v.split(": ", 1)[1].startswith("open") for v in violations), violations
    assert proc.returncode != 0


# --------------------------------------------------------------------------------------------------
# fast tier: the hook itself, then the cheapest attacks in this process under the same hook


def test_the_hook_blocks_and_records_each_kind_of_violation(tmp_path):
    """Planted violations of every kind are blocked (PermissionError) and recorded; work inside the roots is not."""
    import socket

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")
    (root / "code.py").write_text("x = 1\n")
    payload = pickle.dumps(_Payload(root / MARKER))
    attempts = {
        "open outside": lambda: open(outside / "secret").read(),
        "process": lambda: subprocess.run(["true"]),
        "os.system": lambda: os.system("true"),
        "socket.connect": lambda: socket.socket().connect(("127.0.0.1", 9)),
        "unpickling": lambda: pickle.loads(payload),
        "compile of the artefact's source": lambda: compile(f"# {MARKER}\nx = 1", "<string>", "exec"),
        "exec of a file inside the artefact": lambda: exec(compile((root / "code.py").read_text(), str(root / "code.py"),
                                                                   "exec"), {}),
    }
    with audited([root], marker=MARKER) as violations:
        (root / "ok.txt").write_text("inside the roots is allowed")
        blocked = []
        for name, attempt in attempts.items():
            try:
                attempt()
            except PermissionError:
                blocked.append(name)
    assert blocked == list(attempts), blocked
    assert len(violations) == len(attempts), violations
    assert not (root / MARKER).exists()
    assert open(outside / "secret").read() == "s"  # and the hook is idle after the block


@pytest.fixture(scope="module")
def fake_step(digits_shards, tmp_path_factory) -> Path:
    """A checkpoint directory of an untrained tiny classifier, written without training (recipe + weights)."""
    from safetensors.torch import save_file

    from foundation.tasks import build_task

    step = tmp_path_factory.mktemp("fake") / "step_0"
    step.mkdir()
    recipe = validate(tiny_recipe(digits_shards, step.parent / "runs", name="victim"))
    task = build_task(recipe)
    save_file({k: v.contiguous() for k, v in task.model.state_dict().items()}, str(step / "model.safetensors"))
    (step / "recipe.yaml").write_text(dump_recipe(recipe))  # resolved, as training writes it
    return step


def _hub_backbone_only(r, ckpt):
    r["model"] = {"backbone": "hf-hub:timm/resnet18.a1_in1k", "num_classes": 10}


FAST_CASES = {
    "eval-classification/hub-backbone": (_hub_backbone_only, ["eval", "classification", "--data", DATA],
                                         "model.backbone"),
    "eval-classification/timm-checkpoint_path": (file_kwarg, ["eval", "classification", "--data", DATA],
                                                 "checkpoint_path"),
    "eval-classification/impossible-size": (impossible_size, ["eval", "classification", "--data", DATA],
                                            "does not build"),
    "eval-retrieval/hf-text-tower-id": (hf_text_tower, ["eval", "retrieval", "--data", DATA], "hf_model"),
    "eval-zeroshot/hf-text-tower-outside-dir": (hf_text_tower_outside, ["eval", "zeroshot", "--data", DATA],
                                                "lies outside"),
    "export/generalist-hub-base": (generalist_hub_base, ["export", "--format", "timm", "--out", "{out}"],
                                   "kwargs.base"),
    "predict/impossible-size": (impossible_size, ["predict", "--image", "{image}", "--out", "{out}"],
                                "does not build"),
    "predict/base-include": (base_include, ["predict", "--image", "{image}", "--out", "{out}"], "includes no other file"),
    "quantize/timm-pretrained_cfg_overlay": (overlay_kwarg, ["quantize", "--data", DATA, "--method", "rtn",
                                                             "--out", "{out}"], "pretrained_cfg_overlay"),
}


@pytest.mark.parametrize("case", sorted(FAST_CASES))
def test_crafted_checkpoint_in_process(fake_step, digits_shards, tmp_path, monkeypatch, capsys, case):
    edit, args, needle = FAST_CASES[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.yaml").write_text("model: {backbone: resnet10t}\n")
    monkeypatch.setenv("ATTACK_OUTSIDE", str(outside))
    ckpt = tmp_path / "shared" / "step_0"
    shutil.copytree(fake_step, ckpt)
    recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    edit(recipe, ckpt)
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 80, 40)).save(tmp_path / "person.png")
    out = tmp_path / "out"
    argv = [a.format(data=digits_shards, out=out, image=tmp_path / "person.png") for a in args]
    at = 2 if argv[0] == "eval" else 1
    argv[at:at] = ["--checkpoint", str(ckpt)]
    monkeypatch.chdir(tmp_path)
    with audited([ckpt, digits_shards, out, tmp_path / "person.png"], marker=MARKER) as violations:
        code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert not violations, violations
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0], (needle, err[0])
    assert not (ckpt / MARKER).exists()


FAST_EXPORT_CASES = {k: EXPORT_CASES[k] for k in ("timm-kwargs-checkpoint_path", "timm-hub-architecture",
                                                  "open_clip-hf_model_name-hub", "open_clip-timm_model_pretrained",
                                                  "open_clip-pickled-weights", "open_clip-impossible-size")}


@pytest.mark.parametrize("case", sorted(FAST_EXPORT_CASES))
def test_crafted_export_in_process(fake_step, digits_shards, tmp_path, capsys, case):
    make, needle = FAST_EXPORT_CASES[case]
    export = make({"ckpt": fake_step}, tmp_path)
    out = tmp_path / "out"
    with audited([export, digits_shards, out], marker=MARKER) as violations:
        code = main(["adapt", "--checkpoint", str(export), "--data", str(digits_shards), "--shots", "1",
                     "--method", "knn", "--out", str(out), "--cache", str(out / "cache"), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not violations, violations
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (export / MARKER).exists()


def test_a_legitimate_checkpoint_evaluates_under_the_hook(fake_step, digits_shards, tmp_path, monkeypatch, capsys):
    """The control: the in-process hook lets real work through (so the refusals above are the gate's)."""
    monkeypatch.chdir(tmp_path)
    with audited([fake_step, digits_shards], marker=MARKER) as violations:
        code = main(["eval", "classification", "--checkpoint", str(fake_step), "--data", str(digits_shards)])
    assert not violations, violations
    assert code == 0, capsys.readouterr().err[-2000:]


# a quantized model's quant.json beyond its architecture: module names and sizes that do not rebuild, and a
# UniHCP task's quantized model, which carries its checkpoint's recipe (gated like a checkpoint's)
QUANT_JSON_CASES = {
    "folded_bn-unknown-module": ({"folded_bn": [["no.such.conv", "no.such.bn"]]}, "does not build"),
    "folded_bn-not-pairs": ({"folded_bn": "conv1"}, "does not build"),
    "sites-unknown-key": ({"sites": [{"bogus": 1}]}, "does not build"),
    "unihcp_task-base-include": ({"arch": {"source": "unihcp_task", "task": "pose",
                                           "recipe": {"base": "{outside}/secret.yaml"}}}, "includes no other file"),
    "unihcp_task-names-its-checkpoint": ({"arch": {"source": "unihcp_task", "task": "pose",
                                                   "checkpoint": "{outside}"}}, "recipe mapping"),
}


@pytest.mark.parametrize("case", sorted(QUANT_JSON_CASES))
def test_crafted_quant_json_in_process(fake_step, digits_shards, tmp_path, monkeypatch, capsys, case):
    edit, needle = QUANT_JSON_CASES[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.yaml").write_text("model: {backbone: resnet10t}\n")
    qdir = tmp_path / "quant"
    qdir.mkdir()
    shutil.copy(fake_step / "model.safetensors", qdir / "model.safetensors")
    model = yaml.safe_load((fake_step / "recipe.yaml").read_text())["model"]
    meta = {"format": 1, "arch": {"source": "recipe", "model": model, "in_chans": 1}, "folded_bn": [], "sites": [],
            "wspec": {}, "aspec": {}, "config": {}}
    meta.update(json.loads(json.dumps(edit).replace("{outside}", str(outside))))
    (qdir / "quant.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    with audited([fake_step, qdir, digits_shards, out], marker=MARKER) as violations:
        code = main(["eval", "sysnoise", "--checkpoint", str(fake_step), "--data", str(digits_shards),
                     "--int8", str(qdir), "--axes", "precision", "--max-samples", "4", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert not violations, violations
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
