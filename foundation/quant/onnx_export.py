"""Deploying a quantized model: ONNX export with QuantizeLinear/DequantizeLinear, onnxruntime runs,
and onnxruntime's own static quantizer as the baseline.

8-bit quantizers export through ``torch.fake_quantize_per_{tensor,channel}_affine``, which the
exporter turns into ``QuantizeLinear → DequantizeLinear`` pairs (opset ≥ 13). After export the graph
is finished the way onnxruntime's integer kernels expect it:

- weights: ``QuantizeLinear(float initializer)`` is replaced by an int8/uint8 initializer feeding
  ``DequantizeLinear`` (the values are the model's rounded integers, AdaRound's included);
- biases of Conv/Gemm whose input and weight are dequantized become int32 with scale
  ``s_x·s_w`` behind a ``DequantizeLinear`` (as onnxruntime's quantizer writes them; the int32
  rounding error is below 0.5·s_x·s_w, far below the 8-bit step of the output).

onnxruntime then fuses ``DQ → Conv → (Relu) → Q`` into ``QLinearConv`` etc. Quantizers below 8 bits
cannot be expressed with 8-bit Q/DQ; they export as float ``Div/Round/Clip/Mul`` arithmetic — the
model is then a *fake-quantized float graph*: it reproduces the quantized numerics but runs at FP32
speed. ``export_onnx`` reports which kind it wrote.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from foundation.quant.modules import quantizers, set_export

OPSET = 17


def io_names(example: Tensor) -> tuple[str, str]:
    """Graph input/output names: ``image → logits`` for an image model, ``tokens → embedding`` for a text
    tower (integer input: a CLIP text tower's token ids)."""
    return ("image", "logits") if example.is_floating_point() else ("tokens", "embedding")


def _torch_export(model: nn.Module, example: Tensor, path: Path) -> None:
    inp, out = io_names(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[inp], output_names=[out],
                          dynamic_axes={inp: {0: "batch"}, out: {0: "batch"}},
                          opset_version=OPSET, dynamo=False)


@torch.no_grad()
def export_fp32_onnx(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """The FP32 model as ONNX (dynamic batch)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _torch_export(model.eval(), example, path)
    return path


@torch.no_grad()
def export_onnx(qmodel: nn.Module, example: Tensor, path: str | Path) -> dict:
    """Export a quantized model; returns ``{"path", "deployment", "qdq_pairs", "fake_quant_float"}``.

    ``deployment`` is ``"int8-qdq"`` when every quantizer is 8-bit, ``"fake-quant float graph"`` when
    none is, and ``"mixed: ..."`` otherwise (e.g. W4A4 with the first/last layer at 8 bits).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qs = [q for _, q in quantizers(qmodel) if q.enabled and q.ready]
    eight = sum((q.qmin, q.qmax) in {(0, 255), (-128, 127)} for q in qs)
    set_export(qmodel, True)
    try:
        _torch_export(qmodel.eval(), example, path)
    finally:
        set_export(qmodel, False)
    model = onnx.load(str(path))
    _fold_constants(model)
    folded = _fold_weight_quantization(model)
    biases = _quantize_biases(model)
    _drop_unused_initializers(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    deployment = ("int8-qdq" if eight == len(qs) else "fake-quant float graph" if eight == 0
                  else "mixed: int8 QDQ where 8-bit, fake-quant float ops elsewhere")
    return {"path": str(path), "deployment": deployment, "qdq_quantizers": eight,
            "float_fake_quantizers": len(qs) - eight, "int_weights": folded, "int32_biases": biases}


# --------------------------------------------------------------------------------------------------
# graph surgery


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


_NOT_FOLDED = {"QuantizeLinear", "DequantizeLinear", "Constant"}


def _fold_constants(model: onnx.ModelProto) -> None:
    """Evaluate every node whose inputs are all constants (onnx's reference evaluator), except Q/DQ.

    The exporter leaves Cast/Round chains around scales and zero points and the int32 bias rounding
    ``round(b / (s_x·s_w))·s_x·s_w`` as ops on initializers; onnxruntime's integer fusions need
    plain initializers there.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    consts = _constants(model)
    for node in list(graph.node):  # topological order: a node's constant inputs are folded before it
        if node.op_type in _NOT_FOLDED or not node.input or not all(i in consts for i in node.input if i):
            continue
        outputs = ReferenceEvaluator(node).run(None, {i: consts[i] for i in node.input if i})
        for name, value in zip(node.output, outputs):
            consts[name] = np.asarray(value)
            graph.initializer.append(numpy_helper.from_array(consts[name], name))
        graph.node.remove(node)
    _drop_unused_initializers(model)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _axis(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return a.i
    return 1


def _broadcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _fold_weight_quantization(model: onnx.ModelProto) -> int:
    """QuantizeLinear on a constant → an integer initializer."""
    consts = _constants(model)
    graph = model.graph
    remove, folded = [], 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        x = consts[node.input[0]].astype(np.float32)
        scale = consts[node.input[1]].astype(np.float32)
        zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        axis = _axis(node) % x.ndim
        info = np.iinfo(zp.dtype)
        q = np.rint(x / _broadcast(scale, x.ndim, axis)) + _broadcast(zp.astype(np.int64), x.ndim, axis)
        q = np.clip(q, info.min, info.max).astype(zp.dtype)
        name = node.output[0] + "_int"
        graph.initializer.append(numpy_helper.from_array(q, name))
        for user in graph.node:
            for i, inp in enumerate(user.input):
                if inp == node.output[0]:
                    user.input[i] = name
        remove.append(node)
        folded += 1
    for node in remove:
        graph.node.remove(node)
    return folded


def _quantize_biases(model: onnx.ModelProto) -> int:
    """Float bias of a Conv/Gemm whose input and weight are dequantized → int32 behind a DequantizeLinear."""
    consts = _constants(model)
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    count = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in consts:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x is not None and dq_w is not None and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        if dq_x.input[1] not in consts or dq_w.input[1] not in consts:
            continue
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            continue
        bias = consts[node.input[2]].astype(np.float32)
        scale = (consts[dq_x.input[1]].astype(np.float32) * consts[dq_w.input[1]].astype(np.float32))
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
        q = np.rint(bias / np.where(scale > 0, scale, 1.0))
        q = np.clip(q, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        base = node.input[2]
        graph.initializer.extend([numpy_helper.from_array(q, base + "_int32"),
                                  numpy_helper.from_array(scale, base + "_int32_scale"),
                                  numpy_helper.from_array(np.zeros_like(q), base + "_int32_zp")])
        dq = helper.make_node("DequantizeLinear", [base + "_int32", base + "_int32_scale", base + "_int32_zp"],
                              [base + "_dq"], name=base + "_DequantizeLinear", axis=0)
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[2] = base + "_dq"
        count += 1
    return count


# --------------------------------------------------------------------------------------------------
# onnxruntime


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session with all graph optimisations (QDQ fusion included)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_input(x: np.ndarray) -> np.ndarray:
    return x.astype(np.int64) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)


def ort_predict(session, images: Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Outputs of an onnxruntime session for a stack of inputs (float images, or integer token ids)."""
    x = images.numpy() if isinstance(images, Tensor) else images
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: _ort_input(x[i:i + batch_size])})[0]
                           for i in range(0, x.shape[0], batch_size)])


