"""Quantization recipes (``recipes/quant/*.yaml``): a typed schema and the backend schemes.

A quantization recipe is its own small YAML file, separate from the training recipe, because it
applies to any finished checkpoint. Unknown keys and wrong values fail at load with the key path and
the allowed values (``RecipeError``; the CLI exits with code 2). Command-line flags override the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from foundation.config import RecipeError, format_errors, read_yaml, suggest
from foundation.quant.fake_quant import QSpec

ObserverName = Literal["minmax", "ema_minmax", "mse", "percentile"]


@dataclass(frozen=True)
class Backend:
    """A deployment target's quantization scheme (after MQBench's backend list)."""

    description: str
    w_symmetric: bool
    w_per_channel: bool
    a_symmetric: bool
    a_unsigned_if_nonneg: bool = False
    pow2_scale: bool = False
    fixed_bits: int | None = 8  # None: bit widths are free (academic)


BACKENDS: dict[str, Backend] = {
    "academic": Backend("research setting: symmetry, per-channel and bit widths from the recipe",
                        w_symmetric=True, w_per_channel=True, a_symmetric=False, fixed_bits=None),
    "tensorrt": Backend("NVIDIA TensorRT: symmetric per-channel int8 weights, symmetric per-tensor int8 activations",
                        w_symmetric=True, w_per_channel=True, a_symmetric=True),
    "snpe": Backend("Qualcomm SNPE/QNN: asymmetric per-tensor uint8 weights and activations",
                    w_symmetric=False, w_per_channel=False, a_symmetric=False),
    "openvino": Backend("Intel OpenVINO: symmetric per-channel int8 weights, symmetric per-tensor activations, "
                        "unsigned (uint8, zero point 0) where the tensor is never negative",
                        w_symmetric=True, w_per_channel=True, a_symmetric=True, a_unsigned_if_nonneg=True),
    "vitis": Backend("AMD/Xilinx Vitis AI: symmetric per-tensor int8 weights and activations, power-of-two scales",
                     w_symmetric=True, w_per_channel=False, a_symmetric=True, pow2_scale=True),
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AcademicConfig(Section):
    """The ``academic`` backend's free choices (other backends fix them)."""

    w_symmetric: bool = True
    w_per_channel: bool = True
    a_symmetric: bool = False


class ObserverConfig(Section):
    """How calibration turns statistics into clipping ranges."""

    weight: ObserverName = "mse"
    act: ObserverName = "mse"
    ema_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    lp: float = Field(2.0, gt=0.0)  # the p of the MSE/Lp range search
    mse_steps: int = Field(80, ge=1, le=99)  # candidate ranges: 100 %, 99 %, ... of [min, max]
    percentile: float = Field(99.99, gt=50.0, le=100.0)


class ReconstructionConfig(Section):
    """AdaRound / BRECQ / QDrop optimisation (defaults from the papers)."""

    iters: int = Field(20000, ge=1)  # per layer (AdaRound) or per block (BRECQ, QDrop)
    batch_size: int = Field(32, ge=1)
    warmup: float = Field(0.2, ge=0.0, lt=1.0)  # fraction of iterations without the rounding loss
    round_weight: float = Field(0.01, ge=0.0)  # λ of λ·Σ(1 − |2h − 1|^β)
    beta_start: float = Field(20.0, gt=0.0)
    beta_end: float = Field(2.0, gt=0.0)
    w_lr: float = Field(1e-3, gt=0.0)  # Adam on the rounding variables V (at lr_reference_iters)
    a_lr: float = Field(4e-5, gt=0.0)  # Adam on activation step sizes (LSQ), cosine-annealed (at lr_reference_iters)
    # The papers' learning rates go with their 20,000 iterations: Adam moves a parameter about lr per
    # step, so with fewer iterations both rates are multiplied by lr_reference_iters / iters (at most
    # 100x), keeping the distance V can travel (~20) — otherwise the rounding never leaves its start and
    # the final hard rounding is round-to-nearest. (a_lr absolute was tried for W3A3 and was worse over
    # 3 seeds: brecq.lr_scale.) null: use w_lr and a_lr as given.
    lr_reference_iters: int | None = Field(20000, ge=1)
    quant_prob: float = Field(0.5, ge=0.0, le=1.0)  # QDrop: probability an activation element is quantized
    learn_act_scale: bool = True  # BRECQ/QDrop learn activation step sizes; AdaRound never does


class OutlierConfig(Section):
    """Outlier Suppression (Wei et al. 2022) for transformer backbones."""

    enabled: bool = False
    gamma_migration: bool = True
    token_clipping: bool = True
    alphas: list[float] = [1.0, 0.9999, 0.999, 0.99, 0.98, 0.95, 0.9, 0.8]  # coarse stage: quantiles tried
    search_images: int = Field(256, ge=1)  # calibration images the coarse search scores on
    fine_iters: int = Field(300, ge=0)  # fine stage: steps of learning the clipping scales
    fine_lr: float = Field(4e-5, gt=0.0)  # Adam on the step sizes (absolute: scales are ~1e-2)
    fine_batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _alphas_in_range(self) -> OutlierConfig:
        if not self.alphas or any(not 0.5 < a <= 1.0 for a in self.alphas):
            raise ValueError("outlier.alphas: each quantile must be in (0.5, 1]")
        return self


