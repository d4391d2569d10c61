"""Channel groups: the producers, tied parameters and consumer columns that share one channel axis.

Deleting output channel ``c`` of a linear layer (weight row ``c``, bias entry ``c``) is exact only when
everything that reads channel ``c`` loses it too. A :class:`ChannelGroup` gathers those places; this
module only reads the graph (the applier is :mod:`onnx_lincomp.rewrite.channels`). Channels are
followed (Torch-Pruning's dependency groups are the model) through:

* channel-wise ops, where output channel ``c`` depends on input channel ``c`` only: Relu, LeakyRelu,
  Clip, Sigmoid, HardSwish, HardSigmoid, Tanh, Identity, Dropout (and other elementwise unary
  activations: Elu, Selu, Gelu, Erf, Softplus, ...), pools, Resize/Upsample with unit
  channel scale, Split/Slice along another axis, BatchNormalization / InstanceNormalization, PRelu and
  Add/Sub/Mul/Div by a constant whose size on the channel axis is 1 or the width (such a constant is a
  *tied parameter*: its entry ``c`` goes with channel ``c``), and a depthwise Conv (group = in = out:
  weight row ``c`` and bias ``c`` are tied, its output continues the group);
* Add/Sum/Sub/Mul/Div of several computed tensors of the same width: all are one *stream* (a union
  over tensors), so residual streams ``Add -> Relu -> Add ...`` form one group with several producers;
* Concat along the channel axis: group channel ``c`` is channel ``c + offset`` of the output; Split /
  Slice along it: channel ``c`` is channel ``c - start`` of the output covering it. A tensor's
  :class:`ChannelMap` says where; such a *derived* stream must get its channels from that node only;
* Flatten / Reshape to ``(batch, features)`` into a Gemm/MatMul: channel ``c`` owns the feature block
  ``[c*HW, (c+1)*HW)``.

A *consumer* is a linear layer reading a group tensor; it loses input columns ``columns(c)``. A grouped
Conv consumer with ``k`` input channels per conv group loses channel ``c`` only together with every
``c' = c (mod k)`` (:attr:`ChannelGroup.period`). Anything else reading a group tensor (Transpose,
Softmax, Shape, a MatMul contracting another axis, a Reshape mixing channels, ...), a group tensor that
is a graph output, or a shape a mapping needs but that is unknown makes the group a
:class:`~onnx_lincomp.linear_layer.Skip` naming the node. Shapes must be current
(:func:`~onnx_lincomp.graph_edit.refresh_shapes` after a rewrite); any rewrite makes groups stale.

``zero_sources`` of a consumer: Relu nodes such that if channel ``c`` is exactly 0 at all of them, the
consumer's input channel ``c`` is exactly 0 (followed back through ops with ``f(0) = 0``; an Add/Sum/Sub
of members is 0 when every member is, a Mul when one is). A channel every consumer reads as 0 can be
deleted exactly (:meth:`ChannelGroup.zero_channels`).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_edit import interface_role, is_graph_output
from ..linear_layer import LinearLayer, Skip, match_linear_layer, producer_layer

LINEAR_OPS = frozenset({"Conv", "Gemm", "MatMul"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
ZERO_KEEPING_UNARY = frozenset({"Identity", "Dropout", "LeakyRelu", "Tanh", "HardSwish", "Elu", "Selu", "Celu",
                                "Softsign", "Erf", "Gelu", "Mish", "Neg", "Abs"})  # f(0) = 0
UNARY = ZERO_KEEPING_UNARY | POOLS | {"Relu", "Clip", "Sigmoid", "HardSigmoid", "Softplus", "Exp"}
ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Sum"})
NORMS = frozenset({"BatchNormalization", "InstanceNormalization"})
ZERO_KEEPING = ZERO_KEEPING_UNARY | POOLS | {"PRelu", "Resize", "Upsample", "Split", "Slice"}  # Split/Slice: other axes


@dataclass(frozen=True)
class ChannelMap:
    """Group channel ``c`` is channel ``c + shift`` of a tensor when ``lo <= c < hi`` (absent otherwise)."""

    shift: int
    lo: int
    hi: int

    @staticmethod
    def identity(width: int) -> ChannelMap:
        return ChannelMap(0, 0, width)

    def present(self, channels: np.ndarray) -> np.ndarray:
        """The group ``channels`` that the tensor carries."""
        c = np.asarray(channels, dtype=np.int64).reshape(-1)
        return c[(c >= self.lo) & (c < self.hi)]

    def __call__(self, channels: np.ndarray) -> np.ndarray:
        """Tensor channel of each present group channel: ``c + shift``."""
        return self.present(channels) + self.shift

    def concat(self, offset: int) -> ChannelMap:
        """The map after a Concat that puts this tensor at ``offset``."""
        return ChannelMap(self.shift + offset, self.lo, self.hi)

    def window(self, start: int, end: int) -> ChannelMap | None:
        """The map after keeping tensor channels ``[start, end)`` (None when no group channel is left)."""
        lo, hi = max(self.lo, start - self.shift), min(self.hi, end - self.shift)
        return ChannelMap(self.shift - start, lo, hi) if lo < hi else None


@dataclass(frozen=True, eq=False)
class TiedParam:
    """Constant input ``index`` of ``node``: its entry ``map(c)`` along ``axis`` goes with group channel ``c``."""

    node: gs.Node
    index: int
    axis: int
    map: ChannelMap


@dataclass(frozen=True, eq=False)
class TiedDepthwise:
    """A depthwise Conv on the group: weight row, bias entry and conv group ``map(c)`` go with channel ``c``."""

    layer: LinearLayer
    map: ChannelMap


@dataclass(frozen=True, eq=False)
class TiedWindow:
    """A Split/Slice on the channel axis: output ``k`` covers input channels ``bounds[k]`` (``map``: at the input)."""

    node: gs.Node
    axis: int
    map: ChannelMap
    bounds: tuple[tuple[int, int], ...]
    position: int = -1  # Slice: the entry of starts/ends that is the channel axis


Tied = TiedParam | TiedDepthwise | TiedWindow


@dataclass(frozen=True, eq=False, repr=False)
class GroupConsumer:
    """A linear layer reading group channel ``c`` as input columns ``map(c)*block .. map(c)*block + block-1``."""

    layer: LinearLayer
    block: int
    path: tuple[gs.Node, ...]  # Flatten/Reshape (and Identity/Dropout) between the group tensor and the layer
    reshape: gs.Node | None
    map: ChannelMap
    zero_sources: tuple[str, ...] | None
    tensor: str  # the group tensor read

    @property
    def offset(self) -> int:
        return self.map.shift

    def __repr__(self) -> str:
        return (f"GroupConsumer({self.layer.name!r}, block={self.block}, map={self.map}, "
                f"zero_sources={self.zero_sources})")

    def columns(self, channels: np.ndarray) -> np.ndarray:
        """Consumer input columns fed by the group ``channels`` (those the consumer reads)."""
        first = self.map(channels) * self.block
        return (first[:, None] + np.arange(self.block)[None, :]).reshape(-1)


@dataclass(frozen=True, eq=False, repr=False)
class ChannelGroup:
    """Producers whose output channel ``c`` is read only through the tied parameters and consumers listed."""

    width: int
    producers: tuple[LinearLayer, ...]
    tied: tuple[Tied, ...]
    consumers: tuple[GroupConsumer, ...]
    tensors: tuple[str, ...]
    relus: tuple[str, ...]
    relu_maps: tuple[ChannelMap, ...]
    period: int  # channel c goes only with every c' = c (mod period) (grouped Conv consumers); width if free

    def __repr__(self) -> str:
        return (f"ChannelGroup(width={self.width}, producers={[p.name for p in self.producers]}, "
                f"tied={len(self.tied)}, consumers={list(self.consumers)}, period={self.period})")

    def member_channels(self, relu: str) -> np.ndarray:
        """Channel of Relu ``relu`` carrying each group channel (-1 where it carries none)."""
        out = np.full(self.width, -1, dtype=np.int64)
        m = self.relu_maps[self.relus.index(relu)]
        present = m.present(np.arange(self.width))
        out[present] = m(present)
        return out

    def member_channel(self, relu: str, channel: int) -> int | None:
        c = int(self.member_channels(relu)[channel])
        return c if c >= 0 else None

    def admissible(self, remove: np.ndarray) -> np.ndarray:
        """The largest subset of the mask ``remove`` made of whole stripes ``{c' = c (mod period)}``."""
        stripes = np.asarray(remove, dtype=bool).reshape(-1, self.period).all(axis=0)
        return np.tile(stripes, self.width // self.period)

    def zero_channels(self, dead: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """Mask of group channels every consumer reads as 0, given per-Relu dead masks (None: unprovable)."""
        out = np.ones(self.width, dtype=bool)
        every = np.arange(self.width)
        for consumer in self.consumers:
            if consumer.zero_sources is None:
                return None
            zero = np.ones(self.width, dtype=bool)
            for relu in consumer.zero_sources:
                mask, idx = dead.get(relu), self.member_channels(relu)
                if mask is None or idx.max() >= np.size(mask):
                    return None
                zero &= (idx >= 0) & np.asarray(mask, dtype=bool)[np.maximum(idx, 0)]
            read = np.zeros(self.width, dtype=bool)
            read[consumer.map.present(every)] = True
            out &= zero | ~read
        return out


@dataclass(frozen=True)
class ChannelGroups:
    groups: tuple[ChannelGroup, ...]
    skips: tuple[Skip, ...]
    skipped_relus: Mapping[str, Skip] = field(default_factory=dict)  # Relus met by a group that was skipped
    skipped_starts: Mapping[str, Skip] = field(default_factory=dict)  # producer node -> why its group was skipped


def groups_of_relu(groups: ChannelGroups, relu: str) -> tuple[ChannelGroup, ...]:
    """Every group with channels at the output of ``relu`` (several after a Concat)."""
    return tuple(g for g in groups.groups if relu in g.relus)


def group_of_relu(groups: ChannelGroups, relu: str) -> ChannelGroup | None:
    """The one group at ``relu``'s output, None when none or several (a Concat joined them)."""
    found = groups_of_relu(groups, relu)
    return found[0] if len(found) == 1 else None


def group_of_producer(groups: ChannelGroups, node: str) -> ChannelGroup | None:
    """The group in which the linear layer headed by node ``node`` is a producer."""
    return next((g for g in groups.groups if any(p.nodes[0].name == node for p in g.producers)), None)


@dataclass(frozen=True)
class _Stream:
    """Tensors sharing one channel numbering: channel ``axis`` of rank-``rank`` tensors, ``width`` wide."""

    axis: int
    rank: int
    width: int
    entry: gs.Node | None  # the Concat/Split/Slice a derived stream starts at (None: the producers' own)


@dataclass(frozen=True, eq=False)
class _Link:
    layer: LinearLayer
    block: int
    path: tuple[gs.Node, ...]
    reshape: gs.Node | None
    map: ChannelMap
    tensor: gs.Variable


class _Stop(Exception):
    """The group cannot be proven consistent: ``skip`` names the node and the reason."""

    def __init__(self, node: str, reason: str):
        super().__init__(reason)
        self.skip = Skip(node, reason)


class _Layers:
    """Linear-layer views of the graph's nodes, each matched once."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._nodes: dict[int, LinearLayer | Skip | None] = {}
        self._tensors: dict[int, LinearLayer | Skip | None] = {}

    def of_node(self, node: gs.Node) -> LinearLayer | Skip | None:
        if id(node) not in self._nodes:
            self._nodes[id(node)] = match_linear_layer(self.graph, node)
        return self._nodes[id(node)]

    def producing(self, tensor: gs.Tensor) -> LinearLayer | Skip | None:
        if id(tensor) not in self._tensors:
            found = producer_layer(self.graph, tensor)
            if isinstance(found, LinearLayer):
                cached = self.of_node(found.nodes[0])
                found = cached if isinstance(cached, LinearLayer) and cached.output is tensor else found
            self._tensors[id(tensor)] = found
        return self._tensors[id(tensor)]


def _axis(value: int, rank: int) -> int:
    return value + rank if value < 0 else value


def _dim(tensor: gs.Tensor, axis: int) -> int | None:
    shape = np.shape(tensor.values) if isinstance(tensor, gs.Constant) else tensor.shape
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], (int, np.integer)):
        return None
    return int(shape[axis])


def _is_depthwise(layer: LinearLayer) -> bool:
    return layer.kind == "conv" and layer.group == layer.in_features == layer.out_features > 1


def _used(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return bool(tensor.outputs) or is_graph_output(graph, tensor)


def _root_stream(layer: LinearLayer) -> _Stream:
    """The channel axis of a producer's output: axis 1 of a Conv (NCHW) or Gemm, the last of a MatMul."""
    if layer.kind == "conv":
        if layer.group > 1:
            raise _Stop(layer.name, "grouped Conv producer (whole-group removal not supported)")
        return _Stream(1, layer.ndim, layer.out_features, None)
    if layer.kind == "gemm":
        return _Stream(1, 2, layer.out_features, None)
    if layer.output.shape is None:
        raise _Stop(layer.name, "MatMul output rank unknown (cannot place the channel axis)")
    rank = len(layer.output.shape)
    return _Stream(rank - 1, rank, layer.out_features, None)


def _constant_inputs(node: gs.Node, first: int) -> list[gs.Constant]:
    """The parameter inputs ``first..`` of ``node`` (omitted ones left out); computed ones stop the group."""
    out = []
    for t in node.inputs[first:]:
        if isinstance(t, gs.Constant):
            out.append(t)
        elif t.name:
            raise _Stop(node.name, f"{node.op} with a parameter computed at run time")
    return out


def _per_channel_axis(node: gs.Node, const: gs.Constant, s: _Stream) -> int | None:
    """Axis of ``const`` running over the channels (None when it broadcasts along the channel axis)."""
    shape = np.shape(const.values)
    if len(shape) > s.rank:
        raise _Stop(node.name, f"{node.op} by a constant of higher rank than the channels tensor")
    lead = s.rank - len(shape)
    if s.axis < lead or shape[s.axis - lead] == 1 or s.width == 1:
        return None
    if shape[s.axis - lead] != s.width:
        raise _Stop(node.name, f"{node.op} by a constant that does not match the channel axis")
    return s.axis - lead


def _clip_keeps_zero(node: gs.Node) -> bool:
    lo = node.inputs[1] if len(node.inputs) > 1 else None
    hi = node.inputs[2] if len(node.inputs) > 2 else None
    lo_v = float(np.asarray(lo.values)) if isinstance(lo, gs.Constant) else float(node.attrs.get("min", -np.inf))
    hi_v = float(np.asarray(hi.values)) if isinstance(hi, gs.Constant) else float(node.attrs.get("max", np.inf))
    return lo_v <= 0.0 <= hi_v


def _split_sizes(node: gs.Node, width: int) -> list[int] | None:
    """Output sizes of a Split of ``width`` channels (input, attribute, or ONNX's equal chunks)."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        if not isinstance(node.inputs[1], gs.Constant):
            return None
        sizes = [int(v) for v in np.asarray(node.inputs[1].values).reshape(-1)]
    elif "split" in node.attrs:
        sizes = [int(v) for v in node.attrs["split"]]
    else:
        n = len(node.outputs)
        chunk = -(-width // n)
        sizes = [chunk] * (n - 1) + [width - chunk * (n - 1)]
    return sizes if len(sizes) == len(node.outputs) and sum(sizes) == width and min(sizes) >= 0 else None


def _slice_params(node: gs.Node, s: _Stream) -> tuple[int, int, int] | None:
    """(position in starts/ends, start, end) of a Slice on the channel axis; None when it keeps the axis."""
    if len(node.inputs) < 3:
        raise _Stop(node.name, "Slice with attribute bounds (opset < 10)")
    values = [np.asarray(c.values).reshape(-1) for c in _constant_inputs(node, 1)]
    if len(values) != len(node.inputs) - 1:
        raise _Stop(node.name, "Slice with omitted optional inputs")
    starts, ends = values[0], values[1]
    axes = [_axis(int(a), s.rank) for a in values[2]] if len(values) > 2 else list(range(len(starts)))
    if s.axis not in axes:
        return None
    pos = axes.index(s.axis)
    if len(values) > 3 and int(values[3][pos]) != 1:
        raise _Stop(node.name, "Slice with a step on the channel axis")
    a, b = (min(max(int(v) + (s.width if v < 0 else 0), 0), s.width) for v in (starts[pos], ends[pos]))
    return pos, a, max(a, b)


def _flat_target_ok(node: gs.Node, features: int) -> None:
    """A Reshape to ``(batch, features)``; anything else would mix channels."""
    target = node.inputs[1]
    if not isinstance(target, gs.Constant):
        raise _Stop(node.name, "Reshape target computed at run time")
    v = [int(x) for x in np.asarray(target.values).reshape(-1)]
    if len(v) != 2 or v[1] not in (features, -1) or v == [-1, -1]:
        raise _Stop(node.name, "Reshape that mixes channels (target is not (batch, features))")


class _Explorer:
    """Walks the streams of one group, starting at one producer (private; mutable while it runs)."""

    def __init__(self, graph: gs.Graph, layers: _Layers, start: LinearLayer):
        self.graph, self.layers, self.start = graph, layers, start
        self.width = start.out_features
        self.seen: dict[str, tuple[gs.Variable, ChannelMap]] = {}
        self.entries: dict[str, gs.Variable] = {}  # first tensor of a derived stream -> the tensor it came from
        self.done: set[int] = set()
        self.producers: dict[int, LinearLayer] = {}
        self.tied: list[Tied] = []
        self.links: list[_Link] = []
        self.period = start.out_features
        self.queue: deque = deque()

    def run(self) -> ChannelGroup:
        self._visit(self.start.output, ChannelMap.identity(self.width), _root_stream(self.start))
        while self.queue:
            t, m, s = self.queue.popleft()
            self._backward(t, m, s)
            for node in list(t.outputs):
                self._forward(node, t, m, s)
        return _assemble(self)

    def _visit(self, t: gs.Tensor, m: ChannelMap, s: _Stream) -> None:
        if not isinstance(t, gs.Variable) or not t.name:
            raise _Stop(t.name, "a constant or omitted tensor on the channel axis")
        prev = self.seen.get(t.name)
        if prev is not None:
            if prev[1] != m:
                raise _Stop(t.name, "channels reach the tensor by two paths at different offsets")
            return
        if is_graph_output(self.graph, t):
            raise _Stop(t.name, f"a tensor of the group is {interface_role(self.graph, t)}")
        if t.shape is not None and (len(t.shape) != s.rank or _dim(t, s.axis) not in (None, s.width)):
            raise _Stop(t.name, "tensor shape does not match the group's channel axis (stale shapes?)")
        self.seen[t.name] = (t, m)
        self.queue.append((t, m, s))

    def _backward(self, t: gs.Variable, m: ChannelMap, s: _Stream) -> None:
        """Where ``t``'s channels come from: a producer, or a channel-wise op tying its inputs in."""
        if t.name in self.entries:
            return
        if not t.inputs:
            raise _Stop(t.name, "channels come from a graph input")
        layer = self.layers.producing(t)
        if isinstance(layer, Skip):
            raise _Stop(layer.node, layer.reason)
        if isinstance(layer, LinearLayer) and not _is_depthwise(layer):
            self._add_producer(layer, s)
            return
        src = t.inputs[0]
        tensors = self._tie(src, m, s)
        if tensors is None:
            raise _Stop(src.name, f"channels also come from {src.op}")
        for x in tensors:
            self._visit(x, m, s)

    def _add_producer(self, layer: LinearLayer, s: _Stream) -> None:
        if s.entry is not None:
            raise _Stop(layer.name, "a Concat/Split output also receives channels from a linear layer")
        own = _root_stream(layer)
        if (own.axis, own.rank, own.width) != (s.axis, s.rank, s.width):
            raise _Stop(layer.name, "producers of one stream differ in width or channel axis")
        self.producers.setdefault(id(layer.nodes[0]), layer)

    def _forward(self, node: gs.Node, t: gs.Variable, m: ChannelMap, s: _Stream) -> None:
        """How ``node`` reads ``t``: consumer, Concat, Split/Slice window, Flatten, or a channel-wise op."""
        if id(node) in self.done:
            return
        if node.op in LINEAR_OPS and node.inputs[0] is t:
            self._linear_reader(node, t, m, s)
        elif node.op == "Concat":
            self._concat(node, t, m, s)
        elif node.op in ("Split", "Slice") and node.inputs[0] is t and self._cuts(node, s):
            self._window(node, t, m, s)
        elif node.op in ("Flatten", "Reshape"):
            self._flatten(node, t, m, s)
        else:
            tensors = self._tie(node, m, s)
            if tensors is None:
                raise _Stop(node.name, f"channels are read by {node.op} (not channel-wise)")
            if not any(x is t for x in tensors):
                raise _Stop(node.name, f"channels feed a parameter input of {node.op}")
            for x in tensors:
                self._visit(x, m, s)

    def _tie(self, node: gs.Node, m: ChannelMap, s: _Stream) -> tuple[gs.Tensor, ...] | None:
        """The tensors a channel-wise ``node`` ties into the stream (None: not channel-wise)."""
        if id(node) in self.done:
            return ()
        if node.op in UNARY or node.op in NORMS or node.op in ("PRelu", "Resize", "Upsample", "Split", "Slice"):
            tensors = self._tie_unary(node, m, s)
        elif node.op in ARITHMETIC:
            tensors = self._tie_arithmetic(node, m, s)
        elif node.op == "Conv":
            layer = self.layers.of_node(node)
            tensors = self._depthwise(layer, m, s) if isinstance(layer, LinearLayer) and _is_depthwise(layer) else None
        else:
            return None
        if tensors is not None:
            self.done.add(id(node))
        return tensors

    def _tie_unary(self, node: gs.Node, m: ChannelMap, s: _Stream) -> tuple[gs.Tensor, ...] | None:
        if node.op in ("Split", "Slice"):
            return None if self._cuts(node, s) else (node.inputs[0], *node.outputs)
        _constant_inputs(node, 1)
        if any(_used(self.graph, o) for o in node.outputs[1:]):
            raise _Stop(node.name, f"{node.op} with more than one used output")
        if node.op in NORMS:
            self._tie_norm(node, m, s)
        elif node.op == "PRelu":
            self._tie_constants(node, m, s)
        elif node.op in ("Resize", "Upsample"):
            _check_scales(node, s)
        return node.inputs[0], node.outputs[0]

    def _tie_norm(self, node: gs.Node, m: ChannelMap, s: _Stream) -> None:
        if s.axis != 1:
            raise _Stop(node.name, f"{node.op} normalises axis 1, not the channel axis")
        for i in range(1, len(node.inputs)):
            if np.shape(node.inputs[i].values) != (s.width,):
                raise _Stop(node.name, f"{node.op} parameters do not match the channels")
            if s.width > 1:
                self.tied.append(TiedParam(node, i, 0, m))

    def _tie_constants(self, node: gs.Node, m: ChannelMap, s: _Stream) -> None:
        for i, t in enumerate(node.inputs):
            axis = _per_channel_axis(node, t, s) if isinstance(t, gs.Constant) else None
            if axis is not None:
                self.tied.append(TiedParam(node, i, axis, m))

    def _tie_arithmetic(self, node: gs.Node, m: ChannelMap, s: _Stream) -> tuple[gs.Tensor, ...]:
        """Elementwise arithmetic: constants must be per channel; several computed inputs must align."""
        self._tie_constants(node, m, s)
        variables = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        if len(variables) > 1 and any(v.shape is None or len(v.shape) != s.rank or _dim(v, s.axis) != s.width
                                      for v in variables):
            raise _Stop(node.name,
                        f"{node.op} of tensors whose channel axes cannot be matched (broadcast or unknown shapes)")
        return (*variables, node.outputs[0])

    def _depthwise(self, layer: LinearLayer, m: ChannelMap, s: _Stream) -> tuple[gs.Tensor, ...]:
        if id(layer.nodes[0]) in self.done:
            return ()
        if s.axis != 1 or layer.out_features != s.width:
            raise _Stop(layer.name, "depthwise Conv width does not match the channels")
        self.done.add(id(layer.nodes[0]))
        self.tied.append(TiedDepthwise(layer, m))
        return layer.input, layer.output

    def _linear_reader(self, node: gs.Node, t: gs.Variable, m: ChannelMap, s: _Stream) -> None:
        layer = self.layers.of_node(node)
        if not isinstance(layer, LinearLayer):
            raise _Stop(node.name if layer is None else layer.node,
                        f"{node.op} not read as a linear layer" if layer is None else layer.reason)
        if layer.kind == "conv" and s.axis != 1:
            raise _Stop(node.name, "Conv reads a tensor whose channel axis is not axis 1")
        if layer.kind == "gemm" and s.rank != 2:
            raise _Stop(node.name, "Gemm reads a tensor that is not 2-D")
        if layer.kind == "matmul" and s.axis != s.rank - 1:
            raise _Stop(node.name, "MatMul contracts an axis other than the channel axis")
        if _is_depthwise(layer):
            for x in self._depthwise(layer, m, s):
                self._visit(x, m, s)
            return
        if layer.in_features != s.width:
            raise _Stop(node.name, "consumer input width does not match the channels")
        if layer.group > 1:
            if s.entry is not None:
                raise _Stop(node.name, "grouped Conv consumer (whole-group removal not supported)")
            self.period = math.gcd(self.period, layer.in_features // layer.group)
        self.links.append(_Link(layer, 1, (), None, m, t))

    def _concat(self, node: gs.Node, t: gs.Variable, m: ChannelMap, s: _Stream) -> None:
        """Concat on the channel axis: group channel ``c`` is output channel ``c + offset``."""
        if _axis(int(node.attrs.get("axis", 0)), s.rank) != s.axis:
            raise _Stop(node.name, "Concat along an axis other than the channel axis")
        if sum(1 for x in node.inputs if x is t) != 1:
            raise _Stop(node.name, "the same tensor enters the Concat more than once")
        found = [s.width if x is t else _dim(x, s.axis) for x in node.inputs]
        dims = [d for d in found if d is not None]
        if len(dims) != len(found):
            raise _Stop(node.name, "Concat input shapes unknown (cannot map channels)")
        index = next(i for i, x in enumerate(node.inputs) if x is t)
        out = node.outputs[0]
        self.entries[out.name] = t
        self._visit(out, m.concat(sum(dims[:index])), _Stream(s.axis, s.rank, sum(dims), node))

    def _cuts(self, node: gs.Node, s: _Stream) -> bool:
        """Whether a Split/Slice cuts the channel axis (else it is channel-wise)."""
        if node.op == "Split":
            return _axis(int(node.attrs.get("axis", 0)), s.rank) == s.axis
        return _slice_params(node, s) is not None

    def _window(self, node: gs.Node, t: gs.Variable, m: ChannelMap, s: _Stream) -> None:
        """Split/Slice on the channel axis: output channel ``c - start`` for input channels ``[start, end)``."""
        if node.op == "Split":
            sizes = _split_sizes(node, s.width)
            if sizes is None:
                raise _Stop(node.name, "Split sizes unknown or computed at run time")
            ends = np.cumsum(sizes)
            bounds, pos = tuple((int(e - z), int(e)) for z, e in zip(sizes, ends, strict=True)), -1
        else:
            params = _slice_params(node, s)
            if params is None:
                raise _Stop(node.name, "Slice does not cut the channel axis")
            pos, a, b = params
            bounds = ((a, b),)
        self.tied.append(TiedWindow(node, s.axis, m, bounds, pos))
        for out, (a, b) in zip(node.outputs, bounds, strict=True):
            wm = m.window(a, b)
            if wm is not None:
                self.entries[out.name] = t
                self._visit(out, wm, _Stream(s.axis, s.rank, b - a, node))

    def _flatten(self, node: gs.Node, t: gs.Variable, m: ChannelMap, s: _Stream) -> None:
        """Flatten/Reshape to (batch, features): channel ``c`` owns features ``[c*HW, (c+1)*HW)``."""
        if node.inputs[0] is not t:
            raise _Stop(node.name, f"channels feed the shape input of {node.op}")
        shape = t.shape
        if s.axis != 1 or shape is None or any(not isinstance(d, (int, np.integer)) for d in shape[1:]):
            raise _Stop(node.name, f"{node.op} input shape unknown (cannot map channels to features)")
        features = int(np.prod(shape[1:], dtype=np.int64))
        if node.op == "Flatten" and _axis(int(node.attrs.get("axis", 1)), s.rank) != 1:
            raise _Stop(node.name, "Flatten with an axis other than 1 (mixes channels)")
        if node.op == "Reshape":
            _flat_target_ok(node, features)
        reshape = node if node.op == "Reshape" else None
        self._flat_readers(node.outputs[0], (node,), reshape, (features // s.width, s.width), t, m)

    def _flat_readers(self, x: gs.Variable, path: tuple[gs.Node, ...], reshape: gs.Node | None,
                      block_width: tuple[int, int], t: gs.Variable, m: ChannelMap) -> None:
        """Gemm/MatMul consumers of a flattened group tensor (through Identity/Dropout)."""
        block, width = block_width
        if is_graph_output(self.graph, x):
            raise _Stop(x.name, f"a flattened group tensor is {interface_role(self.graph, x)}")
        for r in list(x.outputs):
            if r.op in ("Identity", "Dropout") and r.inputs[0] is x:
                _constant_inputs(r, 1)
                if any(_used(self.graph, o) for o in r.outputs[1:]):
                    raise _Stop(r.name, f"{r.op} with more than one used output")
                self._flat_readers(r.outputs[0], path + (r,), reshape, block_width, t, m)
                continue
            layer = self.layers.of_node(r) if r.op in ("Gemm", "MatMul") and r.inputs[0] is x else None
            if isinstance(layer, Skip):
                raise _Stop(layer.node, layer.reason)
            if layer is None:
                raise _Stop(r.name, f"flattened channels are read by {r.op}")
            if layer.in_features != width * block:
                raise _Stop(r.name, "consumer input width does not match channels x block")
            self.links.append(_Link(layer, block, path, reshape, m, t))


def _check_scales(node: gs.Node, s: _Stream) -> None:
    """Resize/Upsample must keep the channel axis (scale 1) and must not carry output sizes."""
    if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
        raise _Stop(node.name, "Resize with sizes (the channel count is baked in)")
    index = 2 if node.op == "Resize" and len(node.inputs) > 2 else 1
    if len(node.inputs) > index and node.inputs[index].name:
        scales = np.asarray(node.inputs[index].values, dtype=np.float64).reshape(-1)
    else:
        scales = np.asarray(node.attrs.get("scales", []), dtype=np.float64).reshape(-1)
    if scales.size != s.rank or scales[s.axis] != 1.0:
        raise _Stop(node.name, f"{node.op} that scales the channel axis (or whose scales are unknown)")


def _zero_sources(t: gs.Variable, ex: _Explorer, memo: dict) -> tuple[str, ...] | None:
    """Relus whose channel ``c`` being 0 makes ``t``'s channel ``c`` 0 (None: not provable)."""
    if t.name not in memo:
        memo[t.name] = None
        memo[t.name] = _zero_rule(t, ex, memo)
    return memo[t.name]


def _zero_rule(t: gs.Variable, ex: _Explorer, memo: dict) -> tuple[str, ...] | None:
    if t.name in ex.entries:
        return _zero_sources(ex.entries[t.name], ex, memo)
    node = t.inputs[0] if t.inputs else None
    if node is None or isinstance(ex.layers.producing(t), LinearLayer):
        return None
    if node.op == "Relu":
        return (node.name,) if node.name else None

    def member(x: gs.Tensor) -> tuple[str, ...] | None:
        return _zero_sources(x, ex, memo) if x.name in ex.seen else None

    if node.op in ZERO_KEEPING or (node.op == "Clip" and _clip_keeps_zero(node)):
        return member(node.inputs[0])
    if node.op == "Div":
        return member(node.inputs[0]) if isinstance(node.inputs[1], gs.Constant) else None
    variables = [x for x in node.inputs if not isinstance(x, gs.Constant)]
    members = [member(x) for x in variables]
    if node.op == "Mul":  # 0 when any factor is 0
        return next((z for z in members if z is not None), None)
    known = [z for z in members if z is not None]
    if node.op in ("Add", "Sum", "Sub") and len(variables) == len(node.inputs) == len(known):
        return tuple(dict.fromkeys(r for z in known for r in z))  # 0 when every member is 0
    return None


def _assemble(ex: _Explorer) -> ChannelGroup:
    order = {id(n): i for i, n in enumerate(ex.graph.nodes)}
    producers = tuple(sorted(ex.producers.values(), key=lambda p: order.get(id(p.nodes[0]), -1)))
    memo: dict = {}
    consumers = tuple(GroupConsumer(k.layer, k.block, k.path, k.reshape, k.map, _zero_sources(k.tensor, ex, memo),
                                    k.tensor.name) for k in ex.links)
    relus = [(t.inputs[0].name, m) for t, m in ex.seen.values()
             if t.inputs and t.inputs[0].op == "Relu" and t.inputs[0].name]
    return ChannelGroup(ex.width, producers, tuple(ex.tied), consumers, tuple(ex.seen),
                        tuple(r for r, _ in relus), tuple(m for _, m in relus), ex.period)


def find_channel_groups(graph: gs.Graph) -> ChannelGroups:
    """Every channel group of ``graph``, and a skip (node, reason) for each that cannot be proven; read-only."""
    layers = _Layers(graph)
    groups: list[ChannelGroup] = []
    skips: dict[tuple[str, str], Skip] = {}
    skipped_relus: dict[str, Skip] = {}
    skipped_starts: dict[str, Skip] = {}
    taken: set[int] = set()
    for node in list(graph.nodes):
        if node.op not in LINEAR_OPS or id(node) in taken:
            continue
        layer = layers.of_node(node)
        if isinstance(layer, Skip):
            skips.setdefault((layer.node, layer.reason), layer)
            continue
        if layer is None or _is_depthwise(layer):
            continue
        explorer = _Explorer(graph, layers, layer)
        try:
            groups.append(explorer.run())
        except _Stop as stop:
            skips.setdefault((stop.skip.node, stop.skip.reason), stop.skip)
            skipped_starts[node.name] = stop.skip
            for t, _ in explorer.seen.values():
                if t.inputs and t.inputs[0].op == "Relu" and t.inputs[0].name:
                    skipped_relus.setdefault(t.inputs[0].name, stop.skip)
        taken |= set(explorer.producers) | {id(node)}
    return ChannelGroups(tuple(groups), tuple(skips.values()), skipped_relus, skipped_starts)


__all__ = ["ChannelGroup", "ChannelGroups", "ChannelMap", "GroupConsumer", "Tied", "TiedDepthwise", "TiedParam",
           "TiedWindow", "find_channel_groups", "group_of_producer", "group_of_relu", "groups_of_relu"]
