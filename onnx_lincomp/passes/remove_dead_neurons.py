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

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import OptionError
from ..graph_edit import NameSource
from ..linear_layer import Skip, write_linear_layer
from ..relu_sites import ConsumerLink, ReluSite, ResidualGroup, find_relu_site, find_residual_group, relu_nodes
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan, SkipTally, node_named, option


@dataclass(frozen=True)
class RemoveDeadOptions(PassOptions):
    dead_rate: float = option(0.0, "Also remove units active on at most this fraction of samples; their mean output "
                                   "is folded into the consumer bias (0: exact on the evidence).", flag="--dead-rate")
    keep_at_least: int = option(1, "A layer never goes below this width (its output stays well-formed).")
    channel_multiple: int = option(1, "Keep widths at multiples of this (some dead units stay); 8 suits "
                                      "onnxruntime's blocked Conv kernels.", flag="--channel-multiple")

    def __post_init__(self):
        if not 0.0 <= self.dead_rate < 1.0:
            raise OptionError(f"remove-dead: dead_rate must be in [0, 1), got {self.dead_rate}")
        if self.keep_at_least < 1 or self.channel_multiple < 1:
            raise OptionError("remove-dead: keep_at_least and channel_multiple must be at least 1")


def aligned(dead: np.ndarray, multiple: int) -> np.ndarray:
    """``dead`` with just enough units kept back that the remaining width is a multiple of ``multiple``."""
    if multiple <= 1:
        return dead
    kept = int((~dead).sum())
    target = min(dead.size, -(-max(kept, 1) // multiple) * multiple)
    out = dead.copy()
    out[np.flatnonzero(dead)[: target - kept]] = False
    return out


def removed_params(site: ReluSite | ResidualGroup, removed: int) -> int:
    """Parameters that go with ``removed`` units: producer rows (and biases) plus consumer columns."""
    producers = [m.producer for m in site.members] if isinstance(site, ResidualGroup) else [site.producer]
    rows = sum(removed * (int(p.weight[0].size) + (1 if p.has_bias else 0)) for p in producers)
    cols = sum(removed * link.block * link.layer.out_features * link.layer.kernel_size for link in site.consumers)
    return rows + cols


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


class RemoveDeadNeurons(Pass):
    name = "remove-dead"
    Options = RemoveDeadOptions
    summary = "delete units that are never active (producer rows, consumer columns), through pools, Flatten, Concat and residual groups"
    options: RemoveDeadOptions

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
            write_linear_layer(graph, names, c, c.weight[:, cols], c.bias + shift)
            _shrink_reshape(graph, names, link, int(removed_cols.size))
        return keep

    def _plan_relu(self, site: ReluSite, ctx: PassContext, tally: SkipTally) -> Match | None:
        o = self.options
        units = ctx.evidence.unit_set(site.relu.name, site.width, dead_rate=o.dead_rate) if ctx.evidence else None
        if units is None:
            tally.add("no statistics for this Relu", site.relu.name)
            return None
        dead = aligned(units.dead, o.channel_multiple)
        if not dead.any():
            return None
        if any(_consumer_bias_shift(link, dead, units.mean_output) is None for link in site.consumers):
            tally.add("removed units are not always zero and a consumer Conv pads (bias fold inexact)", site.relu.name)
            return None
        removable = min(int(dead.sum()), site.width - o.keep_at_least)
        p = site.producer
        to_zero = bool(dead.all()) and bool(np.any(p.weight) or np.any(p.bias))
        if removable <= 0 and not to_zero:
            return None  # nothing removable (a layer keeps at least keep_at_least units)
        approx = bool(np.any(units.ever_active[dead])) and o.dead_rate > 0
        return Match(site.relu.name, "remove", max(removable, 0), removed_params(site, max(removable, 0)),
                     f"{int(dead.sum())} of {site.width} units dead ({units.origin})",
                     {"dead": dead, "mean": units.mean_output, "approximate": approx})

    def _plan_group(self, group: ResidualGroup, ctx: PassContext, tally: SkipTally) -> Match | None:
        o = self.options
        sets = [ctx.evidence.unit_set(m.relu.name, group.width) if ctx.evidence else None for m in group.members]
        if any(u is None for u in sets):
            tally.add("residual group member without statistics", group.add.name)
            return None
        dead = aligned(np.logical_and.reduce([u.dead for u in sets]), o.channel_multiple)  # dead in every member
        removable = min(int(dead.sum()), group.width - o.keep_at_least)
        if removable <= 0:
            return None  # groups are removed only where exactly zero in every member
        return Match(group.add.name, "remove-group", removable, removed_params(group, removable),
                     f"{removable} of {group.width} channels dead in all {len(group.members)} members",
                     {"dead": dead, "members": tuple(m.relu.name for m in group.members)})

    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        tally, matches = SkipTally(), []
        for relu in relu_nodes(graph):
            site = find_relu_site(graph, relu)
            if isinstance(site, Skip):
                tally.add(site.reason, relu.name)
                continue
            match = self._plan_relu(site, ctx, tally)
            if match is not None:
                matches.append(match)
        for add in [n for n in graph.nodes if n.op in ("Add", "Sum")]:
            group = find_residual_group(graph, add)
            if isinstance(group, Skip):
                tally.add(group.reason, add.name)
            elif group is not None and self.options.dead_rate <= 0:
                match = self._plan_group(group, ctx, tally)
                if match is not None:
                    matches.append(match)
        return tally.plan(self.name, matches, approximate=any(m.data.get("approximate") for m in matches))

    def apply(self, graph: gs.Graph, plan: Plan) -> PassResult:
        names = NameSource(graph)
        tally, kept, removed, rewritten, approximate = SkipTally(), {}, 0, 0, False
        for match in plan.matches:
            dead = match.data["dead"]
            node = node_named(graph, match.site)
            finder = find_residual_group if match.action == "remove-group" else find_relu_site
            site = None if node is None else finder(graph, node)
            if not isinstance(site, (ReluSite, ResidualGroup)) or site.width != dead.size:
                tally.add("site changed since it was planned", match.site)
                continue
            mean = match.data.get("mean", np.zeros(dead.size))
            keep = self._apply(graph, names, site, dead, mean)
            members = match.data.get("members", (match.site,))
            for relu in members:
                kept[relu] = np.flatnonzero(keep)
            removed += int((~keep).sum()) * len(members)
            rewritten += 1
            approximate |= bool(match.data.get("approximate"))
        return PassResult(self.name, changed=rewritten > 0, matched=len(plan.matches),
                          rewritten=rewritten, approximate=approximate,
                          skipped=dict(plan.skipped) | dict(tally.counts), counts={"units_removed": removed}, kept=kept)

