"""The one model counter: parameters (by dtype), non-zeros, parameter bytes, MACs, file size, op histogram.

Two entry points share one rule for what a parameter is: :func:`model_report` on a ``ModelProto`` and
:func:`graph_figures` on an onnx-graphsurgeon ``Graph`` (the pipeline's per-pass figures). Both turn
their input into the same small view (nodes by tensor name, constants with dtype and shape) and call
:func:`_constant_roles`, which alone decides the role of every constant.

**The parameter rule.** A constant is an initializer (of the main graph or of an If/Loop/Scan body), a
sparse initializer, or the value of a ``Constant`` node. Each input slot of a node is one of:

* *shape-like*: its values only decide shapes, axes, indices, counts or control flow (table
  ``_SHAPE_INPUTS`` below), or it is a data input of a shape-arithmetic node (``_SHAPE_ARITH``:
  Concat, Gather, Unsqueeze, Add, Cast, ...) whose every output is itself read only shape-like;
* *quantization*: a scale or zero point of QuantizeLinear / DequantizeLinear / QLinear* /
  *Integer / MatMulNBits (table ``_QUANT_INPUTS``), or a weight's scale that a Mul multiplies with a
  DynamicQuantizeLinear scale (onnxruntime's dynamic quantization);
* *data*: every other input.

A constant is a **parameter** when at least one node reads it at a data input (or it is itself a
graph or subgraph output), whatever its dtype (float, int8, uint8, int4, int32 bias, ...); otherwise
it is a **quantization parameter** (``quant_params``) when some node reads it at a quantization
input; otherwise (read only shape-like, or not read at all) it is not counted, unless it holds more than
``SHAPE_LIKE_MAX_ELEMENTS`` (64) elements: no shape, axis list or slice bound is that long, so such a tensor
is stored data (the codebook indices of shared weights, read through Gather). String tensors are never
counted. Each constant counts once, however many nodes read it.

Shape-like inputs (op: 0-based input indices; ops matched by name in any domain):

=================================================================  ==================================
Reshape 1, Expand 1, Tile 1, Split 1, Squeeze 1, Unsqueeze 1       shape, repeats, sizes, axes
Slice 1-4, Pad 1 and 3, Resize 1-3, Upsample 1                     starts/ends/axes/steps, pads, axes,
                                                                   roi/scales/sizes
ConstantOfShape 0, Range 0-2, TopK 1, Trilu 1, CumSum 1            shape, start/limit/delta, k, axis
Reduce* 1 (the opset-13/18 axes input)                             axes
Gather, GatherElements, GatherND, Scatter, ScatterElements,        indices of any size (an index
ScatterND, ArrayFeatureExtractor, Compress, OneHot: 1              tensor selects, it is not learned)
If 0, Loop 0-1, Dropout 1-2, NonMaxSuppression 2-4, LSTM/GRU/RNN   control values, thresholds,
4, ReverseSequence 1, MatMulNBits 4, GatherBlockQuantized 1        sequence lengths, g_idx, indices
Shape 0, Size 0                                                    only the input's shape is read
DFT 1-2, STFT 1 and 3, MaxUnpool 2, CenterCropPad 1, Col2Im 1-2,   lengths, steps, output shapes
AffineGrid 1, SplitToSequence 1, SequenceAt 1, SequenceInsert 2,
SequenceErase 1
=================================================================  ==================================

``params_by_dtype`` splits ``params`` by ONNX element type (``{"float32": n, "int8": m}``); a
MatMulNBits weight counts ``N*K`` parameters of type ``uint{bits}``. ``nonzeros`` counts stored
values that are not zero (for a quantized weight with a non-zero zero point, the stored zero is not
the real zero; ``None`` when some values are not loaded, e.g. external data left on disk).
``param_bytes`` is ``size * bits / 8`` per parameter tensor (4-bit types half a byte, rounded up per
tensor). Per-node ``params`` attribute a Constant node's value to that node, an initializer to its
first reader, and constants inside a subgraph to the node that holds the subgraph, so that the
per-node figures sum to ``params``.

**MACs** are per sample: dynamic leading dimensions are set to 1 (other dynamic dimensions come from
``input_shapes`` or stay unknown, and nodes whose shapes stay unknown are counted separately).
Conv/ConvInteger/QLinearConv, ConvTranspose, Gemm/QGemm, MatMul/MatMulInteger/QLinearMatMul/
MatMulIntegerToFloat/DynamicQuantizeMatMul and MatMulNBits (``K`` from its attribute) count
multiply-accumulates; every other node counts 0.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper

from ..graph_edit import node_bodies
from ..mapped_data import is_mapped, tensor_array
from ..model_io import PROTO_LIMIT_BYTES, model_size_bytes, tensor_bytes

Role = Literal["weight", "quant", "shape"]

_SHAPE_INPUTS: dict[str, frozenset[int]] = {
    **dict.fromkeys(("Reshape", "Expand", "Tile", "Split", "Squeeze", "Unsqueeze", "Upsample", "TopK", "Trilu",
                     "CumSum", "Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "Scatter",
                     "ArrayFeatureExtractor", "OneHot", "Compress", "ReverseSequence", "CenterCropPad",
                     "AffineGrid", "SplitToSequence", "SequenceAt", "SequenceErase"), frozenset({1})),
    **dict.fromkeys(("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                     "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"), frozenset({1})),
    **dict.fromkeys(("LSTM", "GRU", "RNN"), frozenset({4})),
    **dict.fromkeys(("ConstantOfShape", "If", "Shape", "Size"), frozenset({0})),
    "Slice": frozenset({1, 2, 3, 4}), "Resize": frozenset({1, 2, 3}), "Pad": frozenset({1, 3}),
    "Range": frozenset({0, 1, 2}), "Loop": frozenset({0, 1}), "Dropout": frozenset({1, 2}),
    "NonMaxSuppression": frozenset({2, 3, 4}), "MatMulNBits": frozenset({4}), "DFT": frozenset({1, 2}),
    "STFT": frozenset({1, 3}), "MaxUnpool": frozenset({2}), "Col2Im": frozenset({1, 2}),
    "SequenceInsert": frozenset({2}), "GatherBlockQuantized": frozenset({1}),
}

_QUANT_INPUTS: dict[str, frozenset[int]] = {
    **dict.fromkeys(("QuantizeLinear", "DequantizeLinear"), frozenset({1, 2})),
    **dict.fromkeys(("QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul"), frozenset({1, 2, 4, 5, 6, 7})),
    **dict.fromkeys(("MatMulInteger", "ConvInteger", "MatMulNBits", "DynamicQuantizeMatMul", "GatherBlockQuantized"),
                    frozenset({2, 3})),
    **dict.fromkeys(("QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearAveragePool",
                     "QLinearSoftmax"), frozenset({1, 2, 3, 4})),
    "QGemm": frozenset({1, 2, 4, 5, 7, 8}), "MatMulIntegerToFloat": frozenset({2, 3, 4, 5}),
}

# Ops through which a value can flow into a shape-like input; their data inputs are shape-like when
# every output of the node is read only shape-like (Shape -> Gather -> Unsqueeze -> Concat -> Reshape).
_SHAPE_ARITH = frozenset((
    "Concat", "Cast", "CastLike", "Gather", "GatherElements", "Unsqueeze", "Squeeze", "Reshape", "Flatten",
    "Identity", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Round", "Sqrt", "Pow", "Sign",
    "Min", "Max", "Slice", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Where",
    "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "Range", "Expand", "Tile", "Transpose", "Split",
    "ConstantOfShape", "NonZero",
))

_SUB_BYTE_BITS: dict[int, int] = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4,
                                  TensorProto.INT2: 2, TensorProto.UINT2: 2}
_DTYPE_NAMES: dict[int, str] = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64",
                                TensorProto.FLOAT16: "float16"}


SHAPE_LIKE_MAX_ELEMENTS = 64  # shapes, axes, starts: a bigger integer constant is data (an index tensor)


def _input_role(op: str, index: int) -> Role | None:
    if op == "QLinearConcat":  # Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) triples
        return "quant" if index < 2 or (index - 2) % 3 else None
    if index in _QUANT_INPUTS.get(op, ()):
        return "quant"
    if index in _SHAPE_INPUTS.get(op, ()):
        return "shape"
    return None


def dtype_name(data_type: int) -> str:
    """The name a parameter dtype is reported under: ``float32``, ``float16``, ``int8``, ``uint4``, ..."""
    return _DTYPE_NAMES.get(data_type) or TensorProto.DataType.Name(data_type).lower()


def dtype_bits(data_type: int) -> int:
    """Bits one element of an ONNX element type takes in memory (4 for int4/uint4, 32 for float32)."""
    if data_type in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[data_type]
    if data_type == TensorProto.STRING:
        return 0
    try:
        return 8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):  # element types numpy has no counterpart for: one byte each
        return 8


@dataclass(frozen=True)
class _NodeIO:
    """What the parameter rule needs of a node: op, input and output names, and its top-level index."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    owner: int
    packed: tuple[int, int] | None = None  # MatMulNBits: (N*K weights held by input 1, bits)


