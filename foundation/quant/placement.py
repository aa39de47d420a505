"""Where activation quantizers go, decided from the data flow of one probe forward pass.

The model is never traced into a graph (no torch.fx / torch.ao): one forward pass on a couple of
calibration images records, for every ``Conv2d``/``Linear``, activation module (ReLU, GELU, ...) and
average pool, the tensor it received and the tensor it produced, in call order. Tensors are matched
by identity (storage and in-place version, see ``tensor_key``): a ``ReLU(inplace=True)`` right after
a conv consumes the conv's output, while ``x += shortcut`` makes a new value.

Placement rules (tensor level, close to what onnxruntime's own static quantizer does, so that the
exported QDQ graph runs on integer kernels):

1. every Conv/Linear weight is quantized;
2. the output of every activation module is quantized; a Conv/Linear whose output goes straight
   into an activation module is not quantized in between (conv-[BN]-ReLU is one fused op);
3. the output of every other Conv/Linear is quantized, except the model's output (the logits);
4. the input of a Conv/Linear is quantized unless it already is (rules 2, 3, 5) — this covers the
   model input, LayerNorm outputs, attention outputs and un-activated residual sums;
5. the output of an average pool whose input is quantized is quantized; a max pool's output is
   quantized with its input's quantizer (same grid, so exact — it only marks the tensor for export).

Functional ops (residual adds, softmax, attention matmuls, LayerNorm) run in floating point on
dequantized values. The first and last Conv/Linear use ``first_last_bits`` for their weights and input.
Biases are quantized to int32 with scale ``s_input · s_weight``, as integer kernels use them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from foundation.quant.fake_quant import QSpec
from foundation.quant.modules import QuantConv2d, QuantLinear, QuantOutput, Quantizer

ACTIVATIONS = {"ReLU", "ReLU6", "GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "Hardswish", "HardSwish",
               "LeakyReLU", "Mish", "ELU"}
AVG_POOLS = {"AdaptiveAvgPool2d", "AvgPool2d", "SelectAdaptivePool2d"}
MAX_POOLS = {"MaxPool2d", "AdaptiveMaxPool2d"}


@dataclass
class Site:
    """One module that gets quantizers."""

    name: str
    kind: str  # "conv" | "linear" | "act" | "pool" | "maxpool"
    input: bool = False  # quantize its input (conv/linear)
    output: bool = False  # quantize its output
    wbits: int | None = None
    abits_in: int | None = None
    abits_out: int | None = None
    act: str | None = None  # conv/linear: the activation module its output goes straight into
    tie: str | None = None  # maxpool: the site whose output quantizer it reuses
    input_from: str | None = None  # conv/linear with input=False: the site that quantized its input

    def to_dict(self) -> dict:
        return asdict(self)


def module_kind(m: nn.Module) -> str | None:
    if type(m) is nn.Conv2d:
        return "conv"
    if isinstance(m, nn.Linear) and (type(m).forward is nn.Linear.forward or type(m).__name__ == "Linear"):
        return "linear"
    cls = type(m).__name__
    if cls in ACTIVATIONS:
        return "act"
    if cls in AVG_POOLS:
        return "pool"
    if cls in MAX_POOLS:
        return "maxpool"
    return None


def tensor_key(t: Tensor) -> tuple:
    """Identity of a tensor's *contents*: same storage, offset and size, and no in-place change since.

    Views (reshape, flatten) keep the key; ``x += y`` or ``relu_`` bump the version and change it.
    The probe keeps every recorded tensor alive, so storage addresses are not reused meanwhile.
    """
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t._version)


@dataclass
class _Call:
    name: str
    kind: str
    inp: tuple
    out: tuple | None = None


@torch.no_grad()
def probe_calls(model: nn.Module, example: Tensor) -> tuple[list[_Call], tuple]:
    """Run ``model(example)`` recording the identity of each relevant module's first input and output."""
    calls: dict[str, _Call] = {}
    alive: list[Tensor] = []
    handles = []
    for name, m in model.named_modules():
        kind = module_kind(m)
        if kind is None:
            continue

        def pre(mod, args, name=name, kind=kind):
            if name not in calls and args and isinstance(args[0], Tensor):
                alive.append(args[0])
                calls[name] = _Call(name, kind, tensor_key(args[0]))

        def post(mod, args, out, name=name):
            call = calls.get(name)
            if call is not None and call.out is None and isinstance(out, Tensor):
                alive.append(out)
                call.out = tensor_key(out)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        out = model(example)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor):
        raise TypeError(f"quantization needs a model that returns one tensor, got {type(out).__name__}")
    return [c for c in calls.values() if c.out is not None], tensor_key(out)