class OnnxRuntimeModel(nn.Module):
    """An exported model run by onnxruntime (CPU) behind a module's call: float32 images (or integer
    token ids) in, outputs out on the input's device — so an evaluation can treat the deployed model like
    any other."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        self.path = str(path)
        self.session = ort_session(path, threads)

    def forward(self, images: Tensor) -> Tensor:
        x = images.detach().cpu()
        return torch.from_numpy(ort_predict(self.session, x if not x.is_floating_point() else x.float())).to(images.device)


def ort_quantize_static(fp32_path: str | Path, calib: Tensor, out_path: str | Path, per_channel: bool = True,
                        op_types: list[str] | None = None) -> Path:
    """onnxruntime's own static INT8 quantization (QDQ, uint8 activations, int8 weights), same calibration
    inputs (images, or a text tower's token ids).

    ``op_types``: the operators it quantizes (default: every one it knows). For a text tower (integer input)
    the default is ``MatMul``/``Gemm`` only: quantizing everything puts Q/DQ on the causal mask's ``-inf``
    additions (a range with infinite scale; the embeddings come out unrelated, cosine ~0.4 to FP32)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            name = io_names(calib)[0]
            self.batches = iter([{name: _ort_input(calib[i:i + 1].numpy())} for i in range(calib.shape[0])])

        def get_next(self):
            return next(self.batches, None)

    out_path = Path(out_path)
    pre = out_path.with_name(out_path.stem + "_pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    if op_types is None and not calib.is_floating_point():
        op_types = ["MatMul", "Gemm"]
    quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=op_types)
    pre.unlink(missing_ok=True)
    return out_path


def fused_op_counts(path: str | Path) -> dict[str, int]:
    """Operator counts of the graph onnxruntime actually runs (after its QDQ fusions)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for n in graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