@dataclass(frozen=True)
class _Const:
    """A constant tensor: element type, shape, a way to read its values (None: not loaded), owner node."""

    name: str
    data_type: int
    shape: tuple[int, ...]
    values: Callable[[], np.ndarray | None]
    owner: int | None = None  # a Constant node or the node holding a subgraph; None: its first reader


@dataclass
class _View:
    nodes: list[_NodeIO] = field(default_factory=list)
    consts: dict[str, _Const] = field(default_factory=dict)
    sinks: set[str] = field(default_factory=set)  # graph and subgraph outputs: values leave the graph


def _consumers(nodes: Sequence[_NodeIO]) -> dict[str, list[tuple[_NodeIO, int]]]:
    out: dict[str, list[tuple[_NodeIO, int]]] = {}
    for node in nodes:
        for i, name in enumerate(node.inputs):
            if name:
                out.setdefault(name, []).append((node, i))
    return out


def _read_role(node: _NodeIO, index: int, shape_valued: set[str], dynamic_scales: frozenset[str] = frozenset()
               ) -> Role:
    """``dynamic_scales``: the scale outputs of DynamicQuantizeLinear nodes; a constant multiplied with one is a
    weight's scale (onnxruntime's dynamic quantization: ``Mul(x_scale, w_scale)``)."""
    role = _input_role(node.op, index)
    if role is not None:
        return role
    if node.op == "Mul" and any(n in dynamic_scales for j, n in enumerate(node.inputs) if j != index):
        return "quant"
    if node.op in _SHAPE_ARITH and node.outputs and all(o in shape_valued for o in node.outputs if o):
        return "shape"
    return "weight"


