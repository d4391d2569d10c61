"""The network from its input to its last Relu as a chain of dense affine maps and Relus.

Exact mode reasons about ``z_l = W_l h_{l-1} + b_l``, ``h_l = relu(z_l)`` with ``h_0`` the flattened input.
Every op between two Relus must be affine in its data input (Gemm, MatMul, Conv, BatchNormalization,
pooling by averaging, Pad with zeros, Add/Sub/Mul/Div by constants, and layout ops); consecutive
affine ops are composed into one dense matrix. Each op's matrix is read off onnxruntime itself (the op
applied to zero and to the unit vectors), so attributes such as pads, strides, dilations, groups and
Gemm's alpha/beta are honoured exactly. The chain stops (with a reason) at a branch such as a residual
connection, at a non-affine op, or when a dense matrix would be too large; Relus after that point are
reported as not certified.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ..graph_edit import constant_value, is_graph_output
from ..relu_sites import relu_nodes
from ..runtime.session import SessionOptions, open_session

LAYOUT_OPS = {"Flatten", "Reshape", "Identity", "Dropout", "Squeeze", "Unsqueeze"}
AFFINE_OPS = {"Gemm", "MatMul", "Conv", "ConvTranspose", "BatchNormalization", "AveragePool", "GlobalAveragePool",
              "Pad", "Add", "Sub", "Mul", "Div", "Transpose"}
MAX_DENSE_ENTRIES = 40_000_000


@dataclass(frozen=True, eq=False)
class ChainLayer:
    relu: str
    weight: np.ndarray  # (n_l, n_{l-1})
    bias: np.ndarray  # (n_l,)
    channel_of: np.ndarray  # channel index of every flat unit
    channels: int

    @property
    def width(self) -> int:
        return int(self.bias.size)


@dataclass(frozen=True, eq=False)
class AffineChain:
    input: str
    input_size: int
    layers: tuple[ChainLayer, ...]
    stop_reason: str
    uncovered: tuple[str, ...]

    def forward(self, x: np.ndarray) -> list[np.ndarray]:
        """Pre-activations of every layer for flattened inputs ``x`` (n, input_size), in float64."""
        h = np.asarray(x, np.float64).reshape(len(x), -1)
        zs = []
        for layer in self.layers:
            z = h @ layer.weight.T + layer.bias
            zs.append(z)
            h = np.maximum(z, 0)
        return zs


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


def extract_chain(graph: gs.Graph, input_shape: tuple[int, ...], opset: int) -> AffineChain:
    """The affine/Relu chain from the single graph input to the last Relu it can reach."""
    x = graph.inputs[0]
    all_relus = [r.name for r in relu_nodes(graph)]
    shape = (1,) + tuple(input_shape)
    n0 = int(np.prod(input_shape))
    a, c = np.eye(n0), np.zeros(n0)
    t, layers, stop = x, [], ""
    while len(layers) < len(all_relus):
        if is_graph_output(graph, t) and not t.outputs:
            stop = f"'{t.name}' is a graph output before the last Relu"
            break
        if len(t.outputs) != 1:
            stop = f"tensor '{t.name}' has {len(t.outputs)} readers (branch or residual connection)"
            break
        node = t.outputs[0]
        if node.op == "Relu":
            spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            channel_of = np.arange(c.size) // spatial
            layers.append(ChainLayer(node.name, a, c, channel_of, int(channel_of.max()) + 1 if c.size else 0))
            a, c = np.eye(c.size), np.zeros(c.size)
            t = node.outputs[0]
            continue
        if node.op in LAYOUT_OPS or (node.op == "Cast" and int(node.attrs.get("to", 0)) == onnx.TensorProto.FLOAT):
            out_shape = node.outputs[0].shape
            t = node.outputs[0]
            shape = ((1, c.size) if out_shape is None
                     else (1,) + tuple(int(d) if isinstance(d, int) else -1 for d in out_shape[1:]))
            if -1 in shape[1:]:
                shape = (1, c.size)
            continue
        if node.op not in AFFINE_OPS or not _affine_inputs_ok(node, t):
            stop = f"{node.op} '{node.name}' is not an affine op of its data input"
            break
        size_in = c.size
        if size_in * size_in > MAX_DENSE_ENTRIES:
            stop = f"{node.op} '{node.name}': input of {size_in} features is too large for dense exact analysis"
            break
        try:
            m, c0, shape = _linearize_with_ort(node, t, (1,) + tuple(shape[1:]) if len(shape) > 1 else (1, size_in),
                                               opset)
        except Exception as exc:  # an op onnxruntime cannot run alone: end the chain here
            stop = f"{node.op} '{node.name}' could not be linearised ({str(exc).splitlines()[0][:80]})"
            break
        if m.size > MAX_DENSE_ENTRIES:
            stop = f"{node.op} '{node.name}': dense map of {m.shape[0]}x{m.shape[1]} is too large for exact analysis"
            break
        a, c = m @ a, m @ c + c0
        t = node.outputs[0]
    covered = {layer.relu for layer in layers}
    return AffineChain(x.name, n0, tuple(layers), stop, tuple(r for r in all_relus if r not in covered))
