"""merge-affine: merge two affine layers with nothing nonlinear between them, when that is cheaper.

Gemm/MatMul: ``W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)``; merged when
``out2*in1 < out1*in1 + out2*out1`` (weights only).

Conv: exact when one side is a plain 1x1 convolution (group 1, stride 1, no padding, dilation 1):
* ``Conv_kxk -> Conv_1x1``: ``W[o, i, ...] = sum_m W2[o, m] W1[m, i, ...]`` with the first conv's stride,
  padding and dilation, ``b = W2 b1 + b2``;
* ``Conv_1x1 -> Conv_kxk``: ``W[o, i, ...] = sum_m W2[o, m, ...] W1[m, i]`` with the second conv's
  attributes and ``b = b2 + sum_{m, taps} W2[o, m, ...] b1[m]``. If the second conv pads and ``b1 != 0``,
  border positions would see ``b1`` where the original saw zero padding: skipped with that reason.
* two convolutions with unit strides and dilations and an unpadded second one: kernels compose by
  full convolution, ``C[o, i, t] = sum_m sum_{u+v=t} W1[m, i, u] W2[o, m, v]`` (size ``k1 + k2 - 1``), with
  the first conv's padding; merged only when the composed kernel has fewer weights.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_edit import NameSource, only_consumer
from ..linear_layer import LinearLayer, match_linear_layer, producer_layer, write_linear_layer
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan, SkipTally, node_named


def _plain_1x1(layer: LinearLayer) -> bool:
    a = layer.conv_attrs
    return (layer.kind == "conv" and layer.kernel_size == 1 and layer.group == 1 and not any(a["pads"])
            and all(s == 1 for s in a["strides"]) and all(d == 1 for d in a["dilations"]))


def merged_shape(first: LinearLayer, second: LinearLayer) -> tuple[int, ...] | str:
    """Weight shape of the merged layer from the two layers' shapes alone (no arithmetic), or a skip reason.

    Plans use it to decide "smaller?" cheaply; only an applied merge computes the merged weights."""
    if first.kind != "conv" and second.kind != "conv":
        return second.out_features, first.in_features
    if first.kind != "conv" or second.kind != "conv":
        return "Conv and Gemm/MatMul without a flatten are not merged"
    if first.group != 1 or second.group != 1:
        return "grouped Conv"
    if _plain_1x1(second):
        return (second.out_features, *first.shape[1:])
    if _plain_1x1(first):
        if any(second.conv_attrs["pads"]) and np.any(first.bias):
            return "second Conv pads while the first has a bias (border values would change)"
        return (second.out_features, first.shape[1], *second.shape[2:])
    if not (_unit_steps(first) and _unit_steps(second)):
        return "Conv pair with strides or dilations other than 1 and no 1x1 side"
    if any(second.conv_attrs["pads"]):
        return "second Conv pads (border values would change when merged)"
    k1, k2 = np.array(first.shape[2:]), np.array(second.shape[2:])
    return (second.out_features, first.shape[1], *(int(k) for k in k1 + k2 - 1))


def merged_parameters(first: LinearLayer, second: LinearLayer) -> tuple[np.ndarray, np.ndarray, str] | str:
    """(weight, bias, which layer's attributes to keep) of the merged layer, or a skip reason."""
    shape = merged_shape(first, second)
    if isinstance(shape, str):
        return shape
    if first.kind != "conv":
        return second.weight @ first.weight, second.weight @ first.bias + second.bias, "second"
    if _plain_1x1(second):
        w2 = second.weight.reshape(second.shape[:2])
        return np.tensordot(w2, first.weight, axes=(1, 0)), w2 @ first.bias + second.bias, "first"
    if _plain_1x1(first):
        w1 = first.weight.reshape(first.shape[:2])
        taps = tuple(range(2, second.ndim))
        bias = second.bias + second.weight.sum(axis=taps) @ first.bias
        return np.moveaxis(np.tensordot(second.weight, w1, axes=(1, 0)), -1, 1), bias, "second"
    return _compose_kernels(first, second)


def _unit_steps(layer: LinearLayer) -> bool:
    a = layer.conv_attrs
    return all(v == 1 for v in a["strides"]) and all(v == 1 for v in a["dilations"])


def _compose_kernels(first: LinearLayer, second: LinearLayer) -> tuple[np.ndarray, np.ndarray, str] | str:
    """Two kxk convolutions with unit strides/dilations and an unpadded second: one (k1+k2-1) kernel.

    Cross-correlations compose by convolving kernels: ``C[o, i, t] = sum_m sum_{u+v=t} W1[m, i, u] W2[o, m, v]``;
    the merged layer keeps the first conv's padding.
    """
    w1, w2 = first.weight, second.weight
    k1, k2 = np.array(w1.shape[2:]), np.array(w2.shape[2:])
    merged = np.zeros((w2.shape[0], w1.shape[1], *(k1 + k2 - 1)))
    for v in np.ndindex(*k2):
        window = (slice(None), slice(None)) + tuple(slice(vi, vi + ki) for vi, ki in zip(v, k1, strict=True))
        merged[window] += np.tensordot(w2[(slice(None), slice(None)) + v], w1, axes=(1, 0))
    bias = second.bias + w2.sum(axis=tuple(range(2, w2.ndim))) @ first.bias
    return merged, bias, "first"


def _cheaper(first: LinearLayer, second: LinearLayer, weight: np.ndarray) -> bool:
    return weight.size < first.size + second.size  # the same rule as the plan's, on the real weight


def merge_pair(graph: gs.Graph, names: NameSource, first: LinearLayer, second: LinearLayer) -> str | None:
    """Merge ``first -> second`` in place; returns a skip reason or None when merged."""
    merged = merged_parameters(first, second)
    if isinstance(merged, str):
        return merged
    weight, bias, keep = merged
    if not _cheaper(first, second, weight):
        return "merged layer would not be smaller"
    if keep == "second":
        new = write_linear_layer(graph, names, second, weight, bias, keep_bias=True)
        new.nodes[0].inputs[0] = first.input
    else:
        new = write_linear_layer(graph, names, first, weight, bias, keep_bias=True)
        out = second.output
        second.nodes[-1].outputs.clear()
        new.nodes[-1].outputs[0] = out
    return None


@dataclass(frozen=True)
class MergeAffineOptions(PassOptions):
    """merge-affine has no options: it merges only where the merged layer is exact and smaller."""


def _pair(graph: gs.Graph, node: gs.Node) -> tuple[LinearLayer, LinearLayer] | str | None:
    """(first, second) when ``node`` is a linear layer fed only by another one; a reason when not mergeable."""
    second = match_linear_layer(graph, node)
    if not isinstance(second, LinearLayer) or not isinstance(second.input, gs.Variable):
        return None
    first = producer_layer(graph, second.input)
    if not isinstance(first, LinearLayer) or only_consumer(graph, first.output) is not node:
        return None
    if second.kind == "gemm" and first.kind == "matmul" and (first.input.shape is None or len(first.input.shape) != 2):
        return "Gemm after a MatMul whose input rank is not 2"
    return first, second


class MergeAffine(Pass):
    name = "merge-affine"
    Options = MergeAffineOptions
    summary = "merge consecutive affine layers (Gemm pairs, Conv with a 1x1 side, composable kernels) when smaller"

    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        tally, matches = SkipTally(), []
        for node in graph.nodes:
            pair = _pair(graph, node)
            if isinstance(pair, str):
                tally.add(pair, node.name)
            elif pair is not None:
                first, second = pair
                shape = merged_shape(first, second)
                size = int(np.prod(shape)) if not isinstance(shape, str) else 0
                if isinstance(shape, str):
                    tally.add(shape, node.name)
                elif size >= first.size + second.size:
                    tally.add("merged layer would not be smaller", node.name)
                else:
                    saved = first.param_count + second.param_count - size - shape[0]
                    matches.append(Match(node.name, "merge", 0, saved, f"{first.name} into {second.name}"))
        return tally.plan(self.name, matches)

    def apply(self, graph: gs.Graph, plan: Plan) -> PassResult:
        """Merge in graph order; a merge can expose a new pair, which the next pipeline round finds."""
        names, skipped, merged = NameSource(graph), Counter(plan.skipped), 0
        for match in plan.matches:
            node = node_named(graph, match.site)
            pair = _pair(graph, node) if node is not None else None
            if not isinstance(pair, tuple):
                skipped["site changed since it was planned"] += 1
                continue
            reason = merge_pair(graph, names, *pair)
            if reason:
                skipped[reason] += 1
                continue
            merged += 1
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(self.name, changed=merged > 0, matched=len(plan.matches), rewritten=merged,
                          skipped=dict(skipped), counts={"layers_merged": merged})