def _shape_valued(view: _View, consumers: Mapping[str, list[tuple[_NodeIO, int]]]) -> set[str]:
    """Tensors whose values only ever reach shape-like inputs (a fixed point, fast on sorted graphs)."""
    valued: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in reversed(view.nodes):
            for o in node.outputs:
                readers = consumers.get(o)
                if (o and readers and o not in valued and o not in view.sinks
                        and all(_read_role(n, i, valued) == "shape" for n, i in readers)):
                    valued.add(o)
                    changed = True
    return valued


def _constant_roles(view: _View) -> dict[str, tuple[Role, _NodeIO | None, int]]:
    """The role of every counted constant and the reader that decided it: the parameter rule.

    A constant that is itself a graph (or subgraph) output counts as a weight, with no reader.
    """
    consumers = _consumers(view.nodes)
    valued = _shape_valued(view, consumers)
    dynamic_scales = frozenset(n.outputs[1] for n in view.nodes if n.op == "DynamicQuantizeLinear"
                               and len(n.outputs) > 1 and n.outputs[1])
    rank = {"weight": 2, "quant": 1, "shape": 0}
    roles: dict[str, tuple[Role, _NodeIO | None, int]] = {}
    for name, const in view.consts.items():
        if const.data_type == TensorProto.STRING:
            continue
        for node, i in consumers.get(name, ()):
            role = _read_role(node, i, valued, dynamic_scales)
            if name not in roles or rank[role] > rank[roles[name][0]]:
                roles[name] = (role, node, i)
        if name in view.sinks and (name not in roles or roles[name][0] != "weight"):
            roles[name] = ("weight", None, -1)
        if name in roles and roles[name][0] == "shape" and math.prod(const.shape) > SHAPE_LIKE_MAX_ELEMENTS:
            roles[name] = ("weight",) + roles[name][1:]  # stored weights (share-weights' codebook indices)
    return roles