def plan_placement(model: nn.Module, example: Tensor, wbits: int, abits: int,
                   first_last_bits: int | None = 8) -> list[Site]:
    """The quantization sites of ``model`` (FP, BN already folded), in call order."""
    calls, model_out = probe_calls(model, example)
    quantized: dict[tuple, str] = {}  # tensor key → name of the site that quantizes it

    def is_quantized(key: tuple) -> bool:
        return key in quantized

    sites: list[Site] = []
    for i, c in enumerate(calls):
        if any(c.name.startswith(s.name + ".") for s in sites):
            continue  # inside a module that is already wrapped (timm's SelectAdaptivePool2d → its pool)
        if c.kind in ("conv", "linear"):
            into_act = next((later.name for later in calls[i + 1:]
                             if later.kind == "act" and later.inp == c.out), None)
            site = Site(c.name, c.kind, input=not is_quantized(c.inp),
                        output=into_act is None and c.out != model_out, wbits=wbits, act=into_act,
                        input_from=quantized.get(c.inp))
            site.abits_in = abits if site.input else None
            site.abits_out = abits if site.output else None
        elif c.kind == "act":
            site = Site(c.name, "act", output=True, abits_out=abits)
        elif c.kind == "pool":
            if not is_quantized(c.inp):
                continue
            site = Site(c.name, "pool", output=True, abits_out=abits)
        else:
            # max pooling keeps values on its input's grid: quantizing again with the same scale is
            # exact, and lets onnxruntime run the pool (and what follows) on integers
            if not is_quantized(c.inp):
                continue
            site = Site(c.name, "maxpool", output=True, tie=quantized[c.inp])
        if site.output:
            quantized[c.out] = site.name
        sites.append(site)

    layers = [s for s in sites if s.kind in ("conv", "linear")]
    if not layers:
        raise ValueError("no nn.Conv2d or nn.Linear was called in the forward pass: nothing to quantize")
    if first_last_bits is not None:
        for s in (layers[0], layers[-1]):
            s.wbits = first_last_bits
            if s.input:
                s.abits_in = first_last_bits
    return sites


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def output_quantizer(module: nn.Module) -> Quantizer | None:
    """The quantizer applied to a wrapped module's output (its own, or the one a max pool reuses)."""
    q = getattr(module, "output_quant", None)
    if q is None and isinstance(module, QuantOutput) and module._tied:
        q = module._tied[0]
    return q


def apply_placement(model: nn.Module, sites: list[Site], wspec: QSpec, aspec: QSpec,
                    w_observer: str = "mse", a_observer: str = "mse", observer_opts: dict | None = None) -> nn.Module:
    """Replace/wrap the modules named in ``sites`` with quantized versions (in place)."""

    def act_q(bits: int) -> Quantizer:
        return Quantizer(QSpec(**{**aspec.to_dict(), "bits": bits}), a_observer, observer_opts, role="act")

    for s in sites:
        parent, attr = _get_parent(model, s.name)
        m = getattr(parent, attr)
        if s.kind in ("conv", "linear"):
            wq = Quantizer(QSpec(**{**wspec.to_dict(), "bits": s.wbits}), w_observer, observer_opts, role="weight")
            iq = act_q(s.abits_in) if s.input else None
            oq = act_q(s.abits_out) if s.output else None
            cls = QuantConv2d if s.kind == "conv" else QuantLinear
            new = cls.from_float(m, wq, iq, oq)
            if s.input_from is not None:
                new.set_input_source(output_quantizer(model.get_submodule(s.input_from)))
        elif s.kind == "maxpool":
            new = QuantOutput(m, None, tied=output_quantizer(model.get_submodule(s.tie)))
        else:
            new = QuantOutput(m, act_q(s.abits_out))
        setattr(parent, s.name.rpartition(".")[2], new)
    return model
