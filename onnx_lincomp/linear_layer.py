"""One normalised view of a linear layer: Gemm, MatMul(+Add) with a constant 2-D weight, and Conv.

``weight`` always has output channels on axis 0: ``(out, in)`` for Gemm/MatMul and
``(out, in/group, *kernel)`` for Conv; ``bias`` has shape ``(out,)`` with Gemm's ``beta`` applied and
zeros when absent, and Gemm's ``alpha`` folded into the weight. Reading a layer is
:func:`match_linear_layer`; writing new parameters back is :func:`write_linear_layer` (one branch per
kind). Patterns that cannot be rewritten safely are reported as a :class:`Skip` with a reason.

The float64 ``weight`` is read on first use and cached on the view: structural questions (channel
groups, shapes, who feeds whom) never copy weights, which on a model with gigabyte matrices is the
difference between one copy of the weights in memory and three.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from .graph_edit import NameSource, is_graph_output, only_consumer

LayerKind = Literal["gemm", "matmul", "conv"]


@dataclass(frozen=True)
class Skip:
    """Why a node was not taken as (or a rewrite of) a linear layer."""

    node: str
    reason: str


@dataclass(frozen=True, eq=False)
class LinearLayer:
    kind: LayerKind
    shape: tuple[int, ...]  # of ``weight``: (out, in) or (out, in/group, *kernel)
    read_weight: Callable[[], np.ndarray] = field(repr=False)  # the out-major float64 weight
    bias: np.ndarray
    input: gs.Variable
    output: gs.Variable
    nodes: tuple[gs.Node, ...]
    has_bias: bool
    conv_attrs: dict = field(default_factory=dict)

    @cached_property
    def weight(self) -> np.ndarray:
        """Out-major float64 weight (Gemm's alpha applied), read on first use."""
        return self.read_weight()

    @property
    def stored(self) -> np.ndarray:
        """The out-major weight in the dtype the model stores (a view where the layout allows, never cached):
        for edits that only select rows or columns, which need no float64 copy of a big matrix."""
        head = self.nodes[0]
        values = np.asarray(head.inputs[1].values)
        if self.kind == "matmul" or (self.kind == "gemm" and not int(head.attrs.get("transB", 0))):
            values = values.T
        if self.kind == "gemm" and float(head.attrs.get("alpha", 1.0)) != 1.0:
            return self.weight
        return values

    def weight_rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` of ``weight`` in float64; only those rows are converted unless ``weight`` was read."""
        if "weight" in self.__dict__:  # the cached_property's value
            return self.weight[idx]
        return np.asarray(self.stored[idx], dtype=np.float64)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def name(self) -> str:
        return self.nodes[0].name or self.output.name

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def group(self) -> int:
        return int(self.conv_attrs.get("group", 1))

    @property
    def in_features(self) -> int:
        return int(self.shape[1]) * self.group

    @property
    def kernel_size(self) -> int:
        return int(np.prod(self.shape[2:], dtype=np.int64)) if self.kind == "conv" else 1

    def positions(self, shape: Callable[[str], tuple[int, ...] | None] | None = None) -> int:
        """Output positions of one run (every axis but the channel one: a fixed batch, a Conv's spatial size,
        a MatMul's leading axes): the MACs of one weight, by the rule of :func:`.analysis.model_report.
        graph_figures`. From ``shape`` (a tensor-name lookup such as ``model_report.graph_shapes`` at the data's
        input shapes) when it knows the output, else from the graph's static dims (dynamic ones count 1)."""
        dims = shape(self.output.name) if shape is not None else None
        if dims is None:
            dims = self.output.shape
        if not dims:
            return 1
        lead = [dims[0], *dims[2:]] if self.kind == "conv" else dims[:-1]
        return max(math.prod(int(d) for d in lead if isinstance(d, (int, np.integer)) and d > 0), 1)

    @property
    def param_count(self) -> int:
        return int(self.size + (self.bias.size if self.has_bias else 0))


def _weight_constant(graph: gs.Graph, node: gs.Node, index: int) -> gs.Constant | Skip:
    if len(node.inputs) <= index:
        return Skip(node.name, "missing weight input")
    w = node.inputs[index]
    if not isinstance(w, gs.Constant):
        return Skip(node.name, f"weight '{w.name}' is not a constant (graph input or computed)")
    if len(w.outputs) > 1:
        return Skip(node.name, f"weight '{w.name}' is shared by {len(w.outputs)} nodes")
    if not np.issubdtype(_dtype(w), np.floating):
        return Skip(node.name, f"weight '{w.name}' is not floating point")
    return w


def _dtype(c: gs.Constant) -> np.dtype:
    """A constant's numpy dtype without loading its values."""
    return np.dtype(c.dtype) if not isinstance(c._values, np.ndarray) else c._values.dtype


def _float64(c: gs.Constant, transpose: bool = False, scale: float = 1.0) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        v = np.asarray(c.values, dtype=np.float64)
        v = v.T if transpose else v
        return v * scale if scale != 1.0 else v
    return read


def _bias_vector(values: np.ndarray, out: int) -> np.ndarray | None:
    """A bias tensor as a ``(out,)`` vector, when it broadcasts along the last axis only."""
    v = np.asarray(values)
    if v.size == 1:
        return np.full(out, float(v.reshape(-1)[0]), dtype=np.float64)
    if v.size == out and (v.ndim == 1 or all(d == 1 for d in v.shape[:-1])):
        return v.reshape(out).astype(np.float64)
    return None


def _match_gemm(graph: gs.Graph, node: gs.Node) -> LinearLayer | Skip:
    a = node.attrs
    if int(a.get("transA", 0)):
        return Skip(node.name, "Gemm with transA=1")
    w = _weight_constant(graph, node, 1)
    if isinstance(w, Skip):
        return w
    if len(w.shape) != 2:
        return Skip(node.name, "Gemm weight is not 2-D")
    trans_b = bool(int(a.get("transB", 0)))
    shape = tuple(int(d) for d in (w.shape if trans_b else w.shape[::-1]))
    read = _float64(w, transpose=not trans_b, scale=float(a.get("alpha", 1.0)))
    out = shape[0]
    bias = np.zeros(out)
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name != ""
    if has_bias:
        c = node.inputs[2]
        if not isinstance(c, gs.Constant) or len(c.outputs) > 1:
            return Skip(node.name, "Gemm bias C is not an unshared constant")
        vec = _bias_vector(c.values, out)
        if vec is None:
            return Skip(node.name, f"Gemm bias of shape {np.shape(c.values)} does not broadcast per output")
        bias = vec * float(a.get("beta", 1.0))
    return LinearLayer("gemm", shape, read, bias, node.inputs[0], node.outputs[0], (node,), has_bias)


def _match_matmul(graph: gs.Graph, node: gs.Node) -> LinearLayer | Skip:
    if isinstance(node.inputs[0], gs.Constant):
        return Skip(node.name, "MatMul with a constant left operand")
    w = _weight_constant(graph, node, 1)
    if isinstance(w, Skip):
        return w
    if len(w.shape) != 2:
        return Skip(node.name, "MatMul weight is not 2-D")
    shape = (int(w.shape[1]), int(w.shape[0]))
    read = _float64(w, transpose=True)
    out = shape[0]
    mm_out = node.outputs[0]
    add = only_consumer(graph, mm_out)
    if add is not None and add.op == "Add":
        other = add.inputs[1] if add.inputs[0] is mm_out else add.inputs[0]
        vec = _bias_vector(other.values, out) if isinstance(other, gs.Constant) and len(other.outputs) == 1 else None
        if vec is not None:
            return LinearLayer("matmul", shape, read, vec, node.inputs[0], add.outputs[0], (node, add), True)
    return LinearLayer("matmul", shape, read, np.zeros(out), node.inputs[0], mm_out, (node,), False)


def _match_conv(graph: gs.Graph, node: gs.Node) -> LinearLayer | Skip:
    a = node.attrs
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return Skip(node.name, f"Conv with auto_pad={a.get('auto_pad')}")
    w = _weight_constant(graph, node, 1)
    if isinstance(w, Skip):
        return w
    shape = tuple(int(d) for d in w.shape)
    out = shape[0]
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name != ""
    bias = np.zeros(out)
    if has_bias:
        b = node.inputs[2]
        if not isinstance(b, gs.Constant) or len(b.outputs) > 1:
            return Skip(node.name, "Conv bias is not an unshared constant")
        bias = np.asarray(b.values).astype(np.float64).reshape(out)
    nd = len(shape) - 2
    attrs = {
        "group": int(a.get("group", 1)),
        "pads": list(a.get("pads", [0] * 2 * nd)),
        "strides": list(a.get("strides", [1] * nd)),
        "dilations": list(a.get("dilations", [1] * nd)),
        "kernel_shape": list(shape[2:]),
    }
    return LinearLayer("conv", shape, _float64(w), bias, node.inputs[0], node.outputs[0], (node,), has_bias, attrs)


_MATCHERS = {"Gemm": _match_gemm, "MatMul": _match_matmul, "Conv": _match_conv}


def match_linear_layer(graph: gs.Graph, node: gs.Node) -> LinearLayer | Skip | None:
    """The linear-layer view of ``node``; None when the op is not a linear layer at all."""
    matcher = _MATCHERS.get(node.op)
    if matcher is None or node.domain not in (None, "", "ai.onnx"):
        return None
    return matcher(graph, node)


def producer_layer(graph: gs.Graph, tensor: gs.Tensor) -> LinearLayer | Skip | None:
    """The linear layer whose output is ``tensor`` (through MatMul+Add), if any."""
    if not tensor.inputs:
        return None
    node = tensor.inputs[0]
    if node.op == "Add" and node.inputs and any(i.inputs and i.inputs[0].op == "MatMul" for i in node.inputs):
        mm = next(i.inputs[0] for i in node.inputs if i.inputs and i.inputs[0].op == "MatMul")
        layer = match_linear_layer(graph, mm)
        if isinstance(layer, LinearLayer) and layer.output is tensor:
            return layer
        return layer if isinstance(layer, Skip) else None
    layer = match_linear_layer(graph, node)
    if isinstance(layer, LinearLayer) and layer.output is not tensor:
        return Skip(layer.name, "MatMul output is read by more than its bias Add")
    return layer


def write_linear_layer(graph: gs.Graph, names: NameSource, layer: LinearLayer, weight: np.ndarray,
                       bias: np.ndarray, keep_bias: bool | None = None) -> LinearLayer:
    """Replace ``layer``'s parameters with ``weight`` (out-major) and ``bias``; returns the new view.

    The dtype of the original weight is kept. A bias input is added when the new bias is non-zero.
    """
    head = layer.nodes[0]
    dtype = _dtype(head.inputs[1])
    need_bias = layer.has_bias or bool(np.any(bias != 0)) if keep_bias is None else keep_bias
    w_const = gs.Constant(names.fresh(head.inputs[1].name), np.ascontiguousarray(weight, dtype=dtype))
    b_values = np.ascontiguousarray(bias, dtype=dtype)
    nodes = layer.nodes
    if layer.kind == "gemm":
        head.inputs[1] = w_const
        head.attrs.update({"transA": 0, "transB": 1, "alpha": 1.0, "beta": 1.0})
        b_const = gs.Constant(names.fresh(f"{head.name or 'gemm'}_bias"), b_values)
        if len(head.inputs) > 2:
            head.inputs[2] = b_const
        else:
            head.inputs.append(b_const)
        need_bias = True
    elif layer.kind == "conv":
        head.inputs[1] = w_const
        if "kernel_shape" in head.attrs:
            head.attrs["kernel_shape"] = [int(k) for k in weight.shape[2:]]
        if need_bias:
            b_const = gs.Constant(names.fresh(f"{head.name or 'conv'}_bias"), b_values)
            if len(head.inputs) > 2:
                head.inputs[2] = b_const
            else:
                head.inputs.append(b_const)
    else:
        head.inputs[1] = gs.Constant(names.fresh(head.inputs[1].name), np.ascontiguousarray(weight.T, dtype=dtype))
        if len(nodes) == 2:
            add = nodes[1]
            idx = 1 if add.inputs[0] is head.outputs[0] else 0
            add.inputs[idx] = gs.Constant(names.fresh(f"{head.name or 'matmul'}_bias"), b_values)
            need_bias = True
        elif need_bias:
            out = layer.output
            mid = gs.Variable(names.fresh(f"{out.name}_mm"), dtype=out.dtype)
            head.outputs[0] = mid
            add = gs.Node("Add", names.fresh(f"{head.name or 'matmul'}_bias_add"),
                          inputs=[mid, gs.Constant(names.fresh(f"{head.name or 'matmul'}_bias"), b_values)],
                          outputs=[out])
            graph.nodes.append(add)
            nodes = (head, add)
    return LinearLayer(layer.kind, tuple(int(d) for d in weight.shape), lambda: np.asarray(weight, dtype=np.float64),
                       bias, layer.input, layer.output, nodes, need_bias, layer.conv_attrs)


__all__ = ["LinearLayer", "Skip", "match_linear_layer", "producer_layer", "write_linear_layer",
           "is_graph_output"]