def _count_nonzero(values: np.ndarray) -> int:
    try:
        return int(np.count_nonzero(values))
    except TypeError:  # custom element types numpy cannot compare: any set bit is non-zero
        return int(np.count_nonzero(values.view(np.uint8).reshape(values.size, -1).any(axis=1)))


def _packed_nonzero(values: np.ndarray, bits: int) -> int | None:
    raw = np.asarray(values, dtype=np.uint8).ravel()
    if bits == 8:
        return int(np.count_nonzero(raw))
    if bits == 4:
        return int(np.count_nonzero(raw & 0x0F) + np.count_nonzero(raw >> 4))
    return None


@dataclass(frozen=True)
class _Totals:
    by_dtype: dict[str, int]
    quant_params: int
    nonzeros: int | None
    param_bytes: int
    per_owner: dict[int, int]


def _tally(view: _View) -> _Totals:
    """Parameter figures of a view, by the parameter rule."""
    by_dtype: Counter[str] = Counter()
    per_owner: Counter[int] = Counter()
    quant, nbytes, nonzeros = 0, 0, 0
    unknown_values = False
    for name, (role, reader, index) in _constant_roles(view).items():
        const = view.consts[name]
        size = math.prod(const.shape)
        if role == "quant":
            quant += size
        if role != "weight":
            continue
        packed = reader.packed if reader is not None and reader.op == "MatMulNBits" and index == 1 else None
        count, key = (packed[0], f"uint{packed[1]}") if packed else (size, dtype_name(const.data_type))
        by_dtype[key] += count
        per_owner[const.owner if const.owner is not None else reader.owner if reader is not None else -1] += count
        nbytes += (size * dtype_bits(const.data_type) + 7) // 8
        values = const.values()
        nz = None if values is None else (_packed_nonzero(values, packed[1]) if packed else _count_nonzero(values))
        unknown_values |= nz is None
        nonzeros += nz or 0
    return _Totals(dict(sorted(by_dtype.items())), quant, None if unknown_values else nonzeros, nbytes,
                   dict(per_owner))


# --- the ModelProto view -------------------------------------------------------------------------

def _proto_values(t: onnx.TensorProto) -> Callable[[], np.ndarray | None]:
    if is_mapped(t):  # a weight mapped from the input's external data: read from its file when counted
        return lambda: tensor_array(t)
    if t.data_location == TensorProto.EXTERNAL:
        return lambda: None
    return lambda: numpy_helper.to_array(t)


def _attr_constant(name: str, attr: onnx.AttributeProto, owner: int) -> _Const | None:
    """The tensor a Constant node's attribute holds (value, value_float(s), value_int(s), sparse_value)."""
    if attr.name == "value":
        return _Const(name, attr.t.data_type, tuple(attr.t.dims), _proto_values(attr.t), owner)
    if attr.name == "sparse_value":
        values = attr.sparse_tensor.values
        return _Const(name, values.data_type, tuple(attr.sparse_tensor.dims), _proto_values(values), owner)
    if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
        return _literal_constant(name, attr.name, onnx.helper.get_attribute_value(attr), owner)
    return None


def _literal_constant(name: str, key: str, value: object, owner: int) -> _Const:
    """A Constant node's value_float(s) / value_int(s) as a float32 / int64 tensor."""
    arr = np.asarray(value, np.float32 if "float" in key else np.int64)
    return _Const(name, TensorProto.FLOAT if "float" in key else TensorProto.INT64, arr.shape, lambda: arr, owner)


def _nbits(op: str, attrs: Mapping[str, int]) -> tuple[int, int] | None:
    if op != "MatMulNBits" or "K" not in attrs or "N" not in attrs:
        return None
    return int(attrs["K"]) * int(attrs["N"]), int(attrs.get("bits", 4))


