"""Hard-sigmoid and hard-swish written out in elementwise ops, fused into the ops onnxruntime has for them.

Exporters that predate ``HardSwish`` (opset 14), or that lower it (Paddle, older PyTorch and TensorFlow
converters), write MobileNetV3's activations as chains over the whole feature map::

    hard-sigmoid(x) = Clip(x + 3, 0, 6) / 6          (or * (1/6))
    hard-swish(x)   = x * Clip(x + 3, 0, 6) / 6      (the division before or after the product)

Each op of such a chain is one pass over memory, and onnxruntime's NCHWc layout reorders the tensor around ops
it cannot run blocked: on PP-OCR's direction classifier the chains took about a third of the batch-1 time. The
fused forms compute the same function (``HardSigmoid(x; 1/6, 1/2) = max(0, min(1, x/6 + 1/2))``; float rounding
differs by an ulp): ``HardSigmoid`` (opset 6) for the first, ``x * HardSigmoid(x)`` for the second, and
``HardSwish`` where the graph's opset has it (14 and later). A chain is fused only where every intermediate
tensor has the chain's next op as its only reader and is no graph output, and its constants are float32 or
float16 scalars (shape ``()`` or all ones, no wider than ``x``; onnxruntime has no double kernels for the fused
ops): anything else is left as it is.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph_edit import NameSource, is_graph_output

SIXTH = 1.0 / 6.0
_TOL = 4 * float(np.finfo(np.float16).eps)


FUSED_DTYPES = (np.float32, np.float16)  # onnxruntime's CPU HardSigmoid / HardSwish kernels: no double


def _scalar(t: gs.Tensor, x: gs.Tensor) -> float | None:
    """The value of a constant that broadcasts as a scalar against ``x`` (None otherwise; only float32 and
    float16 constants, the types the fused ops run in: a chain's constants have its tensor's type)."""
    if not isinstance(t, gs.Constant) or t.values.size != 1 or t.values.dtype not in FUSED_DTYPES:
        return None
    rank = len(x.shape) if x.shape is not None else 1  # unknown rank: only () and (1,) are surely scalars
    if t.values.ndim > rank:
        return None
    return float(t.values.reshape(-1)[0])


def _is(value: float | None, want: float) -> bool:
    """``value`` is ``want`` to float16 precision (1/6 stored in float16 is 0.16663)."""
    return value is not None and abs(value - want) <= _TOL * max(1.0, abs(want))


def _sole(graph: gs.Graph, t: gs.Tensor, op: str) -> gs.Node | None:
    """The node that produces ``t`` when it is an ``op`` whose output only the chain reads."""
    if len(t.inputs) != 1 or t.inputs[0].op != op or len(t.outputs) != 1 or is_graph_output(graph, t):
        return None
    return t.inputs[0]


def _clip_bounds(clip: gs.Node) -> tuple[float | None, float | None]:
    if "min" in clip.attrs or "max" in clip.attrs:  # opset < 11
        return clip.attrs.get("min"), clip.attrs.get("max")
    lo = clip.inputs[1] if len(clip.inputs) > 1 and not clip.inputs[1].is_empty() else None
    hi = clip.inputs[2] if len(clip.inputs) > 2 and not clip.inputs[2].is_empty() else None
    x = clip.inputs[0]
    return (_scalar(lo, x) if lo is not None else None), (_scalar(hi, x) if hi is not None else None)


def _relu6_of_x_plus_3(graph: gs.Graph, t: gs.Tensor) -> gs.Tensor | None:
    """``x`` when ``t = Clip(x + 3, 0, 6)`` (every intermediate read only by the chain), else None."""
    clip = _sole(graph, t, "Clip")
    if clip is None:
        return None
    lo, hi = _clip_bounds(clip)
    if not (_is(lo, 0.0) and _is(hi, 6.0)):
        return None
    add = _sole(graph, clip.inputs[0], "Add")
    if add is None or len(add.inputs) != 2:
        return None
    for x, c in (add.inputs, add.inputs[::-1]):
        if not isinstance(x, gs.Constant) and _is(_scalar(c, x), 3.0):
            return x
    return None


def _divided_by_6(node: gs.Node) -> gs.Tensor | None:
    """The tensor ``node`` divides by 6 (``Div(t, 6)``, ``Mul(t, 1/6)`` or ``Mul(1/6, t)``), else None."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op == "Div" and _is(_scalar(b, a), 6.0):
        return a
    if node.op == "Mul":
        if _is(_scalar(b, a), SIXTH):
            return a
        if _is(_scalar(a, b), SIXTH):
            return b
    return None


def _hard_sigmoid(names: NameSource, base: str, x: gs.Tensor, out: gs.Tensor) -> gs.Node:
    return gs.Node("HardSigmoid", names.fresh(f"{base}_hard_sigmoid"), {"alpha": SIXTH, "beta": 0.5}, [x], [out])


def fuse_hard_activations(graph: gs.Graph) -> int:
    """Fuse the hard-sigmoid and hard-swish chains of ``graph`` (in place); how many activations were fused."""
    opset = int(graph.opset or 0)
    names = NameSource(graph)
    fused, gates = 0, set()  # gates: HardSigmoid outputs written here (counted with their chain)
    for node in list(graph.nodes):
        if not node.outputs or node.op not in ("Div", "Mul"):
            continue
        scaled = _divided_by_6(node)
        if scaled is None:
            continue
        out = node.outputs[0]
        x = _relu6_of_x_plus_3(graph, scaled)  # hard-sigmoid: Clip(x + 3, 0, 6) / 6
        if x is not None:
            node.outputs.clear()
            graph.nodes.append(_hard_sigmoid(names, node.name, x, out))
            gates.add(out.name)
            fused += 1
            continue
        mul = _sole(graph, scaled, "Mul")  # hard-swish: x * Clip(x + 3, 0, 6), then / 6
        if mul is None:
            continue
        for x, clipped in (mul.inputs, mul.inputs[::-1]):
            if _relu6_of_x_plus_3(graph, clipped) is x:
                node.outputs.clear()
                gates.add(_write_hard_swish(graph, names, node.name, x, out))
                fused += 1
                break
    for node in list(graph.nodes):  # x * HardSigmoid(x) written so (or just fused) where HardSwish exists
        if opset >= 14 and node.op == "Mul" and node.outputs and len(node.inputs) == 2:
            for x, h in (node.inputs, node.inputs[::-1]):
                sig = _sole(graph, h, "HardSigmoid")
                if sig is not None and sig.inputs[0] is x and _is(sig.attrs.get("alpha", 0.2), SIXTH) \
                        and _is(sig.attrs.get("beta", 0.5), 0.5):
                    out = node.outputs[0]
                    node.outputs.clear()
                    graph.nodes.append(gs.Node("HardSwish", names.fresh(f"{node.name}_hard_swish"), inputs=[x],
                                               outputs=[out]))
                    fused += h.name not in gates  # a chain fused above is counted once
                    break
    if fused:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return fused


def _write_hard_swish(graph: gs.Graph, names: NameSource, base: str, x: gs.Tensor, out: gs.Tensor) -> str:
    """``x * HardSigmoid(x)`` (the loop after the first makes it ``HardSwish`` where the opset has it); the
    gate tensor's name."""
    gate = gs.Variable(names.fresh(f"{out.name}_gate"), dtype=x.dtype, shape=x.shape)
    graph.nodes.append(_hard_sigmoid(names, base, x, gate))
    graph.nodes.append(gs.Node("Mul", names.fresh(f"{base}_gate_mul"), inputs=[x, gate], outputs=[out]))
    return gate.name


__all__ = ["fuse_hard_activations"]
