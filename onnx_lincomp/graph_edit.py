"""Small graph-editing primitives shared by canonicalisation and the passes."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)

# Above this many bytes of constants, shapes are inferred on a weightless copy (the model itself may not
# fit one protobuf); constants up to WEIGHTLESS_KEEP_BYTES stay in the copy for data propagation.
WEIGHTLESS_ABOVE_BYTES = 2**29
WEIGHTLESS_KEEP_BYTES = 1024


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
    """Whether ``tensor`` is part of the graph's fixed interface: one of its outputs, or a tensor an If / Loop /
    Scan body reads from the outer scope (graphsurgeon lists such a body's nodes among the tensor's consumers,
    but a rewrite of the top-level graph cannot see, and must not change, what the body does with it)."""
    return _output(graph, tensor) or tensor.name in subgraph_reads(graph)


def interface_role(graph: gs.Graph, tensor: gs.Tensor) -> str:
    """How ``tensor`` is part of the fixed interface (for skip reasons): 'a graph output' or 'read inside an
    If/Loop/Scan body'."""
    return "a graph output" if _output(graph, tensor) else "read inside an If/Loop/Scan body"


def _output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def node_bodies(node: gs.Node):
    """The graphs a node holds in its attributes (If branches, Loop / Scan bodies)."""
    for value in node.attrs.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(sub, gs.Graph):
                yield sub


def _outer_reads(body: gs.Graph) -> set[str]:
    """Names ``body`` (and the bodies nested in it) reads without computing or receiving them itself."""
    local = {t.name for t in body.inputs} | {t.name for n in body.nodes for t in n.outputs}
    reads = {t.name for n in body.nodes for t in n.inputs if t.name}
    for node in body.nodes:
        for inner in node_bodies(node):
            reads |= _outer_reads(inner)
    return reads - local


def subgraph_reads(graph: gs.Graph) -> frozenset[str]:
    """Names of ``graph``'s tensors that a node's body (If branches, Loop / Scan bodies, recursively) reads from
    the outer scope. Kept on the graph object while its node list is the same (``is_graph_output`` asks for
    every tensor an analysis visits; a scan of the nodes whenever their list or count changed)."""
    count = (id(graph.nodes), len(graph.nodes))
    cached = graph.__dict__.get("_lincomp_subgraph_reads")
    if cached is not None and cached[0] == count:
        return cached[1]
    names: set[str] = set()
    for node in graph.nodes:
        for body in node_bodies(node):
            names |= _outer_reads(body)
    found = frozenset(names)
    graph.__dict__["_lincomp_subgraph_reads"] = (count, found)
    return found


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


@dataclass(frozen=True)
class ShapeRefresh:
    """What :func:`refresh_shapes` did: whether new shapes were inferred, and why not (or how) otherwise."""

    inferred: bool
    reason: str = ""
    weightless: bool = False  # inferred on a copy whose large constants were typed graph inputs
    shapes: int = 0  # intermediate tensors that have a shape after the refresh


def upstream_sites(graph: gs.Graph, sites: set[str]) -> dict[str, frozenset[str]]:
    """For every tensor name, the nodes among ``sites`` on some path into it (the graph is acyclic)."""
    producer = {t.name: n for n in graph.nodes for t in n.outputs}
    memo: dict[str, frozenset[str]] = {}
    for root in producer:
        stack = [root]
        while stack:
            name = stack[-1]
            if name in memo:
                stack.pop()
                continue
            node = producer.get(name)
            inputs = [] if node is None else [t.name for t in node.inputs if t.name]
            waiting = [t for t in inputs if t not in memo]
            if waiting:
                stack.extend(waiting)
                continue
            found = set().union(*(memo[t] for t in inputs))
            if node is not None and node.name in sites:
                found.add(node.name)
            memo[name] = frozenset(found)
            stack.pop()
    return memo


def _constant_bytes(graph: gs.Graph) -> int:
    """Bytes of the graph's constant tensors, read without loading lazy values."""
    return sum(int(t._values.nbytes) for t in graph.tensors().values() if isinstance(t, gs.Constant))


def _weightless_copy(graph: gs.Graph, keep_bytes: int) -> gs.Graph:
    """A copy whose constants over ``keep_bytes`` are typed graph inputs (values are shared, not copied):
    shape inference on it needs only the small shape, axes and index constants, whatever the model size."""
    copy = graph.copy()
    for tensor in list(copy.tensors().values()):
        if isinstance(tensor, gs.Constant) and int(tensor._values.nbytes) > keep_bytes:
            typed = gs.Variable(tensor.name, dtype=tensor.export_dtype, shape=list(tensor.shape))
            for node in list(tensor.outputs):
                replace_input(node, tensor, typed)
            copy.inputs.append(typed)
    return copy


def _infer(graph: gs.Graph, weightless: bool) -> dict[str, list]:
    """Intermediate shapes by onnx shape inference (raises when export or inference fails)."""
    source = _weightless_copy(graph, WEIGHTLESS_KEEP_BYTES) if weightless else graph
    model = gs.export_onnx(source, do_type_check=False)
    del model.graph.value_info[:]  # stale: inferred afresh
    model.ir_version = max(model.ir_version, 4)  # IR 3 would want every initializer listed as an input
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    shapes = {}
    for vi in inferred.graph.value_info:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return shapes


def refresh_shapes(graph: gs.Graph, weightless_above: int = WEIGHTLESS_ABOVE_BYTES) -> ShapeRefresh:
    """Re-infer intermediate shapes after a rewrite changed widths.

    Shapes are inferred first and replaced only when inference succeeded: then every intermediate tensor
    gets its new shape (or none, where inference could not tell). When export or inference fails the old
    shapes stay, a warning is logged and the result says why. Graphs whose constants take more than
    ``weightless_above`` bytes are inferred on a weightless copy (large constants as typed inputs), so a
    model over the 2 GiB protobuf limit still gets shapes.
    """
    keep = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
    variables = [t for t in graph.tensors().values() if isinstance(t, gs.Variable) and id(t) not in keep]
    weightless = _constant_bytes(graph) > weightless_above
    try:
        shapes = _infer(graph, weightless)
    except Exception as exc:  # onnx and graphsurgeon raise plain exceptions; shapes are a refinement
        reason = f"shape inference failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        logger.warning("%s; keeping the previous shapes", reason)
        return ShapeRefresh(False, reason, weightless)
    for tensor in variables:
        tensor.shape = shapes.get(tensor.name)
    known = sum(1 for t in variables if t.shape is not None)
    return ShapeRefresh(True, "weightless copy" if weightless else "", weightless, known)