def _add_proto_graph(view: _View, graph: onnx.GraphProto, owner: int | None) -> None:
    for t in graph.initializer:
        view.consts[t.name] = _Const(t.name, t.data_type, tuple(t.dims), _proto_values(t), owner)
    for s in graph.sparse_initializer:
        view.consts[s.values.name] = _Const(s.values.name, s.values.data_type, tuple(s.dims),
                                            _proto_values(s.values), owner)
    if owner is not None:
        view.sinks.update(o.name for o in graph.output)
    for index, node in enumerate(graph.node):
        here = index if owner is None else owner
        packed = _nbits(node.op_type, _int_attrs(node))
        view.nodes.append(_NodeIO(node.op_type, tuple(node.input), tuple(node.output), here, packed))
        for attr in node.attribute:
            if node.op_type == "Constant" and node.output:
                const = _attr_constant(node.output[0], attr, here)
                if const is not None:
                    view.consts[const.name] = const
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _add_proto_graph(view, sub, here)


def _proto_view(model: onnx.ModelProto) -> _View:
    view = _View(sinks={o.name for o in model.graph.output})
    _add_proto_graph(view, model.graph, None)
    return view


# --- the graphsurgeon view -----------------------------------------------------------------------

def _gs_constant(name: str, t: gs.Constant, owner: int | None) -> _Const:
    # Read through the lazy holder without caching: loading would materialise every weight in the
    # graph and make graphsurgeon cast bfloat16/float8 weights on export.
    held = t._values
    if isinstance(held, gs.ir.tensor.SparseValues):
        values = held.tensor.values
        return _Const(name, values.data_type, tuple(held.tensor.dims), _proto_values(values), owner)
    if isinstance(held, gs.ir.tensor.LazyValues):
        return _Const(name, held.tensor.data_type, tuple(held.tensor.dims), _proto_values(held.tensor), owner)
    exported = t.export_dtype
    dt = exported if isinstance(exported, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(exported))
    return _Const(name, dt, tuple(int(d) for d in held.shape), lambda: held, owner)


def _gs_attr_constant(name: str, attrs: Mapping, owner: int) -> _Const | None:
    for key, value in attrs.items():
        if key in ("value", "sparse_value") and isinstance(value, gs.Constant):
            return _gs_constant(name, value, owner)
        if key in ("value_float", "value_floats", "value_int", "value_ints"):
            return _literal_constant(name, key, value, owner)
    return None


def _add_gs_graph(view: _View, graph: gs.Graph, owner: int | None) -> None:
    if owner is not None:
        view.sinks.update(t.name for t in graph.outputs)
    for t in graph.outputs:
        if isinstance(t, gs.Constant):
            view.consts[t.name] = _gs_constant(t.name, t, owner)
    for index, node in enumerate(graph.nodes):
        here = index if owner is None else owner
        ints = {k: v for k, v in node.attrs.items() if isinstance(v, int)}
        view.nodes.append(_NodeIO(node.op, tuple(t.name for t in node.inputs), tuple(t.name for t in node.outputs),
                                  here, _nbits(node.op, ints)))
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.name not in view.consts:
                view.consts[t.name] = _gs_constant(t.name, t, owner)
        if node.op == "Constant" and node.outputs:
            const = _gs_attr_constant(node.outputs[0].name, node.attrs, here)
            if const is not None:
                view.consts[const.name] = const
        for sub in node_bodies(node):
            _add_gs_graph(view, sub, here)


def _gs_view(graph: gs.Graph) -> _View:
    view = _View(sinks={t.name for t in graph.outputs})
    _add_gs_graph(view, graph, None)
    return view


# --- figures and reports -------------------------------------------------------------------------

@dataclass(frozen=True)
class Figures:
    """Size figures of a model or graph, by the parameter rule of this module."""

    params: int
    params_by_dtype: dict[str, int]
    quant_params: int
    nonzeros: int | None
    param_bytes: int
    macs: int
    nodes_without_shapes: int

    def as_dict(self) -> dict:
        return {"params": self.params, "params_by_dtype": dict(self.params_by_dtype),
                "quant_params": self.quant_params, "nonzeros": self.nonzeros, "param_bytes": self.param_bytes,
                "macs": self.macs, "nodes_without_shapes": self.nodes_without_shapes}


@dataclass(frozen=True)
class NodeCost:
    name: str
    op: str
    macs: int | None
    params: int


