"""remove-dead: delete Relu units that are never active.

If unit ``i`` of a Relu layer is never positive (``positive == 0`` on the calibration data, or at most a
fraction ``dead_rate`` of samples when asked), then ``relu(z_i) = 0`` and it contributes nothing to the
consumers: delete row ``i`` of the producer's weight and bias and the matching input column(s) of every
consumer (for ``Conv -> ... -> Flatten -> Gemm`` channel ``i`` owns the feature block
``[i*HW, (i+1)*HW)``). With ``dead_rate = 0`` this is exact on the calibration data.

With ``dead_rate > 0`` a removed unit is not exactly zero: its mean output ``m_i`` (per position) is folded
into the consumer bias, ``b' = b + W[:, cols(i)] @ m_i`` (summed over the kernel for a Conv consumer),
which is exact in expectation for a non-padding consumer; across a padding Conv the fold would be wrong
at the borders, so such channels are kept and the reason is reported.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_edit import NameSource
from ..linear_layer import Skip, write_linear_layer
from ..relu_sites import ConsumerLink, ReluSite, ResidualGroup, find_relu_site, find_residual_group, relu_nodes
from .base import PassContext, PassResult


@dataclass(frozen=True)
class RemoveDeadOptions:
    keep_at_least: int = 1  # a layer never goes below this width (its output stays well-formed)
    channel_multiple: int = 1  # keep widths at multiples of this (some dead units stay), for blocked kernels

    def __post_init__(self):
        if self.keep_at_least < 1 or self.channel_multiple < 1:
            raise ValueError("keep_at_least and channel_multiple must be at least 1")


def aligned(dead: np.ndarray, multiple: int) -> np.ndarray:
    """``dead`` with just enough units kept back that the remaining width is a multiple of ``multiple``."""
    if multiple <= 1:
        return dead
    kept = int((~dead).sum())
    target = min(dead.size, -(-max(kept, 1) // multiple) * multiple)
    out = dead.copy()
    out[np.flatnonzero(dead)[: target - kept]] = False
    return out


def dead_mask(ctx: PassContext, relu: str, width: int) -> np.ndarray | None:
    stats = ctx.stats.get(relu) if ctx.stats else None
    if stats is None or stats.channels != width:
        return None
    if ctx.dead_rate <= 0:
        return stats.dead.copy()
    return stats.sample_rate <= ctx.dead_rate


def _consumer_bias_shift(link: ConsumerLink, dead: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Bias change that replaces removed channels by their mean output (None when not exact to do so)."""
    w = link.layer.weight
    if not np.any(mean[dead]):
        return np.zeros(w.shape[0])
    if link.layer.kind == "conv":
        if any(link.layer.conv_attrs.get("pads", [])):
            return None
        cols = link.columns(np.flatnonzero(dead))
        return w[:, cols].sum(axis=tuple(range(2, w.ndim))) @ mean[dead]
    cols = link.columns(np.flatnonzero(dead))
    return w[:, cols] @ np.repeat(mean[dead], link.block)


def _shrink_reshape(graph: gs.Graph, names: NameSource, link: ConsumerLink, removed: int) -> None:
    node = link.reshape
    if node is None or node.op != "Reshape":
        return
    target = np.asarray(node.inputs[1].values).copy()
    if target[1] != -1:
        target[1] -= removed * link.block
    node.inputs[1] = gs.Constant(names.fresh(node.inputs[1].name), target)


class RemoveDeadNeurons:
    name = "remove-dead"

    def __init__(self, options: RemoveDeadOptions = RemoveDeadOptions()):
        self.options = options

    def _apply(self, graph: gs.Graph, names: NameSource, site: ReluSite | ResidualGroup, dead: np.ndarray,
               mean: np.ndarray) -> np.ndarray:
        keep = ~dead
        placeholder = np.zeros_like(dead)
        if keep.sum() < self.options.keep_at_least:
            # a layer with every unit dead keeps placeholders with zero weights: the units output 0 for
            # every input, so everything downstream is constant (as it was on the data / the domain)
            placeholder[np.flatnonzero(dead)[: self.options.keep_at_least - keep.sum()]] = True
            keep |= placeholder
        producers = [m.producer for m in site.members] if isinstance(site, ResidualGroup) else [site.producer]
        for p in producers:
            w, b = p.weight.copy(), p.bias.copy()
            w[placeholder], b[placeholder] = 0.0, 0.0
            write_linear_layer(graph, names, p, w[keep], b[keep])
        removed_cols = np.flatnonzero(~keep)
        shifts = [_consumer_bias_shift(link, ~keep, mean) for link in site.consumers]
        for link, shift in zip(site.consumers, shifts):
            c = link.layer
            cols = np.setdiff1d(np.arange(c.in_features), link.columns(removed_cols))
            new_w = c.weight[:, cols]
            write_linear_layer(graph, names, c, new_w, c.bias + shift)
            _shrink_reshape(graph, names, link, int(removed_cols.size))
        return keep

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameSource(graph)
        skipped: Counter = Counter()
        removed = rewritten = matched = 0
        approximate = False
        kept: dict[str, np.ndarray] = {}
        for relu in relu_nodes(graph):
            site = find_relu_site(graph, relu)  # fresh view: earlier rewrites changed neighbouring weights
            if isinstance(site, Skip):
                skipped[site.reason] += 1
                continue
            matched += 1
            dead = dead_mask(ctx, relu.name, site.width)
            if dead is None:
                skipped["no statistics for this Relu"] += 1
                continue
            dead = aligned(dead, self.options.channel_multiple)
            if not dead.any():
                continue
            stats = ctx.stats.get(relu.name)
            mean = stats.act_mean if ctx.dead_rate > 0 else np.zeros(site.width)
            if any(_consumer_bias_shift(link, dead, mean) is None for link in site.consumers):
                skipped["removed units are not always zero and a consumer Conv pads (bias fold inexact)"] += 1
                continue
            removable = min(int(dead.sum()), site.width - self.options.keep_at_least) > 0
            p = site.producer
            to_zero = bool(dead.all()) and bool(np.any(p.weight) or np.any(p.bias))
            if not (removable or to_zero):
                continue  # nothing removable (a layer keeps at least keep_at_least units)
            keep = self._apply(graph, names, site, dead, mean)
            kept[relu.name] = np.flatnonzero(keep)
            removed += int((~keep).sum())
            rewritten += 1
            approximate |= ctx.dead_rate > 0 and bool(np.any(stats.positive[~keep]))
        for add in [n for n in graph.nodes if n.op in ("Add", "Sum")]:
            group = find_residual_group(graph, add)
            if group is None:
                continue
            if isinstance(group, Skip):
                skipped[group.reason] += 1
                continue
            matched += 1
            masks = [dead_mask(ctx, m.relu.name, group.width) for m in group.members]
            if any(m is None for m in masks):
                skipped["residual group member without statistics"] += 1
                continue
            dead = aligned(np.logical_and.reduce(masks), self.options.channel_multiple)  # dead in every member
            if ctx.dead_rate > 0 or min(int(dead.sum()), group.width - self.options.keep_at_least) <= 0:
                continue  # groups are removed only when exactly zero in all members
            keep = self._apply(graph, names, group, dead, np.zeros(group.width))
            for m in group.members:
                kept[m.relu.name] = np.flatnonzero(keep)
            removed += int((~keep).sum()) * len(group.members)
            rewritten += 1
        return PassResult(self.name, changed=rewritten > 0, matched=matched, rewritten=rewritten,
                          neurons_removed=removed, approximate=approximate, skipped=dict(skipped), kept=kept)
