"""The network from its input to its last Relu as a DAG of dense affine maps, Relus and max-pools.

Exact mode reasons about layers ``z_l = sum_s W_{l,s} h_s + b_l`` where each source ``s`` is the flat
input (``s = -1``: every boxed graph input flattened, concatenated in the domain's order; several inputs
meet through ``Add``/``Sub``/``Concat`` like any other branches) or the output of an earlier layer, and
``h_l = relu(z_l)`` (a Relu layer) or ``h_l[o] = max_{p in pool(o)} z_l[p]`` (a MaxPool layer). Every op
between them must be affine in its data input (Gemm, MatMul, Conv, BatchNormalization, pooling by averaging,
Pad with zeros, Add/Sub/Mul/Div by constants, and layout ops); consecutive affine ops are composed into one
dense matrix per source. Each op's matrix is read off onnxruntime itself (the op applied to zero and to the
unit vectors), so attributes such as pads, strides, dilations, groups and Gemm's alpha/beta are honoured
exactly; a MaxPool's windows are read off onnxruntime the same way. Branches are followed: a tensor may have
several readers, ``Add``/``Sub`` of two affine tensors of the same shape (a residual connection) and
``Concat`` join their sources. A Relu is left out (with a reason) when its input passes through an op that is
none of these, or when a dense matrix would be too large; it is reported as not certified.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ..graph_edit import constant_value
from ..relu_sites import relu_nodes
from ..runtime.session import SessionOptions, open_session

LAYOUT_OPS = {"Flatten", "Reshape", "Identity", "Dropout", "Squeeze", "Unsqueeze"}
AFFINE_OPS = {"Gemm", "MatMul", "Conv", "ConvTranspose", "BatchNormalization", "AveragePool", "GlobalAveragePool",
              "Pad", "Add", "Sub", "Mul", "Div", "Transpose"}
MAX_DENSE_ENTRIES = 40_000_000


@dataclass(frozen=True, eq=False)
class ChainLayer:
    relu: str  # the Relu (or MaxPool) node's name
    inputs: tuple[tuple[int, np.ndarray], ...]  # (source, W): source -1 is the input, j the output of layer j
    bias: np.ndarray  # (n_l,)
    channel_of: np.ndarray  # channel index of every flat unit of z
    channels: int
    kind: Literal["relu", "max"] = "relu"
    pools: np.ndarray | None = field(default=None, repr=False)  # max: (outputs, window) indices into z
    index: int = 0

    @property
    def width(self) -> int:
        """Units of the pre-activation ``z``."""
        return int(self.bias.size)

    @property
    def out_size(self) -> int:
        return self.width if self.kind == "relu" else int(self.pools.shape[0])

    @property
    def weight(self) -> np.ndarray:
        """``W`` of a layer whose only source is the layer before it (or the input, for the first)."""
        if len(self.inputs) != 1 or self.inputs[0][0] != self.index - 1:
            raise ValueError(f"layer '{self.relu}' reads {[s for s, _ in self.inputs]}, not only the layer before")
        return self.inputs[0][1]

    def output(self, z: np.ndarray) -> np.ndarray:
        """``h`` from ``z`` (rows are points)."""
        return np.maximum(z, 0) if self.kind == "relu" else z[:, self.pools].max(axis=2)


@dataclass(frozen=True, eq=False)
class AffineChain:
    inputs: tuple[str, ...]  # the graph inputs whose flattened samples, concatenated, are the source -1
    input_size: int
    layers: tuple[ChainLayer, ...]
    stop_reason: str
    uncovered: tuple[str, ...]

    @property
    def is_sequential(self) -> bool:
        """Relu layers only, each reading only the layer before it."""
        return all(layer.kind == "relu" and len(layer.inputs) == 1 and layer.inputs[0][0] == k - 1
                   for k, layer in enumerate(self.layers))

    @property
    def relu_layers(self) -> list[int]:
        return [k for k, layer in enumerate(self.layers) if layer.kind == "relu"]

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Pre-activations of every layer for flattened inputs ``x`` (n, input_size), in float64."""
        h = {-1: np.asarray(x, np.float64).reshape(len(x), -1)}
        zs = []
        for k, layer in enumerate(self.layers):
            z = np.broadcast_to(layer.bias, (len(h[-1]), layer.width)).copy()
            for src, w in layer.inputs:
                z += h[src] @ w.T
            zs.append(z)
            h[k] = layer.output(z)
        return zs

    def gradient(self, k: int, i: int, x: np.ndarray) -> np.ndarray:
        """d z_{k,i} / d x at the point ``x`` (the network is affine on the point's activation region)."""
        zs = self.forward(x[None, :])
        acc: dict[int, np.ndarray] = {}
        self._spread(k, np.eye(1, self.layers[k].width, i)[0], acc)
        for j in range(k - 1, -1, -1):
            if j not in acc:
                continue
            a, layer = acc.pop(j), self.layers[j]
            if layer.kind == "relu":
                coef = a * (zs[j][0] > 0)
            else:
                coef = np.zeros(layer.width)
                np.add.at(coef, layer.pools[np.arange(layer.out_size), zs[j][0][layer.pools].argmax(axis=1)], a)
            self._spread(j, coef, acc)
        return acc.get(-1, np.zeros(self.input_size))

    def _spread(self, k: int, coef: np.ndarray, acc: dict[int, np.ndarray]) -> None:
        for src, w in self.layers[k].inputs:
            acc[src] = acc[src] + coef @ w if src in acc else coef @ w