@dataclass(frozen=True)
class ModelReport:
    params: int
    macs: int
    nodes_without_shapes: int
    size_bytes: int
    op_histogram: dict[str, int]
    nodes: tuple[NodeCost, ...] = field(repr=False, default=())
    params_by_dtype: dict[str, int] = field(default_factory=dict)
    quant_params: int = 0
    nonzeros: int | None = None
    param_bytes: int = 0

    @property
    def figures(self) -> Figures:
        return Figures(self.params, dict(self.params_by_dtype), self.quant_params, self.nonzeros, self.param_bytes,
                       self.macs, self.nodes_without_shapes)

    def as_dict(self, per_node: bool = False) -> dict:
        d = {"params": self.params, "macs": self.macs, "nodes_without_shapes": self.nodes_without_shapes,
             "size_bytes": self.size_bytes, "op_histogram": dict(self.op_histogram),
             "params_by_dtype": dict(self.params_by_dtype), "quant_params": self.quant_params,
             "nonzeros": self.nonzeros, "param_bytes": self.param_bytes}
        if per_node:
            d["nodes"] = [n.__dict__ for n in self.nodes]
        return d


# op -> (how its MACs are counted, index of its weight input)
_MAC_RULES: dict[str, tuple[str, int]] = {
    "Conv": ("conv", 1), "ConvInteger": ("conv", 1), "QLinearConv": ("conv", 3), "ConvTranspose": ("conv_t", 1),
    "Gemm": ("gemm", 1), "QGemm": ("gemm", 3), "MatMul": ("matmul", 1), "MatMulInteger": ("matmul", 1),
    "QLinearMatMul": ("matmul", 3), "MatMulIntegerToFloat": ("matmul", 1), "DynamicQuantizeMatMul": ("matmul", 1),
    "MatMulNBits": ("nbits", 1),
}
_MAC_OPS = tuple(_MAC_RULES)
Shape = tuple[int, ...]


def _node_macs(op: str, inputs: Sequence[str], outputs: Sequence[str], attrs: Mapping[str, int],
               shape: Callable[[str], Shape | None]) -> int | None:
    """Per-sample multiply-accumulates of one node (0 for ops that are not counted, None: shapes unknown)."""
    kind, w_index = _MAC_RULES.get(op, ("", 0))
    if not kind:
        return 0
    out = shape(outputs[0]) if outputs else None
    a = shape(inputs[0]) if inputs else None
    w = shape(inputs[w_index]) if len(inputs) > w_index else None
    if out is None:
        return None
    if kind == "conv":
        return None if not w else math.prod(out) * math.prod(w[1:])
    if not a:
        return None
    if kind == "conv_t":
        return None if not w else math.prod(a) * math.prod(w[1:])
    if kind == "gemm":
        return math.prod(out) * (a[0] if attrs.get("transA") else a[-1])
    if kind == "nbits":
        return math.prod(out) * int(attrs.get("K", a[-1]))
    return math.prod(out) * a[-1]


def _structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without weight values (initializers become typed inputs): cheap to copy and infer at any size."""
    m = onnx.ModelProto()
    m.CopyFrom(model) if tensor_bytes(model) < PROTO_LIMIT_BYTES // 4 else _copy_without_weights(model, m)
    return m


def _copy_without_weights(model: onnx.ModelProto, m: onnx.ModelProto) -> None:
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.graph.node.extend(model.graph.node)
    m.graph.input.extend(model.graph.input)
    m.graph.output.extend(model.graph.output)
    names = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.name not in names:
            m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _fixed(d: onnx.TensorShapeProto.Dimension) -> bool:
    """Whether a dimension is static; exporters such as Paddle's write -1 for a dynamic one."""
    return d.HasField("dim_value") and d.dim_value >= 0


def _dims(inp: onnx.ValueInfoProto) -> list[int | None] | None:
    """An input's dimensions, None where dynamic (None without a shape)."""
    tt = inp.type.tensor_type
    return [d.dim_value if _fixed(d) else None for d in tt.shape.dim] if tt.HasField("shape") else None


