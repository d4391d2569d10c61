"""Delete a set of channels from a channel group everywhere the group ties them (the one channel applier).

For removed group channels ``R`` (kept ``K``):

* every producer keeps weight rows and bias entries ``K``;
* every tied constant keeps its entries ``map(K)`` along its channel axis; a depthwise Conv keeps weight
  rows / bias ``map(K)`` and its ``group`` drops by the removed count; a Split output covering
  ``[a, b)`` shrinks by the removed channels inside it, a Slice's bounds move by those below them;
* every consumer drops input columns ``columns(R)`` (for a grouped Conv, whole stripes: in-group column
  ``c mod k``), and a Reshape to ``(batch, features)`` before it shrinks by ``|R| * block``.

When the removed channels are not zero but constant at every consumer input, ``shift[c]``, the
consumer bias absorbs them: ``b' = b + W[:, columns(R)] @ repeat(shift[R], block)``, summed over the
kernel for a Conv consumer. That is exact for a Conv without padding only: at the borders a padding
Conv saw ``shift`` where the rewritten one would see zero padding, so it is refused.

Everything is checked and computed before the graph is touched: the applier rewrites the whole group or
raises :class:`~onnx_lincomp.errors.PassError`. The caller runs ``graph.cleanup().toposort()``
afterwards and re-runs :func:`~onnx_lincomp.analysis.channel_groups.find_channel_groups` (every group
view is stale after a rewrite).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx_graphsurgeon as gs

from ..analysis.channel_groups import ChannelGroup, GroupConsumer, TiedDepthwise, TiedParam, TiedWindow
from ..errors import PassError
from ..graph_edit import NameSource
from ..linear_layer import LinearLayer, write_linear_layer


@dataclass(frozen=True, eq=False)
class ChannelRemoval:
    """What :func:`remove_channels` did: channels removed, parameters removed, group channels kept."""

    removed: int
    params_removed: int
    kept: np.ndarray


@dataclass(frozen=True, eq=False)
class _LayerEdit:
    layer: LinearLayer
    weight: np.ndarray
    bias: np.ndarray
    group: int | None = None  # new Conv group attribute (depthwise)


@dataclass(frozen=True, eq=False)
class _InputEdit:
    """Set constant input ``index`` of ``node`` (append when ``index == len(inputs)``)."""

    node: gs.Node
    index: int
    value: np.ndarray


@dataclass(frozen=True, eq=False)
class _AttrEdit:
    node: gs.Node
    name: str
    value: object  # None deletes the attribute


def _indices(remove: npt.ArrayLike, width: int) -> np.ndarray | str:
    """``remove`` (a mask of ``width`` or channel indices) as sorted unique indices, or what is wrong."""
    r = np.asarray(remove)
    if r.dtype == bool:
        return np.flatnonzero(r) if r.shape == (width,) else f"mask of shape {r.shape} for {width} channels"
    if r.size and not np.issubdtype(r.dtype, np.integer):
        return "channel indices are not integers"
    idx = r.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= width):
        return f"channel index out of range 0..{width - 1}"
    if np.unique(idx).size != idx.size:
        return "repeated channel indices"
    return np.sort(idx)


def _pads(layer: LinearLayer) -> bool:
    return layer.kind == "conv" and any(int(p) for p in layer.conv_attrs.get("pads", []))


def _shift_problem(group: ChannelGroup, idx: np.ndarray, shift: np.ndarray | None) -> str | None:
    if shift is None:
        return None
    s = np.asarray(shift, dtype=np.float64)
    if s.shape != (group.width,) or not np.all(np.isfinite(s)):
        return f"shift must be {group.width} finite values"
    for c in group.consumers:
        if _pads(c.layer) and np.any(s[c.map.present(idx)]):
            return (f"consumer Conv '{c.layer.name}' pads: a shifted channel would meet zero padding at the borders"
                    " (bias shift inexact)")
    return None


def _window_problem(group: ChannelGroup, idx: np.ndarray) -> str | None:
    for t in group.tied:
        if isinstance(t, TiedWindow):
            gone = t.map(idx)
            for a, b in t.bounds:
                if b > a and int(((gone >= a) & (gone < b)).sum()) == b - a:
                    return f"{t.node.op} '{t.node.name}' would have an empty output"
    return None


def removal_problem(group: ChannelGroup, remove: npt.ArrayLike, shift: np.ndarray | None = None) -> str | None:
    """Why removing ``remove`` (mask or indices) from ``group`` cannot be done exactly; None when it can."""
    idx = _indices(remove, group.width)
    return idx if isinstance(idx, str) else _index_problem(group, idx, shift)


def _index_problem(group: ChannelGroup, idx: np.ndarray, shift: np.ndarray | None) -> str | None:
    if idx.size >= group.width:
        return "cannot remove every channel of a group (keep at least one)"
    mask = np.zeros(group.width, dtype=bool)
    mask[idx] = True
    if not np.array_equal(group.admissible(mask), mask):
        return f"grouped Conv consumer: channels go only in whole stripes (c mod {group.period})"
    return _window_problem(group, idx) or _shift_problem(group, idx, shift)


def _drop_columns(link: GroupConsumer, weight: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Consumer weight without the removed channels' input columns (grouped Conv: in-group stripes)."""
    cols = link.columns(idx)
    if link.layer.kind == "conv" and link.layer.group > 1:
        return np.delete(weight, np.unique(cols % weight.shape[1]), axis=1)
    return np.delete(weight, cols, axis=1)