# the PTQ methods by name; foundation.quant.METHODS maps each to its function (the names live here so that the
# recipe schema does not import the methods, which import the schema)
METHOD_NAMES = ("rtn", "adaround", "brecq", "qdrop")


class QuantConfig(Section):
    """One post-training quantization run: method, scheme, calibration and method options."""

    method: str = "rtn"  # one of METHOD_NAMES (foundation.quant.METHODS maps each to its function)
    backend: str = "academic"  # a key of BACKENDS
    wbits: int = Field(8, ge=2, le=8)
    abits: int = Field(8, ge=2, le=8)
    first_last_bits: int | None = Field(8, ge=2, le=8)  # first/last layer weights and inputs; None: like the rest
    academic: AcademicConfig = Field(default_factory=AcademicConfig)
    observers: ObserverConfig = Field(default_factory=ObserverConfig)
    calib_images: int = Field(1024, ge=1)
    batch_size: int = Field(64, ge=1)  # forward batch for calibration and evaluation
    reconstruction: ReconstructionConfig = Field(default_factory=ReconstructionConfig)
    outlier: OutlierConfig = Field(default_factory=OutlierConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _known_names(self) -> QuantConfig:
        _check_choice("method", self.method, METHOD_NAMES)
        _check_choice("backend", self.backend, BACKENDS)
        fixed = BACKENDS[self.backend].fixed_bits
        if fixed is not None and (self.wbits, self.abits) != (fixed, fixed):
            raise ValueError(f"backend {self.backend!r} is a {fixed}-bit scheme (got W{self.wbits}A{self.abits}); "
                             "use backend 'academic' for other bit widths")
        return self

    def specs(self) -> tuple[QSpec, QSpec]:
        """(weight spec, activation spec) at the body bit widths."""
        b = BACKENDS[self.backend]
        w_sym, w_pc, a_sym = b.w_symmetric, b.w_per_channel, b.a_symmetric
        if self.backend == "academic":
            w_sym, w_pc, a_sym = self.academic.w_symmetric, self.academic.w_per_channel, self.academic.a_symmetric
        w = QSpec(bits=self.wbits, symmetric=w_sym, per_channel=w_pc, ch_axis=0, pow2_scale=b.pow2_scale)
        a = QSpec(bits=self.abits, symmetric=a_sym, per_channel=False,
                  unsigned_if_nonneg=b.a_unsigned_if_nonneg, pow2_scale=b.pow2_scale)
        return w, a


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key}: unknown name {value!r}{suggest(value, choices)}; choose from {sorted(choices)}")


def load_quant_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> QuantConfig:
    """The recipe file (or the defaults) with ``overrides`` (dotted keys → values) applied, validated."""
    data: dict[str, Any] = {}
    source = "quantization options"
    if path is not None:
        source = str(path)
        data = read_yaml(Path(path), "quantization recipe")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return QuantConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_errors(e, source, QuantConfig, "quantization recipe")) from None


def check_arch(arch: Any, root: Path) -> dict[str, Any]:
    """A quantized checkpoint's ``quant.json`` ``arch`` through the artefact gate (``foundation.trust``): a
    registered timm name with allowed kwargs, or a recipe's model section / recipe gated as a checkpoint's
    recipe is. Anything else is refused before it reaches timm."""
    from foundation.trust import ArtefactRefused, check_model_section, check_recipe, model_kwargs, plain, timm_name

    where = f"{Path(root) / 'quant.json'}: arch"
    source = arch.get("source") if isinstance(arch, dict) else None
    if source == "timm":
        name = timm_name(arch.get("name"), f"{where}.name")
        return {"source": "timm", "name": name, "kwargs": model_kwargs(name, arch.get("kwargs") or {}, f"{where}.kwargs", root)}
    if source == "recipe":
        in_chans = arch.get("in_chans", 3)
        if not isinstance(in_chans, int) or isinstance(in_chans, bool) or not 0 < in_chans <= 64:
            raise ArtefactRefused(f"{where}.in_chans: {in_chans!r} is not a channel count")
        model = check_model_section(arch.get("model"), root, f"{where}.model")
        if not isinstance(model, dict):
            raise ArtefactRefused(f"{where}.model: a mapping (the recipe's model section)")
        return {"source": "recipe", "model": model, "in_chans": in_chans}
    if source == "recipe_tower":
        recipe = arch.get("recipe")
        if not isinstance(recipe, dict) or arch.get("tower") not in ("image", "text"):
            raise ArtefactRefused(f"{where}: recipe_tower needs a recipe mapping and tower 'image' or 'text'")
        return {"source": "recipe_tower", "recipe": check_recipe(recipe, root, f"{where}.recipe"), "tower": arch["tower"]}
    if source == "unihcp_task":  # one UniHCP task: the checkpoint's resolved recipe travels in quant.json
        recipe, task = arch.get("recipe"), arch.get("task")
        if not isinstance(recipe, dict) or not isinstance(task, str):
            raise ArtefactRefused(f"{where}: unihcp_task needs the checkpoint's recipe mapping and a task name (a "
                                  "quantized model written before it held its recipe: quantize it again)")
        return {"source": "unihcp_task", "recipe": check_recipe(recipe, root, f"{where}.recipe"),
                "task": plain(task, f"{where}.task")}
    raise ArtefactRefused(f"{where}.source: {source!r}; a quantized checkpoint's architecture is 'timm', 'recipe', "
                          "'recipe_tower' or 'unihcp_task'")
