"""Small graph-editing primitives shared by canonicalisation and the passes."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs


class NameSource:
    """Hands out tensor and node names that do not clash with anything in the graph."""

    def __init__(self, graph: gs.Graph):
        self._taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes if n.name}
        self._counter = itertools.count()

    def fresh(self, base: str) -> str:
        base = base or "t"
        name = base
        while name in self._taken:
            name = f"{base}__lc{next(self._counter)}"
        self._taken.add(name)
        return name


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor, or None when it is computed at run time."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def only_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The node that is the single reader of ``tensor`` (None when shared or a graph output)."""
    if is_graph_output(graph, tensor) or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def reroute_consumers(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every reader of ``old`` read ``new`` instead (graph outputs included)."""
    for consumer in list(old.outputs):
        replace_input(consumer, old, new)
    for i, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[i] = new


def refresh_shapes(graph: gs.Graph) -> None:
    """Re-infer intermediate shapes after a rewrite changed widths (cleared where inference fails)."""
    keep = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
    variables = [t for t in graph.tensors().values() if isinstance(t, gs.Variable) and id(t) not in keep]
    for tensor in variables:
        tensor.shape = None
    try:
        model = gs.export_onnx(graph, do_type_check=False)
        if model.ByteSize() >= 2**31 - 1:
            return
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # shapes are a refinement: passes skip sites whose shapes are unknown
        return
    shapes = {}
    for vi in inferred.graph.value_info:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    for tensor in variables:
        if tensor.name in shapes:
            tensor.shape = shapes[tensor.name]