def _bias_delta(link: GroupConsumer, weight: np.ndarray, idx: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """``W[:, columns(R)] @ repeat(shift[R], block)``, summed over the kernel (grouped Conv: per group)."""
    delta = np.zeros(weight.shape[0])
    if shift is None:
        return delta
    values = np.repeat(np.asarray(shift, dtype=np.float64)[link.map.present(idx)], link.block)
    if not np.any(values):
        return delta
    cols = link.columns(idx)
    w = weight.sum(axis=tuple(range(2, weight.ndim)), dtype=np.float64) if weight.ndim > 2 else weight
    if link.layer.kind == "conv" and link.layer.group > 1:
        per, rows = weight.shape[1], weight.shape[0] // link.layer.group
        for col, v in zip(cols, values, strict=True):
            g, j = divmod(int(col), per)
            delta[g * rows:(g + 1) * rows] += w[g * rows:(g + 1) * rows, j] * v
        return delta
    return w[:, cols] @ values


def _layer_edits(group: ChannelGroup, idx: np.ndarray, keep: np.ndarray,
                 shift: np.ndarray | None) -> list[_LayerEdit]:
    """New parameters of every producer and consumer (a layer that is both gets both edits at once)."""
    layers: dict[int, LinearLayer] = {}
    links: dict[int, list[GroupConsumer]] = {}
    rows: set[int] = set()
    for p in group.producers:
        layers[id(p.nodes[0])] = p
        rows.add(id(p.nodes[0]))
    for c in group.consumers:
        layers.setdefault(id(c.layer.nodes[0]), c.layer)
        links.setdefault(id(c.layer.nodes[0]), []).append(c)
    edits = []
    for key, layer in layers.items():
        w, b = layer.stored, layer.bias.copy()  # rows and columns are selected, not computed: no float64 copy
        for link in links.get(key, []):
            b = b + _bias_delta(link, w, idx, shift)
            w = _drop_columns(link, w, idx)
        if key in rows:
            w, b = w[keep], b[keep]
        edits.append(_LayerEdit(layer, w, b))
    return edits


def _tied_edits(group: ChannelGroup, idx: np.ndarray, opset: int) -> tuple[list, list, list]:
    """(layer edits, input edits, attribute edits) for the tied parameters and windows."""
    layers, inputs, attrs = [], [], []
    for t in group.tied:
        gone = t.map(idx)
        if isinstance(t, TiedParam):
            v = np.asarray(t.node.inputs[t.index].values)
            if gone.size and v.shape[t.axis] > 1:
                inputs.append(_InputEdit(t.node, t.index, np.delete(v, gone, axis=t.axis)))
        elif isinstance(t, TiedDepthwise):
            w, b = np.delete(t.layer.stored, gone, axis=0), np.delete(t.layer.bias, gone)
            layers.append(_LayerEdit(t.layer, w, b, group=int(w.shape[0])))
        elif t.node.op == "Split":
            sizes = [b - a - int(((gone >= a) & (gone < b)).sum()) for a, b in t.bounds]
            ins, ats = _split_edits(t.node, np.asarray(sizes, dtype=np.int64), opset)
            inputs += ins
            attrs += ats
        else:
            inputs += _slice_edits(t, gone)
    return layers, inputs, attrs


def _split_edits(node: gs.Node, sizes: np.ndarray, opset: int) -> tuple[list, list]:
    if len(node.inputs) > 1 and node.inputs[1].name:
        return [_InputEdit(node, 1, sizes)], []
    if "split" in node.attrs or opset < 13:
        return [], [_AttrEdit(node, "split", [int(s) for s in sizes])]
    return [_InputEdit(node, len(node.inputs), sizes)], [_AttrEdit(node, "num_outputs", None)]


def _slice_edits(t: TiedWindow, gone: np.ndarray) -> list[_InputEdit]:
    """Slice bounds after the removal: each moves down by the removed channels below it."""
    (a, b), = t.bounds
    out = []
    for index, bound in ((1, a), (2, b)):
        v = np.asarray(t.node.inputs[index].values).copy()
        v.reshape(-1)[t.position] = bound - int((gone < bound).sum())
        out.append(_InputEdit(t.node, index, v))
    return out


def _reshape_edits(group: ChannelGroup, idx: np.ndarray) -> list[_InputEdit]:
    """Reshape targets ``(batch, features)`` before flattened consumers shrink by the removed columns."""
    out, done = [], set()
    for c in group.consumers:
        node = c.reshape
        if node is None or id(node) in done:
            continue
        done.add(id(node))
        target = np.asarray(node.inputs[1].values).copy()
        if int(target.reshape(-1)[1]) != -1:
            target.reshape(-1)[1] -= c.columns(idx).size
            out.append(_InputEdit(node, 1, target))
    return out


def _commit(graph: gs.Graph, names: NameSource, layers: list[_LayerEdit], inputs: list[_InputEdit],
            attrs: list[_AttrEdit]) -> int:
    """Write every edit; returns the number of parameters removed."""
    removed = 0
    for e in layers:
        new = write_linear_layer(graph, names, e.layer, e.weight, e.bias)
        if e.group is not None:
            e.layer.nodes[0].attrs["group"] = e.group
        removed += e.layer.param_count - new.param_count
    for i in inputs:
        old = i.node.inputs[i.index] if i.index < len(i.node.inputs) else None
        const = gs.Constant(names.fresh(old.name if old is not None and old.name else f"{i.node.name}_in{i.index}"),
                            np.ascontiguousarray(i.value))
        if old is None:
            i.node.inputs.append(const)
        else:
            i.node.inputs[i.index] = const
            removed += int(np.size(old.values)) - int(i.value.size) if isinstance(old, gs.Constant) else 0
    for a in attrs:
        if a.value is None:
            a.node.attrs.pop(a.name, None)
        else:
            a.node.attrs[a.name] = a.value
    return removed


def remove_channels(graph: gs.Graph, names: NameSource, group: ChannelGroup, remove: npt.ArrayLike, *,
                    shift: np.ndarray | None = None) -> ChannelRemoval:
    """Delete group channels ``remove`` (mask or indices) everywhere; ``shift``: their constant consumer input."""
    idx = _indices(remove, group.width)
    problem = idx if isinstance(idx, str) else _index_problem(group, idx, shift)
    if problem is not None or isinstance(idx, str):
        raise PassError(f"channel removal refused: {problem}")
    keep = np.setdiff1d(np.arange(group.width), idx)
    if idx.size == 0:
        return ChannelRemoval(0, 0, keep)
    layers, inputs, attrs = _tied_edits(group, idx, int(graph.opset))
    inputs += _reshape_edits(group, idx)
    removed = _commit(graph, names, _layer_edits(group, idx, keep, shift) + layers, inputs, attrs)
    return ChannelRemoval(int(idx.size), int(removed), keep)


def relu_channels_kept(group: ChannelGroup, relu: str, keep_group: np.ndarray, width: int) -> np.ndarray:
    """Indices (in the Relu's own ``width`` channels before the pass) of the channels that remain."""
    idx = group.member_channels(relu)
    kept_group = np.zeros(group.width, bool)
    kept_group[keep_group] = True
    gone = np.zeros(width, bool)
    gone[idx[~kept_group & (idx >= 0)]] = True
    return np.flatnonzero(~gone)


__all__ = ["ChannelRemoval", "relu_channels_kept", "removal_problem", "remove_channels"]
