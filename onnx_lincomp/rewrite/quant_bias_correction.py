"""Bias correction after onnxruntime's weight quantizers: the expected output shift of the rounded weights,
folded into each layer's bias.

A layer ``y = W x + b`` whose weight is rounded to ``W_q`` computes ``y' = W_q x + b``; on the calibration
distribution its expected output moves by ``E[y - y'] = (W - W_q) E[x]``. Adding that to the bias,
``b' = b + (W - W_q) mu`` with ``mu = E[x]`` (the layer's input mean; for a Conv the mean of its receptive
fields, column ``c * K + k`` as in :mod:`..calibration.moments`), makes the expected output of the layer
exact while leaving the zero-mean part of the error, ``(W - W_q)(x - mu)``, as it was. It is the bias
correction of Nagel et al. 2019 ("Data-free quantization", the empirical variant) and of ``share-weights``.
Only the *weight* rounding is corrected: in a QDQ model the activation quantization moves the output too,
and that part is left alone.

Where the rounded weight lives:

* QDQ (``quantize-int8``): the layer's weight is ``DequantizeLinear(q, s, z)`` of constant initializers,
  ``W_q = s (q - z)`` broadcast along the ``axis`` of a per-channel scale; a Gemm's ``alpha``/``transB`` and a
  MatMul's ``(in, out)`` layout are normalised as the linear-layer view does. The bias of a Conv/Gemm is
  onnxruntime's int32 ``DequantizeLinear(q_b, s_x s_w)``: the corrected bias is re-rounded on the same scale
  (an error of at most ``s_x s_w / 2``), so the integer kernels onnxruntime fuses stay fused; a layer without
  bias gets such an int32 bias when its input comes from a ``DequantizeLinear``, a float one otherwise, and
  a MatMul without bias gets a float ``Add`` on its output.
* ``com.microsoft.MatMulNBits`` (``quantize-weights-4bit``): the block layout differs between rtn, hqq and gptq,
  so ``W_q`` is read by running the node itself on the identity (``I_K W_q = W_q``, exact in float); the shift
  goes into the constant of the ``Add`` that reads only the node's output (the bias of a Gemm rewritten as
  MatMul + Add), else into the node's optional ``bias`` input (input 5).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from ..calibration.activations import CalibrationData
from ..calibration.moments import collect_layer_moments
from ..linear_layer import LinearLayer, match_linear_layer
from ..runtime.session import SessionOptions, open_session

INT32_MAX = np.iinfo(np.int32).max
PROBE_ROWS = 1024  # identity rows fed to a MatMulNBits probe at a time


@dataclass(frozen=True)
class Correction:
    """What correcting one model did: layers corrected, and why the others were not (reason -> count)."""

    corrected: int
    skipped: Mapping[str, int]
    largest_shift: float  # max |(W - W_q) mu| over the corrected layers, relative to the layer's max |b|, |W mu|

    def note(self, what: str) -> str:
        skips = "; ".join(f"{n} skipped: {why}" for why, n in sorted(self.skipped.items()))
        return (f"bias correction ({what}): expected output shift (W - W_q) E[x] folded into {self.corrected} "
                f"layer(s)" + (f", largest {self.largest_shift:.2g} of the output scale" if self.corrected else "")
                + (f"; {skips}" if skips else ""))


class _Model:
    """Initializer, producer and reader lookups of a ModelProto being edited in place."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.readers = Counter(i for n in model.graph.node for i in n.input)
        self.readers.update(o.name for o in model.graph.output)
        self._names = {n.name for n in model.graph.node} | set(self.inits) | set(self.producer)

    def array(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def set_array(self, name: str, values: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(values, name))

    def add_init(self, base: str, values: np.ndarray) -> str:
        name = self.fresh(base)
        t = numpy_helper.from_array(values, name)
        self.model.graph.initializer.append(t)
        self.inits[name] = t
        return name

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        if self.readers[tensor] != 1:
            return None
        return next((n for n in self.model.graph.node if tensor in n.input), None)


@dataclass(frozen=True)
class LayerMeans:
    """Per layer (keyed by head node name): the float weight in the linear-layer view ``(out, -1)``, the mean
    ``E[x]`` of its rows on the calibration data, and its output tensor's name."""

    weights: Mapping[str, np.ndarray]
    means: Mapping[str, np.ndarray]
    outputs: Mapping[str, str]
    skipped: Mapping[str, int]

    def by_output(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(weights, means) keyed by the layer's head-node output tensor instead."""
        return ({self.outputs[k]: v for k, v in self.weights.items()},
                {self.outputs[k]: v for k, v in self.means.items()})


def layer_means(graph: gs.Graph, data: CalibrationData, names: set[str] | None = None) -> LayerMeans:
    """Input means of the Conv/Gemm/MatMul layers of ``graph`` (those in ``names`` when given), streamed from the
    calibration part of ``data`` with the layer-moment collector. Grouped Convs are left out (their rows are per
    group, which the collector does not take)."""
    layers, skipped = [], Counter()
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or (names is not None and node.name not in names):
            continue
        layer = match_linear_layer(graph, node)
        if not isinstance(layer, LinearLayer) or layer.nodes[0] is not node:
            skipped[f"not a linear layer: {getattr(layer, 'reason', 'unmatched')}"] += 1
        elif layer.kind == "conv" and layer.group != 1:
            skipped["grouped Conv (input moments are not collected per group)"] += 1
        else:
            layers.append(layer)
    moments = collect_layer_moments(graph, data, layers) if layers else {}
    return LayerMeans({x.name: x.weight.reshape(x.out_features, -1) for x in layers},
                      {k: v.mean for k, v in moments.items()},
                      {x.name: x.nodes[0].outputs[0].name for x in layers}, dict(skipped))


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


# ---- QDQ ---------------------------------------------------------------------------------------------------------
def dequantize(m: _Model, tensor: str) -> np.ndarray | None:
    """The float value of ``tensor`` when it is ``DequantizeLinear`` of constant initializers (None otherwise)."""
    dq = m.producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q, s = m.array(dq.input[0]), m.array(dq.input[1])
    z = m.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if q is None or s is None or (len(dq.input) > 2 and dq.input[2] and z is None):
        return None
    values = q.astype(np.float64) - (0.0 if z is None else z.astype(np.float64).reshape(_axis_shape(q, s, dq)))
    return values * s.astype(np.float64).reshape(_axis_shape(q, s, dq))


def _axis_shape(q: np.ndarray, s: np.ndarray, dq: onnx.NodeProto) -> tuple[int, ...]:
    """The shape that broadcasts a per-tensor or per-axis scale over ``q``."""
    if s.size == 1:
        return ()
    axis = int(_attr(dq, "axis", 1)) % q.ndim
    return tuple(-1 if i == axis else 1 for i in range(q.ndim))


def normalised_weight(node: onnx.NodeProto, stored: np.ndarray) -> np.ndarray:
    """A weight as stored by ``node`` in the linear-layer view: output channels first, ``(out, -1)``."""
    if node.op_type == "Gemm":
        w = stored if int(_attr(node, "transB", 0)) else stored.T
        return w * float(_attr(node, "alpha", 1.0))
    if node.op_type == "MatMul":
        return stored.T
    return stored.reshape(stored.shape[0], -1)


def correct_qdq_biases(model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                       means: Mapping[str, np.ndarray]) -> Correction:
    """Fold ``(W - W_q) mu`` into the bias of every Conv/Gemm/MatMul of the QDQ ``model`` named in ``means``,
    in place. ``weights``: node name -> the float weight ``W`` in the linear-layer view ``(out, -1)``;
    ``means``: node name -> ``E[x]`` of the layer's rows (calibration data)."""
    m = _Model(model)
    skipped: Counter = Counter()
    done, largest = 0, 0.0
    for node in list(model.graph.node):
        if node.name not in means or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        stored = dequantize(m, node.input[1])
        if stored is None:  # kept float (excluded): no rounding to correct
            continue
        w = np.asarray(weights[node.name], dtype=np.float64)
        w_q = normalised_weight(node, stored)
        if w_q.shape != w.shape or w.shape[1] != means[node.name].size:
            skipped["weight shape differs from the float layer's"] += 1
            continue
        shift = (w - w_q) @ np.asarray(means[node.name], dtype=np.float64)
        why = _fold_qdq(m, node, shift)
        if why is not None:
            skipped[why] += 1
            continue
        done += 1
        largest = max(largest, _relative(shift, w, means[node.name]))
    return Correction(done, dict(skipped), largest)


def _relative(shift: np.ndarray, w: np.ndarray, mean: np.ndarray) -> float:
    scale = float(np.abs(w @ mean).max(initial=0.0))
    return float(np.abs(shift).max(initial=0.0)) / max(scale, 1e-12)


def _fold_qdq(m: _Model, node: onnx.NodeProto, shift: np.ndarray) -> str | None:
    """Add ``shift`` to ``node``'s bias (None), or say why it cannot."""
    if node.op_type == "MatMul":
        return _add_after(m, node, shift)
    beta = float(_attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
    if beta == 0.0:
        return "Gemm with beta 0 (its bias input is ignored)"
    delta = shift / beta
    if len(node.input) > 2 and node.input[2]:
        return _shift_bias_input(m, node, delta)
    _new_bias(m, node, delta)
    return None


def _shift_bias_input(m: _Model, node: onnx.NodeProto, delta: np.ndarray) -> str | None:
    name = node.input[2]
    dq = m.producer.get(name)
    if dq is not None and dq.op_type == "DequantizeLinear":  # onnxruntime's int32 bias
        q, s = m.array(dq.input[0]), m.array(dq.input[1])
        if q is None or s is None or m.readers[dq.input[0]] != 1 or m.readers[name] != 1:
            return "bias DequantizeLinear is shared or not constant"
        z = m.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(q)
        scale = np.broadcast_to(s.astype(np.float64), q.shape)
        bias = (q.astype(np.float64) - z.astype(np.float64)) * scale + delta
        safe = np.where(scale > 0, scale, 1.0)
        q_new = np.where(scale > 0, np.round(bias / safe) + z, q)
        m.set_array(dq.input[0], np.clip(q_new, -INT32_MAX, INT32_MAX).astype(q.dtype))
        return None
    bias = m.array(name)
    if bias is None or m.readers[name] != 1:
        return "bias is not an unshared constant"
    if bias.size not in (1, delta.size):
        return f"bias of shape {bias.shape} does not broadcast per output"
    flat = np.broadcast_to(bias.astype(np.float64).reshape(-1), delta.shape) + delta
    m.set_array(name, flat.reshape(bias.shape if bias.size == delta.size else delta.shape).astype(bias.dtype))
    return None


def _new_bias(m: _Model, node: onnx.NodeProto, delta: np.ndarray) -> None:
    """A bias for a Conv/Gemm that had none: int32 on the scale ``s_x s_w`` when both scales are known (the
    integer kernels stay fused), float otherwise."""
    base = f"{node.name or node.output[0]}_bias_correction"
    x_dq, w_dq = m.producer.get(node.input[0]), m.producer.get(node.input[1])
    s_x = m.array(x_dq.input[1]) if x_dq is not None and x_dq.op_type == "DequantizeLinear" else None
    s_w = m.array(w_dq.input[1])
    while len(node.input) < 3:
        node.input.append("")
    if s_x is None or s_x.size != 1 or s_w is None or s_w.size not in (1, delta.size):
        node.input[2] = m.add_init(base, delta.astype(s_w.dtype if s_w is not None else np.float32))
        return
    scale = np.broadcast_to(s_x.astype(np.float64).reshape(()) * s_w.astype(np.float64).reshape(-1),
                            delta.shape).astype(s_w.dtype)
    safe = np.where(scale > 0, scale.astype(np.float64), 1.0)
    q = np.clip(np.round(np.where(scale > 0, delta / safe, 0.0)), -INT32_MAX, INT32_MAX).astype(np.int32)
    inputs = [m.add_init(f"{base}_quantized", q), m.add_init(f"{base}_scale", scale),
              m.add_init(f"{base}_zero_point", np.zeros(delta.shape, np.int32))]
    out = m.fresh(base)
    dq = helper.make_node("DequantizeLinear", inputs, [out], name=m.fresh(f"{base}_DequantizeLinear"), axis=0)
    m.model.graph.node.insert(list(m.model.graph.node).index(node), dq)
    node.input[2] = out


def _into_reading_add(m: _Model, node: onnx.NodeProto, shift: np.ndarray) -> bool:
    """Add ``shift`` to the constant of an Add that alone reads ``node``'s output (its bias), also where the output
    goes through its QuantizeLinear / DequantizeLinear pair first (a 3-D MatMul + Add that onnxruntime leaves
    unfused: the bias is then an 8-bit constant behind its own DequantizeLinear, quantized again with a range that
    holds the shifted values); False if none."""
    tensor = node.output[0]
    reader = m.only_reader(tensor)
    if reader is not None and reader.op_type == "QuantizeLinear":
        dq = m.only_reader(reader.output[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            return False
        tensor, reader = dq.output[0], m.only_reader(dq.output[0])
    if reader is None or reader.op_type != "Add":
        return False
    other = reader.input[1] if reader.input[0] == tensor else reader.input[0]
    bias = m.array(other)
    if bias is None:
        return _into_quantized_constant(m, other, shift)
    if m.readers[other] != 1 or bias.size != shift.size:
        return False
    m.set_array(other, (bias.astype(np.float64) + shift.reshape(bias.shape)).astype(bias.dtype))
    return True


def _into_quantized_constant(m: _Model, name: str, shift: np.ndarray) -> bool:
    """Add ``shift`` to ``DequantizeLinear(q, s, z)`` of constants read by nothing else (per tensor, 8-bit): ``q``,
    ``s`` and ``z`` are set again for the shifted values; False if the pattern differs."""
    dq = m.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or m.readers[name] != 1:
        return False
    q, scale, zero = (m.array(i) for i in dq.input[:3])
    if q is None or scale is None or zero is None or scale.size != 1 or zero.size != 1 or q.size != shift.size \
            or q.dtype not in (np.uint8, np.int8) or any(m.readers[i] != 1 for i in dq.input[:3]):
        return False
    values = (q.astype(np.float64) - float(zero.reshape(-1)[0])) * float(scale.reshape(-1)[0]) + shift.reshape(q.shape)
    info = np.iinfo(q.dtype)
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    step = (high - low) / (info.max - info.min) or 1.0
    z = int(np.clip(round(info.min - low / step), info.min, info.max))
    m.set_array(dq.input[0], np.clip(np.round(values / step) + z, info.min, info.max).astype(q.dtype))
    m.set_array(dq.input[1], np.asarray(step, dtype=scale.dtype).reshape(scale.shape))
    m.set_array(dq.input[2], np.asarray(z, dtype=zero.dtype).reshape(zero.shape))
    return True


def _add_after(m: _Model, node: onnx.NodeProto, shift: np.ndarray) -> str | None:
    """``Add(y, shift)`` on a MatMul's output: into the constant of an Add that alone reads it, else a new Add
    (float: it sits between the MatMul and its output QuantizeLinear)."""
    if _into_reading_add(m, node, shift):
        return None
    dtype = np.float32
    w_dq = m.producer.get(node.input[1])
    if w_dq is not None and w_dq.input[1] in m.inits:
        dtype = m.array(w_dq.input[1]).dtype
    out = node.output[0]
    mid = m.fresh(f"{out}_before_bias_correction")
    node.output[0] = mid
    const = m.add_init(f"{node.name or out}_bias_correction", shift.astype(dtype))
    add = helper.make_node("Add", [mid, const], [out], name=m.fresh(f"{node.name or out}_bias_correction_add"))
    m.model.graph.node.insert(list(m.model.graph.node).index(node) + 1, add)
    return None


# ---- MatMulNBits -------------------------------------------------------------------------------------------------
def nbits_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The dequantized weight ``W_q`` (``K x N``) of a ``MatMulNBits`` node, read by running the node on the
    identity in onnxruntime (whatever its block layout: rtn, hqq, gptq)."""

    k, n = int(_attr(node, "K", 0)), int(_attr(node, "N", 0))
    inits = {t.name: t for t in model.graph.initializer}
    used = list(node.input)[1:4]
    probe_node = helper.make_node("MatMulNBits", ["A", *used], ["Y"], domain="com.microsoft",
                                  **{a.name: helper.get_attribute_value(a) for a in node.attribute
                                     if a.name != "accuracy_level"})
    scales = numpy_helper.to_array(inits[node.input[2]])
    elem = helper.np_dtype_to_tensor_dtype(scales.dtype)
    graph = helper.make_graph([probe_node], "probe", [helper.make_tensor_value_info("A", elem, [None, k])],
                              [helper.make_tensor_value_info("Y", elem, [None, n])],
                              [inits[i] for i in used if i])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.microsoft", 1)])
    probe.ir_version = 8
    sess = open_session(probe, options=SessionOptions(optimize=False))
    rows = []
    for start in range(0, k, PROBE_ROWS):
        eye = np.zeros((min(PROBE_ROWS, k - start), k), dtype=scales.dtype)
        eye[np.arange(eye.shape[0]), start + np.arange(eye.shape[0])] = 1
        rows.append(sess.run(None, {"A": eye})[0])
    return np.concatenate(rows).astype(np.float64)


def correct_nbits_biases(model: onnx.ModelProto, weights: Mapping[str, np.ndarray],
                         means: Mapping[str, np.ndarray]) -> Correction:
    """Fold ``(W - W_q) mu`` into the bias of every ``MatMulNBits`` of ``model`` whose output tensor is named in
    ``means`` (the output of the float MatMul it replaced), in place. ``weights``: that output -> the float
    weight in the linear-layer view ``(N, K)``."""
    m = _Model(model)
    skipped: Counter = Counter()
    done, largest = 0, 0.0
    for node in list(model.graph.node):
        key = node.output[0] if node.op_type == "MatMulNBits" else None
        if key not in means:
            continue
        if len(node.input) > 4 and node.input[4]:
            skipped["MatMulNBits with g_idx (act-order)"] += 1
            continue
        w = np.asarray(weights[key], dtype=np.float64)
        w_q = nbits_weight(model, node).T
        if w_q.shape != w.shape:
            skipped["weight shape differs from the float layer's"] += 1
            continue
        shift = (w - w_q) @ np.asarray(means[key], dtype=np.float64)
        _fold_nbits(m, node, shift)
        done += 1
        largest = max(largest, _relative(shift, w, means[key]))
    return Correction(done, dict(skipped), largest)


def _fold_nbits(m: _Model, node: onnx.NodeProto, shift: np.ndarray) -> None:
    if _into_reading_add(m, node, shift):
        return
    dtype = m.array(node.input[2]).dtype
    while len(node.input) < 6:
        node.input.append("")
    old = m.array(node.input[5]) if node.input[5] else None
    if old is not None and m.readers[node.input[5]] == 1:
        m.set_array(node.input[5], (old.astype(np.float64) + shift).astype(old.dtype))
        return
    base = np.zeros_like(shift) if old is None else old.astype(np.float64)
    node.input[5] = m.add_init(f"{node.name or node.output[0]}_bias", (base + shift).astype(dtype))


__all__ = ["Correction", "LayerMeans", "layer_means", "correct_nbits_biases", "correct_qdq_biases", "dequantize",
           "nbits_weight", "normalised_weight"]
