"""Analysis: where each Relu's channels come from and where they go (no graph mutation).

A :class:`ReluSite` is a Relu whose pre-activation is the output of one linear layer (the producer)
and whose output reaches only linear layers (the consumers), possibly through channel-preserving ops
(pools, Dropout, Identity, and a Flatten/Reshape that keeps channels as contiguous feature blocks).
Anything else (residual Add, Concat, graph output, grouped convolution) makes the site a
:class:`~onnx_lincomp.linear_layer.Skip` with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .graph_edit import interface_role, is_graph_output, only_consumer
from .linear_layer import LinearLayer, Skip, match_linear_layer, producer_layer

CHANNEL_PRESERVING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Dropout", "Identity"}


@dataclass(frozen=True, eq=False)
class ConsumerLink:
    """A consumer layer and how producer channel ``c`` maps to its input columns ``c*block .. c*block+block-1``."""

    layer: LinearLayer
    block: int
    path: tuple[gs.Node, ...]
    reshape: gs.Node | None = None
    offset: int = 0  # channel offset of the producer's channels in the consumer's input (after a Concat)

    def columns(self, channels: np.ndarray) -> np.ndarray:
        """Consumer input columns fed by the producer ``channels``."""
        first = (np.asarray(channels) + self.offset) * self.block
        return (first[:, None] + np.arange(self.block)[None, :]).reshape(-1)


@dataclass(frozen=True, eq=False)
class ReluSite:
    relu: gs.Node
    producer: LinearLayer
    consumers: tuple[ConsumerLink, ...]

    @property
    def width(self) -> int:
        return self.producer.out_features

    @property
    def is_chain(self) -> bool:
        """Producer and single consumer are Gemm/MatMul joined directly (what fold-linear rewrites)."""
        link = self.consumers[0] if len(self.consumers) == 1 else None
        return (link is not None and self.producer.kind != "conv" and link.layer.kind != "conv"
                and link.block == 1 and link.reshape is None and link.offset == 0
                and link.layer.in_features == self.producer.out_features)


def _concat_offset(node: gs.Node, tensor: gs.Tensor) -> tuple[int, int] | Skip:
    """(offset of ``tensor``'s channels, total channels) of a Concat along the channel axis."""
    shapes = [t.shape for t in node.inputs]
    if any(s is None or len(s) < 2 or not isinstance(s[1], int) for s in shapes):
        return Skip(node.name, "Concat input shapes unknown (cannot map channels)")
    rank = len(shapes[0])
    if int(node.attrs.get("axis", 0)) % rank != 1:
        return Skip(node.name, "Concat along an axis other than the channel axis")
    if sum(1 for t in node.inputs if t is tensor) != 1:
        return Skip(node.name, "the same tensor enters the Concat more than once")
    index = next(i for i, t in enumerate(node.inputs) if t is tensor)
    return sum(s[1] for s in shapes[:index]), sum(s[1] for s in shapes)


def _flatten_block(graph: gs.Graph, node: gs.Node, channels: int) -> int | Skip:
    x = node.inputs[0]
    if x.shape is None or any(not isinstance(d, int) for d in x.shape[1:]) or len(x.shape) < 2:
        return Skip(node.name, f"{node.op} input shape unknown (cannot map channels to features)")
    if x.shape[1] != channels:
        return Skip(node.name, f"{node.op} input axis 1 is not the channel axis")
    if node.op == "Flatten":
        if int(node.attrs.get("axis", 1)) != 1:
            return Skip(node.name, "Flatten with axis other than 1")
    else:
        target = node.inputs[1]
        if not isinstance(target, gs.Constant) or np.asarray(target.values).size != 2:
            return Skip(node.name, "Reshape to a shape other than (batch, features)")
        features = int(np.prod(x.shape[1:]))
        if int(np.asarray(target.values)[1]) not in (features, -1):
            return Skip(node.name, "Reshape that does not keep the channel axis")
    return int(np.prod(x.shape[2:], dtype=np.int64)) if len(x.shape) > 2 else 1


def _walk_consumers(graph: gs.Graph, tensor: gs.Tensor, width: int, path: tuple, block: int,
                    reshape: gs.Node | None, offset: int, out: list) -> Skip | None:
    """Follow ``tensor`` (``width`` channels, the producer's starting at ``offset``) to linear consumers."""
    if is_graph_output(graph, tensor):
        return Skip(tensor.name, f"activation is also {interface_role(graph, tensor)}")
    if not tensor.outputs:
        return Skip(tensor.name, "activation has no readers")
    for node in tensor.outputs:
        if node.op in ("Add", "Sum") and not path:
            return Skip(node.name, "activation feeds a residual Add (fold-linear rewrites chains only)")
        if node.op == "Concat" and reshape is None:
            found = _concat_offset(node, tensor)
            if isinstance(found, Skip):
                return found
            extra, total = found
            skip = _walk_consumers(graph, node.outputs[0], total, path + (node,), block, reshape, offset + extra, out)
            if skip:
                return skip
            continue
        if node.inputs[0] is not tensor:
            return Skip(node.name, f"activation feeds a non-data input of {node.op}")
        if node.op in CHANNEL_PRESERVING and reshape is None:
            if len([o for o in node.outputs if o.outputs or is_graph_output(graph, o)]) > 1:
                return Skip(node.name, f"{node.op} with more than one used output")
            skip = _walk_consumers(graph, node.outputs[0], width, path + (node,), block, reshape, offset, out)
            if skip:
                return skip
            continue
        if node.op in ("Flatten", "Reshape") and reshape is None:
            b = _flatten_block(graph, node, width)
            if isinstance(b, Skip):
                return b
            skip = _walk_consumers(graph, node.outputs[0], width, path + (node,), b, node, offset, out)
            if skip:
                return skip
            continue
        layer = match_linear_layer(graph, node)
        if layer is None:
            return Skip(node.name, f"activation feeds {node.op} (not rewritten)")
        if isinstance(layer, Skip):
            return layer
        if layer.kind == "conv" and layer.group != 1:
            return Skip(node.name, "consumer is a grouped/depthwise Conv")
        if layer.in_features != width * block:
            return Skip(node.name,
                        f"consumer input width {layer.in_features} does not match {width} channels x {block}")
        out.append(ConsumerLink(layer, block, path, reshape, offset))
    return None


def find_relu_site(graph: gs.Graph, relu: gs.Node) -> ReluSite | Skip:
    """The producer/consumer structure around ``relu``, or why it cannot be rewritten."""
    pre = relu.inputs[0]
    producer = producer_layer(graph, pre)
    if producer is None:
        return Skip(relu.name,
                    f"Relu input comes from {pre.inputs[0].op if pre.inputs else 'a graph input'}, not a linear layer")
    if isinstance(producer, Skip):
        return Skip(relu.name, producer.reason)
    if only_consumer(graph, pre) is not relu:
        return Skip(relu.name, "pre-activation has readers other than the Relu")
    if producer.kind == "conv" and producer.group != 1:
        return Skip(relu.name, "producer is a grouped/depthwise Conv")
    consumers: list[ConsumerLink] = []
    skip = _walk_consumers(graph, relu.outputs[0], producer.out_features, (), 1, None, 0, consumers)
    if skip is not None:
        return Skip(relu.name, skip.reason)
    return ReluSite(relu, producer, tuple(consumers))


def relu_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == "Relu" and n.domain in (None, "", "ai.onnx")]
