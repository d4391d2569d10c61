"""remove-dead: delete channels that every reader sees as exactly zero.

If unit ``i`` of a Relu is never positive (``positive == 0`` on the calibration data, or proven stably
inactive over a domain), ``relu(z_i) = 0``. A channel of a channel group (:mod:`..analysis.channel_groups`:
producers, tied parameters and consumers sharing one channel axis, through pools, Flatten/Reshape blocks,
channel Concat offsets, residual Add streams, depthwise convolutions) can be deleted exactly when every
consumer's input is provably 0 on it: the consumer reads a dead Relu directly or through ops with
``f(0) = 0``, or an Add/Sum of members that are all dead there. Then the producers' weight rows and biases,
the tied parameters and the consumers' input columns go (:func:`..rewrite.channels.remove_channels`).
With ``dead_rate = 0`` this is exact on the evidence.

With ``dead_rate > 0`` a removed unit is not exactly zero: its mean output ``m_i`` (per position) is folded
into the consumer bias, ``b' = b + W[:, cols(i)] @ m_i`` (summed over the kernel for a Conv consumer),
exact in expectation for a non-padding consumer. This is done only for groups with one Relu read
directly by every consumer; across a padding Conv the fold would be wrong at the borders, so such channels
are kept with that reason.

A layer whose every channel is dead keeps ``keep_at_least`` of them; in a plain Relu group their producer
rows are zeroed, so everything downstream is provably constant (as it was on the data or the domain).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis.channel_groups import ChannelGroup, ChannelGroups, find_channel_groups
from ..analysis.unit_sets import UnitEvidence, UnitSet
from ..errors import OptionError
from ..graph_edit import NameSource
from ..linear_layer import LinearLayer, Skip, match_linear_layer, producer_layer, write_linear_layer
from ..relu_sites import relu_nodes
from ..rewrite.channels import relu_channels_kept, removal_problem, remove_channels
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan, SkipTally, option


@dataclass(frozen=True)
class RemoveDeadOptions(PassOptions):
    dead_rate: float = option(0.0, "Also remove units active on at most this fraction of samples; their mean output "
                                   "is folded into the consumer bias (0: exact on the evidence).", flag="--dead-rate")
    keep_at_least: int = option(1, "A layer never goes below this width (its output stays well-formed).")
    channel_multiple: int = option(1, "Keep widths at multiples of this (some dead units stay; 1: off), e.g. "
                                      "onnxruntime's Conv block (16 with AVX-512, else 8).", flag="--channel-multiple")

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


def removed_params(group: ChannelGroup, removed: int) -> int:
    """Parameters that go with ``removed`` channels (first order): producer rows and biases, one entry of
    every tied parameter, consumer columns."""
    rows = sum(int(np.prod(p.shape[1:], dtype=np.int64)) + (1 if p.has_bias else 0) for p in group.producers)
    cols = sum(c.block * c.layer.out_features * c.layer.kernel_size // max(c.layer.group, 1) for c in group.consumers)
    return removed * (rows + cols + len(group.tied))


def group_key(group: ChannelGroup) -> str:
    """A group is found again after other rewrites by the name of its first producer's node."""
    return group.producers[0].nodes[0].name


def _simple(group: ChannelGroup) -> str | None:
    """The Relu of a plain group (one Relu read directly by every consumer, nothing tied), else None."""
    if len(group.relus) != 1 or group.tied or len(group.producers) != 1:
        return None
    relu = group.relus[0]
    return relu if all(c.zero_sources == (relu,) for c in group.consumers) else None


