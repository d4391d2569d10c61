"""Model size report: parameters, MACs per node and in total, file size, op histogram.

MACs are per sample: dynamic leading dimensions are set to 1 (other dynamic dimensions come from
``input_shapes`` or stay unknown, and nodes whose shapes stay unknown are counted separately).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..model_io import model_size_bytes, tensor_bytes, PROTO_LIMIT_BYTES


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

    def as_dict(self, per_node: bool = False) -> dict:
        d = {"params": self.params, "macs": self.macs, "nodes_without_shapes": self.nodes_without_shapes,
             "size_bytes": self.size_bytes, "op_histogram": dict(self.op_histogram)}
        if per_node:
            d["nodes"] = [n.__dict__ for n in self.nodes]
        return d


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


def _with_static_batch(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    m = _structure_only(model)
    init_names = {t.name for t in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in init_names or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        override = input_shapes.get(inp.name)
        for i, d in enumerate(dims):
            if override is not None and i < len(override):
                d.Clear()
                d.dim_value = int(override[i])
            elif i == 0 and not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
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
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        table[vi.name] = None if any(d is None for d in dims) else tuple(dims)
    for t in model.graph.initializer:
        table[t.name] = tuple(t.dims)
    return table


def _node_macs(node: onnx.NodeProto, shapes: dict, inits: dict[str, tuple[int, ...]]) -> int | None:
    def shape(name):
        return inits.get(name) or shapes.get(name)

    out = shape(node.output[0]) if node.output else None
    if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and out is None:
        return None
    if node.op_type == "Conv":
        w = shape(node.input[1])
        return None if w is None else int(np.prod(out, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        x, w = shape(node.input[0]), shape(node.input[1])
        if x is None or w is None:
            return None
        return int(np.prod(x, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if node.op_type == "Gemm":
        a = shape(node.input[0])
        if a is None:
            return None
        k = a[0] if any(at.name == "transA" and at.i for at in node.attribute) else a[-1]
        return int(np.prod(out, dtype=np.int64) * k)
    if node.op_type == "MatMul":
        a = shape(node.input[0])
        return None if a is None else int(np.prod(out, dtype=np.int64) * a[-1])
    return 0


_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _runtime_shapes(model: onnx.ModelProto, names: list[str], input_shapes: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from one onnxruntime run on random batch-1 inputs (when inference could not tell)."""
    import onnxruntime as ort

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
        dims = list(input_shapes.get(inp.name, [d.dim_value if d.dim_value > 0 else 1 for d in tt.shape.dim]))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[inp.name] = rng.random(dims).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(dims, dtype)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        values = sess.run(names, feeds)
    except Exception:  # shapes stay unknown; the report counts those nodes
        return {}
    return {n: tuple(v.shape) for n, v in zip(names, values)}


def model_report(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 size_bytes: int | None = None) -> ModelReport:
    """Parameters, per-sample MACs, size and op histogram of a model."""
    big = tensor_bytes(model) >= PROTO_LIMIT_BYTES // 4
    inferred = _with_static_batch(model, input_shapes or {})
    shapes = _shape_table(inferred)
    init_names = {t.name for t in model.graph.initializer}
    unknown_names = sorted({n for node in inferred.graph.node if node.op_type in _MAC_OPS
                            for n in list(node.input[:2]) + list(node.output[:1])
                            if n and n not in init_names and shapes.get(n) is None})
    if unknown_names and not big:
        shapes.update(_runtime_shapes(inferred, unknown_names, input_shapes or {}))
    init_shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    float_inits = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                      onnx.TensorProto.BFLOAT16)}
    # Constant-node values reach nodes through outputs, so they are counted once at the Constant
    counted: set[str] = set()
    nodes = []
    total_macs, unknown = 0, 0
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    for node in inferred.graph.node:
        params = 0
        if node.op_type == "Constant":  # exporters such as Paddle keep weights in Constant nodes
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in float_types:
                    params += int(np.prod(attr.t.dims, dtype=np.int64))
        for name in node.input:
            if name in float_inits and name not in counted:
                params += float_inits[name]
                counted.add(name)
        macs = _node_macs(node, shapes, init_shapes)
        if macs is None:
            unknown += 1
        else:
            total_macs += macs
        nodes.append(NodeCost(node.name, node.op_type, macs, params))
    hist = Counter(n.op_type for n in model.graph.node)
    sub_params = _subgraph_params(model.graph)
    return ModelReport(params=sum(n.params for n in nodes) + sub_params, macs=total_macs, nodes_without_shapes=unknown,
                       size_bytes=size_bytes if size_bytes is not None else model_size_bytes(model),
                       op_histogram=dict(sorted(hist.items(), key=lambda kv: -kv[1])), nodes=tuple(nodes))


def _subgraph_params(graph: onnx.GraphProto) -> int:
    """Floating-point initializers and Constant values inside If/Loop/Scan bodies (counted as parameters)."""
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    total = 0
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                total += sum(int(np.prod(t.dims, dtype=np.int64)) for t in sub.initializer if t.data_type in float_types)
                for inner in sub.node:
                    if inner.op_type == "Constant":
                        total += sum(int(np.prod(a.t.dims, dtype=np.int64)) for a in inner.attribute
                                     if a.name == "value" and a.t.data_type in float_types)
                total += _subgraph_params(sub)
    return total
