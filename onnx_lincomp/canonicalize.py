"""Canonical form before analysis: constants lifted, initializer inputs dropped, BatchNorm folded.

BatchNorm folding: ``BN(z) = gamma * (z - mean) / sqrt(var + eps) + beta`` is affine per channel, so with
``s = gamma / sqrt(var + eps)`` a preceding linear layer ``z = W x + b`` becomes
``W' = s[:, None] * W`` and ``b' = s * (b - mean) + beta``. It is exact when the BN reads only that
layer's output and normalises the layer's output-channel axis (axis 1 of a Conv output or of a 2-D
Gemm/MatMul output). A BN anywhere else (after a Relu, after a 3-D MatMul) is left in place with a
reason: folding it backwards across a Relu would change the function.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph_edit import NameSource, is_graph_output, only_consumer
from .linear_layer import Skip, producer_layer, write_linear_layer
from .model_io import ModelContext


@dataclass(frozen=True)
class CanonicalizeReport:
    constants_lifted: int = 0
    initializer_inputs_dropped: int = 0
    batchnorms_folded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"constants_lifted": self.constants_lifted,
                "initializer_inputs_dropped": self.initializer_inputs_dropped,
                "batchnorms_folded": self.batchnorms_folded, "skipped": dict(self.skipped)}


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return np.asarray(attrs["value"].values)
    if "value" in attrs and isinstance(attrs["value"], onnx.TensorProto):
        return onnx.numpy_helper.to_array(attrs["value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None


def lift_constant_nodes(graph: gs.Graph) -> int:
    """Turn top-level ``Constant`` nodes into initializers (Paddle and others store weights so)."""
    lifted = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if is_graph_output(graph, out):
            continue
        value = _constant_node_value(node)
        if value is None:
            continue
        const = gs.Constant(out.name, np.array(value))
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        node.outputs.clear()
        lifted += 1
    if lifted:
        graph.cleanup(remove_unused_graph_inputs=False)
    return lifted


def drop_initializer_inputs(graph: gs.Graph) -> int:
    """Initializers also listed as graph inputs (IR < 4 style) become plain constants."""
    before = len(graph.inputs)
    graph.inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    return before - len(graph.inputs)


def _bn_params(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    if len(node.outputs) != 1 or int(node.attrs.get("training_mode", 0)):
        return "BatchNormalization in training mode"
    params = node.inputs[1:5]
    if len(params) != 4 or not all(isinstance(p, gs.Constant) for p in params):
        return "BatchNormalization parameters are not constants"
    gamma, beta, mean, var = (np.asarray(p.values).astype(np.float64).reshape(-1) for p in params)
    scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return scale, beta - scale * mean


def _fold_one_batchnorm(graph: gs.Graph, names: NameSource, bn: gs.Node) -> str | None:
    """Fold ``bn`` into its producer layer; returns a skip reason or None when folded."""
    x = bn.inputs[0]
    layer = producer_layer(graph, x)
    if layer is None:
        producer = x.inputs[0].op if x.inputs else "graph input"
        return f"BatchNormalization after {producer} (not a linear layer)"
    if isinstance(layer, Skip):
        return f"BatchNormalization after a layer that cannot be rewritten: {layer.reason}"
    if only_consumer(graph, x) is not bn:
        return "BatchNormalization input has other readers"
    if layer.kind != "conv" and (x.shape is None or len(x.shape) != 2):
        return "BatchNormalization after MatMul/Gemm with output rank other than 2"
    params = _bn_params(bn)
    if isinstance(params, str):
        return params
    scale, shift = params
    if scale.size != layer.out_features:
        return "BatchNormalization width differs from the layer's output channels"
    expand = (slice(None),) + (None,) * (layer.weight.ndim - 1)
    new_layer = write_linear_layer(graph, names, layer, layer.weight * scale[expand],
                                   layer.bias * scale + shift, keep_bias=True)
    y = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    new_layer.nodes[-1].outputs[0] = y
    return None


def fold_batchnorms(graph: gs.Graph) -> tuple[int, Counter]:
    names = NameSource(graph)
    folded, skipped = 0, Counter()
    for node in list(graph.nodes):
        if node.op != "BatchNormalization" or not node.inputs:
            continue
        reason = _fold_one_batchnorm(graph, names, node)
        if reason is None:
            folded += 1
        else:
            skipped[reason] += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return folded, skipped


def name_nodes(graph: gs.Graph) -> None:
    """Give every unnamed or duplicate-named node a unique name (reports and statistics key on it)."""
    names = NameSource(graph)
    seen: set[str] = set()
    for node in graph.nodes:
        if not node.name or node.name in seen:
            node.name = names.fresh(f"{node.op}_{node.outputs[0].name if node.outputs else 'node'}")
        seen.add(node.name)


def canonicalize(graph: gs.Graph, fold_bn: bool = True, ctx: ModelContext | None = None) -> CanonicalizeReport:
    """Bring ``graph`` (mutated in place) into the canonical form the analyses and passes expect.

    ``ctx`` (when given) reports initializers that the source listed as graph inputs; the importer
    already dropped them from the graph's inputs.
    """
    name_nodes(graph)
    lifted = lift_constant_nodes(graph)
    dropped = drop_initializer_inputs(graph) + (ctx.initializer_inputs if ctx is not None else 0)
    folded, skipped = fold_batchnorms(graph) if fold_bn else (0, Counter())
    return CanonicalizeReport(lifted, dropped, folded, dict(skipped))