class RemoveDeadNeurons(Pass):
    name = "remove-dead"
    Options = RemoveDeadOptions
    summary = ("delete channels every reader sees as zero (producer rows, tied parameters, consumer columns), "
               "group by group")
    options: RemoveDeadOptions

    def _units(self, group: ChannelGroup, evidence: UnitEvidence, rate: float) -> dict[str, UnitSet] | str:
        """The unit set of every Relu of the group (masks in the Relu's own channels), or why there is none."""
        units = {}
        for relu in group.relus:
            found = evidence.unit_set(relu, None, dead_rate=rate)
            if found is None:
                return "no statistics for a Relu of the group"
            if group.member_channels(relu).max(initial=-1) >= found.width:
                return "statistics do not match the group's width"
            units[relu] = found
        return units

    def _mask(self, group: ChannelGroup, zero: np.ndarray) -> np.ndarray:
        o = self.options
        mask = group.admissible(aligned(zero, o.channel_multiple))
        excess = int(mask.sum()) - (group.width - o.keep_at_least)
        if excess > 0:  # keep whole stripes back until the layer keeps its minimum width
            for c in np.flatnonzero(mask)[: group.period]:
                if excess <= 0:
                    break
                mask[c::group.period] = False
                excess -= group.width // group.period
        return mask

    def _plan_group(self, group: ChannelGroup, ctx: PassContext, tally: SkipTally) -> Match | None:
        site, relu = group_key(group), _simple(group)
        rate = self.options.dead_rate if relu is not None else 0.0  # rates need one directly read Relu
        units = self._units(group, ctx.evidence, rate)
        if isinstance(units, str):
            tally.add(units, site)
            return None
        zero = group.zero_channels({r: u.dead for r, u in units.items()})
        if zero is None:
            tally.add("a consumer reads channels that are not provably zero (not through dead Relus)", site)
            return None
        mask = self._mask(group, zero)
        shift = units[relu].mean_output[group.member_channels(relu)] if relu is not None and rate > 0 else None
        problem = removal_problem(group, mask, shift) if mask.any() else None
        if problem is not None:
            tally.add(problem, site)
            return None
        zero_rows = relu is not None and bool(zero.all()) and bool(np.any(group.producers[0].weight))
        if not mask.any() and not zero_rows:
            return None
        approximate = rate > 0 and any(np.any(u.ever_active[group.member_channels(r)][mask]) for r, u in units.items())
        n = int(mask.sum())
        return Match(site, "remove", n, removed_params(group, n),
                     f"{n} of {group.width} channels, {len(group.producers)} producer(s), {len(group.consumers)} "
                     "consumer(s)",
                     {"remove": mask, "shift": shift, "zero_rest": zero_rows, "relus": group.relus,
                      "widths": {r: u.width for r, u in units.items()}, "approximate": approximate})

    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        tally, matches = SkipTally(), []
        found = find_channel_groups(graph)
        covered: set[str] = set()
        for group in found.groups:
            covered |= set(group.relus)
            if not group.relus:
                continue  # no Relu on the group: nothing says a channel is dead
            if ctx.evidence is None:
                tally.add("no statistics for this Relu", group_key(group))
                continue
            match = self._plan_group(group, ctx, tally)
            if match is not None:
                matches.append(match)
        for relu in relu_nodes(graph):
            if relu.name not in covered:
                tally.add(_uncovered_reason(graph, found, relu), relu.name)
        return tally.plan(self.name, matches, approximate=any(m.data["approximate"] for m in matches))

    def apply(self, graph: gs.Graph, plan: Plan) -> PassResult:
        names, tally = NameSource(graph), SkipTally()
        kept: dict[str, np.ndarray] = {}
        removed = rewritten = 0
        for match in plan.matches:
            group = _find_group(find_channel_groups(graph), match.site)
            mask = match.data["remove"]
            if group is None or group.width != mask.size or tuple(group.relus) != tuple(match.data["relus"]):
                tally.add("site changed since it was planned", match.site)
                continue
            if any(r in kept for r in group.relus):
                tally.add("Relu shared by several channel groups (the rest goes in the next round)", match.site)
                continue
            keep = np.flatnonzero(~mask)
            if mask.any():
                result = remove_channels(graph, names, group, mask, shift=match.data["shift"])
                keep, removed = result.kept, removed + result.removed * len(group.relus)
            if match.data["zero_rest"]:
                _zero_producer(graph, names, group)
            for relu in group.relus:
                kept[relu] = relu_channels_kept(group, relu, keep, match.data["widths"][relu])
            rewritten += 1
        skipped = dict(plan.skipped)
        for why, n in tally.counts.items():
            skipped[why] = skipped.get(why, 0) + n
        return PassResult(self.name, changed=rewritten > 0, matched=len(plan.matches), rewritten=rewritten,
                          approximate=plan.approximate and rewritten > 0, skipped=skipped,
                          counts={"units_removed": removed}, kept=kept)


def _uncovered_reason(graph: gs.Graph, found: ChannelGroups, relu: gs.Node) -> str:
    """Why no group covers ``relu``: its producer's group was skipped (that reason), or it has no producer."""
    producer = producer_layer(graph, relu.inputs[0]) if relu.inputs else None
    skip = found.skipped_starts.get(producer.nodes[0].name) if isinstance(producer, LinearLayer) else None
    skip = skip or found.skipped_relus.get(relu.name)
    if isinstance(producer, Skip):
        return producer.reason
    if isinstance(producer, LinearLayer) and producer.kind == "conv" and producer.group > 1:
        return "producer is a grouped Conv (its channels go only in whole groups; not removed as a producer)"
    if skip is not None:
        return skip.reason
    src = relu.inputs[0].inputs[0].op if relu.inputs and relu.inputs[0].inputs else "a graph input"
    return f"Relu input comes from {src}, not from a channel group of a linear layer"


def _find_group(found: ChannelGroups, key: str) -> ChannelGroup | None:
    return next((g for g in found.groups if group_key(g) == key), None)


def _zero_producer(graph: gs.Graph, names: NameSource, group: ChannelGroup) -> None:
    """Zero the remaining rows of a plain group's producer (every unit dead: the output becomes constant)."""
    layer = match_linear_layer(graph, group.producers[0].nodes[0])
    if isinstance(layer, LinearLayer):
        write_linear_layer(graph, names, layer, np.zeros_like(layer.weight), np.zeros_like(layer.bias))