def _with_static_batch(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    from ..runtime.feeds import batch_axis

    m = _structure_only(model)
    init_names = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in init_names or not inp.type.tensor_type.HasField("shape"):
            continue
        batch = batch_axis(_dims(inp))
        override = input_shapes.get(inp.name)
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            fixed = _fixed(d)
            if override is not None and i < len(override):
                d.Clear()
                d.dim_value = int(override[i])
            elif i == batch and not fixed:
                d.Clear()
                d.dim_value = 1
            elif d.HasField("dim_value") and not fixed:
                d.Clear()
    del m.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # shapes are best effort; nodes without them are counted as unknown
        return m


def _shape_table(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    table: dict[str, tuple[int, ...] | None] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            table[vi.name] = None
            continue
        dims = [d.dim_value for d in tt.shape.dim if _fixed(d)]
        table[vi.name] = tuple(dims) if len(dims) == len(tt.shape.dim) else None
    for t in model.graph.initializer:
        table[t.name] = tuple(t.dims)
    return table


def _one_sample(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``input_shapes`` at one sample: a batch given on an input's batch axis (its first dynamic dimension,
    :func:`~..runtime.feeds.batch_axis`) becomes 1, so the MACs counted are per sample whatever batch the user's
    ``--input-shape`` names."""
    from ..runtime.feeds import batch_axis

    out = dict(input_shapes)
    for inp in model.graph.input:
        given = out.get(inp.name)
        axis = batch_axis(_dims(inp))
        if given and axis is not None and axis < len(given):
            out[inp.name] = tuple(1 if i == axis else int(d) for i, d in enumerate(given))
    return out


def _runtime_shapes(model: onnx.ModelProto, names: list[str], input_shapes: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from one onnxruntime run on random batch-1 inputs (when inference could not tell)."""
    from ..runtime.feeds import batch_axis
    from ..runtime.session import SessionOptions, open_session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in existing)
    init_names = {t.name for t in m.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in m.graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        dims = input_shapes.get(inp.name)
        if dims is None:
            own = _dims(inp) or []
            batch = batch_axis(own)
            dims = [1 if i == batch else d for i, d in enumerate(own)]
        if None in dims:  # a dynamic side: MACs at an invented size would be wrong, so they stay uncounted
            return {}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = rng.random(dims).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(dims, dtype)
    try:
        sess = open_session(m, options=SessionOptions(optimize=False, log_level=4))
        values = sess.run(names, feeds)
    except Exception:  # shapes stay unknown; the report counts those nodes
        return {}
    return {n: tuple(v.shape) for n, v in zip(names, values, strict=True)}


def _int_attrs(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}


def _unknown_mac_names(model: onnx.ModelProto, shapes: Mapping[str, Shape | None], init_names: set[str]) -> list[str]:
    names: set[str] = set()
    for node in model.graph.node:
        rule = _MAC_RULES.get(node.op_type)
        if rule is not None:
            names.update(n for n in (node.input[0] if node.input else "", *node.input[rule[1]:rule[1] + 1],
                                     *node.output[:1]) if n and n not in init_names and shapes.get(n) is None)
    return sorted(names)


def model_report(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 size_bytes: int | None = None) -> ModelReport:
    """Parameters (by the module's rule), per-sample MACs, size and op histogram of a model.

    ``size_bytes`` overrides the serialized size (callers pass the on-disk size, external data included).
    """
    big = tensor_bytes(model) >= PROTO_LIMIT_BYTES // 4
    input_shapes = _one_sample(model, input_shapes or {})
    inferred = _with_static_batch(model, input_shapes)
    shapes = _shape_table(inferred)
    init_shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    unknown_names = _unknown_mac_names(inferred, shapes, set(init_shapes))
    if unknown_names and not big:
        shapes.update(_runtime_shapes(inferred, unknown_names, input_shapes or {}))

    def shape(name: str) -> Shape | None:
        return init_shapes.get(name) or shapes.get(name)

    totals = _tally(_proto_view(model))
    nodes = []
    for index, node in enumerate(inferred.graph.node):
        macs = _node_macs(node.op_type, node.input, node.output, _int_attrs(node), shape)
        nodes.append(NodeCost(node.name, node.op_type, macs, totals.per_owner.get(index, 0)))
    hist = Counter(n.op_type for n in model.graph.node)
    return ModelReport(
        params=sum(totals.by_dtype.values()), macs=sum(n.macs for n in nodes if n.macs is not None),
        nodes_without_shapes=sum(n.macs is None for n in nodes),
        size_bytes=size_bytes if size_bytes is not None else model_size_bytes(model),
        op_histogram=dict(sorted(hist.items(), key=lambda kv: -kv[1])), nodes=tuple(nodes),
        params_by_dtype=totals.by_dtype, quant_params=totals.quant_params, nonzeros=totals.nonzeros,
        param_bytes=totals.param_bytes)


def _gs_shapes(graph: gs.Graph) -> Callable[[str], Shape | None]:
    """Static shapes from the graph's tensors, a dynamic leading dimension taken as 1 (one sample)."""
    tensors = graph.tensors()

    def shape(name: str) -> Shape | None:
        t = tensors.get(name)
        if t is None or t.shape is None:
            return None
        dims: list[int] = []
        for i, d in enumerate(t.shape):
            if isinstance(d, (int, np.integer)) and d >= 0:
                dims.append(int(d))
            elif i == 0:
                dims.append(1)
            else:
                return None
        return tuple(dims)

    return shape


def _inferred_shapes(graph: gs.Graph, input_shapes: Mapping[str, Shape] | None = None) -> Callable[[str], Shape | None]:
    """Shapes from onnx inference on the exported graph at batch 1, or at ``input_shapes`` (used where the
    graph's shapes are not static)."""
    table = _shape_table(_with_static_batch(gs.export_onnx(graph, do_type_check=False), dict(input_shapes or {})))
    return lambda name: table.get(name)


def graph_shapes(graph: gs.Graph, input_shapes: Mapping[str, Shape] | None = None) -> Callable[[str], Shape | None]:
    """A lookup of static tensor shapes: the graph's own (a dynamic leading dimension taken as 1), else onnx
    inference on the exported graph at batch 1 or at ``input_shapes`` (each input's shape at one sample, e.g.
    the calibration data's), run once on first need and skipped for graphs whose parameters reach a quarter of
    the protobuf limit. A model with dynamic spatial sides has MACs only at some input size: this is the
    lookup to count them with. Unknown shapes are None."""
    own = _gs_shapes(graph)
    inferred: list[Callable[[str], Shape | None]] = []

    def shape(name: str) -> Shape | None:
        found = own(name)
        if found is not None:
            return found
        if not inferred:
            try:
                if _tally(_gs_view(graph)).param_bytes >= PROTO_LIMIT_BYTES // 4:
                    raise ValueError("too large to export for inference")  # as graph_figures: no export
                inferred.append(_inferred_shapes(graph, input_shapes))
            except Exception:  # shapes are best effort
                inferred.append(lambda _: None)
        return inferred[0](name)

    return shape


def _gs_macs(nodes: Iterable[gs.Node], shape: Callable[[str], Shape | None]) -> tuple[int, list[gs.Node]]:
    """MACs of the nodes whose shapes ``shape`` knows, and the MAC nodes it does not."""
    macs, unknown = 0, []
    for node in nodes:
        if node.op in _MAC_RULES:
            ints = {k: v for k, v in node.attrs.items() if isinstance(v, int)}
            m = _node_macs(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs], ints, shape)
            if m is None:
                unknown.append(node)
            else:
                macs += m
    return macs, unknown


def graph_figures(graph: gs.Graph, infer_missing: bool = True, input_shapes: Mapping[str, Shape] | None = None,
                  shapes: Callable[[str], Shape | None] | None = None) -> Figures:
    """Parameter figures and per-sample MACs of a graph, by the same rule as :func:`model_report`.

    MACs come from the shapes the graph's tensors carry (a dynamic leading dimension taken as 1). When
    some MAC nodes have no static shapes there and ``infer_missing`` is set, onnx shape inference runs
    once (:func:`graph_shapes`, at batch 1 or at ``input_shapes``); a caller that already holds such a
    lookup passes it as ``shapes``, so the graph is not inferred twice. There is no onnxruntime fallback, so
    nodes whose shapes stay unknown are counted in ``nodes_without_shapes`` (``model_report`` can still
    resolve them by a run).
    """
    totals = _tally(_gs_view(graph))
    lookup = shapes or (graph_shapes(graph, input_shapes) if infer_missing else _gs_shapes(graph))
    macs, unknown = _gs_macs(graph.nodes, lookup)
    return Figures(sum(totals.by_dtype.values()), totals.by_dtype, totals.quant_params, totals.nonzeros,
                   totals.param_bytes, macs, len(unknown))