@dataclass
class _Expr:
    """A tensor as an affine function of the sources: ``sum_s terms[s] @ h_s + const``, with its shape."""

    terms: dict[int, np.ndarray]
    const: np.ndarray
    shape: tuple[int, ...]  # one sample, with a leading 1

    @property
    def size(self) -> int:
        return int(self.const.size)


def _affine_inputs_ok(node: gs.Node, data: gs.Tensor) -> bool:
    """The node is affine in ``data``: every other input is a constant (data may be either operand of Add/Mul)."""
    others = [t for t in node.inputs if t is not data and t is not None and t.name]
    if any(not isinstance(t, gs.Constant) for t in others) or sum(1 for t in node.inputs if t is data) != 1:
        return False
    return node.op in ("Add", "Mul") or node.inputs[0] is data


def _linearize_with_ort(node: gs.Node, data: gs.Tensor, shape: tuple[int, ...],
                        opset: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(M, c, output shape) with ``op(x) = M x + c`` read off onnxruntime on zero and unit inputs."""
    size = int(np.prod(shape[1:]))
    inputs, inits = [], []
    for i, t in enumerate(node.inputs):
        if t is data:
            inputs.append("x")
        elif t is None or not t.name:
            inputs.append("")
        else:
            inits.append(onnx.numpy_helper.from_array(np.asarray(constant_value(t)), f"c{i}"))
            inputs.append(f"c{i}")
    attrs = dict(node.attrs)
    onnx_node = helper.make_node(node.op, inputs, ["y"],
                                 **{k: (v.values if isinstance(v, gs.Constant) else v) for k, v in attrs.items()})
    graph = helper.make_graph([onnx_node], "op", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    sess = open_session(model, options=SessionOptions(optimize=False, log_level=4))
    basis = np.concatenate([np.zeros((1, size), np.float32),
                            np.eye(size, dtype=np.float32)]).reshape((size + 1,) + shape[1:])
    out = np.asarray(sess.run(None, {"x": basis})[0], np.float64)
    c = out[0].reshape(-1)
    m = (out[1:].reshape(size, -1) - c).T
    return m, c, (1,) + out.shape[1:]


def _pool_windows(node: gs.Node, shape: tuple[int, ...], opset: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """(windows, output shape) of a MaxPool: row ``o`` lists the flat inputs whose max is output ``o``
    (read off onnxruntime: each input position alone at +1 over a floor of -1), padded by repeating one."""
    size = int(np.prod(shape[1:]))
    basis = np.where(np.eye(size, dtype=np.float32) > 0, np.float32(1), np.float32(-1)).reshape((size,) + shape[1:])
    onnx_node = helper.make_node("MaxPool", ["x"], ["y"], **dict(node.attrs))
    graph = helper.make_graph([onnx_node], "op", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    sess = open_session(model, options=SessionOptions(optimize=False, log_level=4))
    out = np.asarray(sess.run(None, {"x": basis})[0])
    member = out.reshape(size, -1).T > 0  # (outputs, inputs)
    width = int(member.sum(axis=1).max())
    windows = np.zeros((member.shape[0], width), int)
    for o, row in enumerate(member):
        idx = np.flatnonzero(row)
        windows[o] = np.concatenate([idx, np.full(width - idx.size, idx[0])])
    return windows, (1,) + out.shape[1:]


class _Stop(Exception):
    """The op cannot be followed: its outputs are not affine in the sources."""


def _channels(shape: tuple[int, ...], size: int) -> tuple[np.ndarray, int]:
    spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    channel_of = np.arange(size) // max(spatial, 1)
    return channel_of, int(channel_of.max()) + 1 if size else 0


def _compose(m: np.ndarray, c0: np.ndarray, e: _Expr, shape: tuple[int, ...], what: str) -> _Expr:
    if any(m.shape[0] * w.shape[1] > MAX_DENSE_ENTRIES for w in e.terms.values()):
        raise _Stop(f"{what}: dense map of {m.shape[0]} rows is too large for exact analysis")
    return _Expr({s: m @ w for s, w in e.terms.items()}, m @ e.const + c0, shape)


def _join(parts: list[_Expr], signs: list[float], shape: tuple[int, ...]) -> _Expr:
    terms: dict[int, np.ndarray] = {}
    for e, sign in zip(parts, signs, strict=True):
        for src, w in e.terms.items():
            terms[src] = terms[src] + sign * w if src in terms else sign * w
    return _Expr(terms, sum(sign * e.const for e, sign in zip(parts, signs, strict=True)), shape)


def _concat(node: gs.Node, exprs: dict[str, _Expr]) -> _Expr:
    """Rows of the inputs in the order Concat lays them out (constants contribute constant rows)."""
    parts = []
    for t in node.inputs:
        if t.name in exprs:
            parts.append(exprs[t.name])
        elif constant_value(t) is not None:
            v = np.asarray(constant_value(t), np.float64)
            parts.append(_Expr({}, v.reshape(-1), (1,) + v.shape[1:]))
        else:
            raise _Stop(f"Concat '{node.name}' joins a tensor that is neither affine nor constant")
    axis = int(node.attrs.get("axis", 1))
    offsets = np.cumsum([0] + [p.size for p in parts])
    ids = np.concatenate([np.arange(o, o + p.size).reshape(p.shape) for o, p in zip(offsets, parts, strict=False)],
                         axis=axis).reshape(-1)
    rows = sum(p.size for p in parts)
    terms: dict[int, np.ndarray] = {}
    const = np.concatenate([p.const for p in parts])[ids]
    for o, p in zip(offsets, parts, strict=False):
        for src, w in p.terms.items():
            full = terms.setdefault(src, np.zeros((rows, w.shape[1])))
            full[o:o + p.size] += w
    out_shape = (1,) + tuple(np.concatenate([np.zeros(p.shape) for p in parts], axis=axis).shape[1:])
    return _Expr({src: w[ids] for src, w in terms.items()}, const, out_shape)


def _layout(node: gs.Node, e: _Expr) -> _Expr:
    out_shape = node.outputs[0].shape
    shape = ((1, e.size) if out_shape is None
             else (1,) + tuple(int(d) if isinstance(d, int) else -1 for d in out_shape[1:]))
    return _Expr(e.terms, e.const, (1, e.size) if -1 in shape[1:] else shape)


def _follow(node: gs.Node, exprs: dict[str, _Expr], layers: list[ChainLayer], opset: int) -> _Expr:
    """The expression of ``node``'s output (a new layer for Relu and MaxPool); raises _Stop."""
    data = [t for t in node.inputs if t is not None and t.name in exprs]
    e = exprs[data[0].name]
    if node.op in ("Relu", "MaxPool"):
        k = len(layers)
        if node.op == "MaxPool":
            if len(node.outputs) > 1 and node.outputs[1].outputs:
                raise _Stop(f"MaxPool '{node.name}': its Indices output is read")
            pools, shape = _pool_windows(node, e.shape, opset)
        else:
            pools, shape = None, e.shape
        channel_of, channels = _channels(e.shape, e.size)
        layers.append(ChainLayer(node.name, tuple(sorted(e.terms.items(), key=lambda kv: kv[0])), e.const,
                                 channel_of, channels, "relu" if pools is None else "max", pools, k))
        n = e.size if pools is None else pools.shape[0]
        return _Expr({k: np.eye(n)}, np.zeros(n), shape)
    if node.op in LAYOUT_OPS or (node.op == "Cast" and int(node.attrs.get("to", 0)) == onnx.TensorProto.FLOAT):
        return _layout(node, e)
    if node.op == "Concat":
        return _concat(node, exprs)
    if node.op in ("Add", "Sub") and len(data) == 2:
        a, b = exprs[node.inputs[0].name], exprs[node.inputs[1].name]
        if a.shape[1:] != b.shape[1:]:
            raise _Stop(f"{node.op} '{node.name}' joins tensors of shapes {a.shape[1:]} and {b.shape[1:]}")
        return _join([a, b], [1.0, 1.0 if node.op == "Add" else -1.0], a.shape)
    if node.op not in AFFINE_OPS or not _affine_inputs_ok(node, data[0]):
        raise _Stop(f"{node.op} '{node.name}' is not an affine op of its data input")
    if e.size * e.size > MAX_DENSE_ENTRIES:
        raise _Stop(f"{node.op} '{node.name}': input of {e.size} features is too large for dense exact analysis")
    try:
        m, c0, shape = _linearize_with_ort(node, data[0], e.shape if len(e.shape) > 1 else (1, e.size), opset)
    except Exception as exc:  # an op onnxruntime cannot run alone: stop following it
        raise _Stop(f"{node.op} '{node.name}' could not be linearised ({str(exc).splitlines()[0][:80]})") from exc
    if m.size > MAX_DENSE_ENTRIES:
        raise _Stop(f"{node.op} '{node.name}': dense map of {m.shape[0]}x{m.shape[1]} is too large for exact analysis")
    return _compose(m, c0, e, shape, f"{node.op} '{node.name}'")


def _ancestors_of_relus(graph: gs.Graph) -> set[int]:
    """ids of the nodes some Relu depends on (the Relus included): nothing after the last Relu is analysed."""
    seen: set[int] = set()
    stack = list(relu_nodes(graph))
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(p for t in node.inputs if t is not None for p in t.inputs)
    return seen


def _input_exprs(graph: gs.Graph, shapes: tuple[int, ...] | Mapping[str, tuple[int, ...]]) -> tuple[dict, int]:
    """Each boxed graph input as rows of the flat input vector (the inputs in ``shapes`` order, concatenated);
    a plain shape tuple is the single (first) graph input's."""
    if not isinstance(shapes, Mapping):
        shapes = {graph.inputs[0].name: tuple(shapes)}
    sizes = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    total = sum(sizes.values())
    exprs, offset = {}, 0
    for name, shape in shapes.items():
        n = sizes[name]
        rows = np.zeros((n, total))
        rows[:, offset:offset + n] = np.eye(n)
        exprs[name] = _Expr({-1: rows}, np.zeros(n), (1,) + tuple(shape))
        offset += n
    return exprs, total


def extract_chain(graph: gs.Graph, shapes: tuple[int, ...] | Mapping[str, tuple[int, ...]], opset: int) -> AffineChain:
    """Every Relu (and MaxPool) reachable from the boxed graph inputs through affine ops, as layers of a DAG.
    ``shapes``: one sample's shape per input (the flat input vector concatenates them in this order), or one
    shape for the first graph input."""
    all_relus = [r.name for r in relu_nodes(graph)]
    exprs, n0 = _input_exprs(graph, shapes)
    names = tuple(exprs)
    layers: list[ChainLayer] = []
    stops: list[str] = []
    wanted = _ancestors_of_relus(graph)
    for node in graph.nodes:
        if id(node) not in wanted or not any(t is not None and t.name in exprs for t in node.inputs):
            continue
        try:
            exprs[node.outputs[0].name] = _follow(node, exprs, layers, opset)
        except _Stop as stop:
            stops.append(str(stop))
    covered = {layer.relu for layer in layers}
    uncovered = tuple(r for r in all_relus if r not in covered)
    return AffineChain(names, n0, tuple(layers), stops[0] if stops and uncovered else "", uncovered)
