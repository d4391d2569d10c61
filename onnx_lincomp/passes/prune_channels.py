"""prune-channels: remove whole output channels of Conv / Gemm / MatMul layers, group by group, and refit
the layers that read them on the calibration data.

Channels are removed per channel group (:mod:`..analysis.channel_groups`: residual streams, concats,
depthwise and grouped convolutions tied together), never a whole group and never below
``min_channels`` (widths optionally kept at a multiple). Which channels go is decided by an importance
score (:mod:`..analysis.channel_importance`); how many by ``sparsity`` (the fraction of each group's
channels), by a per-layer override, or by a ``target_macs`` / ``target_params`` keep fraction (one
uniform fraction found by bisection on the cost of the masks: the linear layers exactly, the rest of the
model at its full cost, so the fraction is of the MACs and parameters the report counts).

**Least-squares reconstruction** (``reconstruct``, on by default): groups are pruned one at a time in
graph order. For each, the consumers' input rows on the *current* (already partly pruned) graph and
their outputs in the *unpruned* graph are streamed into second moments, and each consumer's weights
and bias are refit, ``min ||Y - X_K W'^T - b'||^2 + lam ||W' - W_K||^2``
(:func:`..calibration.moments.refit`), so that each layer also corrects the error upstream pruning
left. Grouped-Conv consumers are not refit. Without reconstruction, the removed channels' mean input
is folded into each consumer's bias (exact in expectation, away from zero-padded borders).

The pass is approximate by design (``lossy``): its error is verified and reported by ``optimize``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis.channel_groups import ChannelGroup, find_channel_groups
from ..analysis.channel_importance import consumer_owner, refittable, removal_order, stripe_of
from ..analysis.layer_latency import LayerShape, layer_time, nchwc_block
from ..analysis.model_report import graph_figures, graph_shapes
from ..calibration.moments import Moments, collect_layer_moments, refit
from ..errors import OptionError
from ..graph_edit import NameSource, refresh_shapes, upstream_sites
from ..linear_layer import LinearLayer, match_linear_layer, write_linear_layer
from ..model_io import to_model_proto
from ..rewrite.channels import relu_channels_kept, removal_problem, remove_channels
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan, SkipTally, node_named, option

Importance = Literal["l1", "l2", "activation", "reconstruction"]


@dataclass(frozen=True)
class PruneChannelsOptions(PassOptions):
    sparsity: float = option(0.25, "Fraction of each channel group's channels to remove (0 <= s < 1).",
                             flag="--sparsity")
    target_macs: float | None = option(None, "Keep this fraction of the model's MACs (one uniform fraction per "
                                             "group, found by bisection; layers that cannot be pruned count at "
                                             "their full cost); replaces --sparsity.",
                                       flag="--target-macs")
    target_params: float | None = option(None, "Keep this fraction of the model's parameters; replaces "
                                               "--sparsity.", flag="--target-params")
    importance: Importance = option("reconstruction", "Channel importance: l1 / l2 (producer weight rows), activation "
                                                  "(E|x| times consumer column norm), reconstruction (greedy "
                                                  "output error).", flag="--importance")
    reconstruct: bool = option(True, "Refit each consumer's weights and bias by least squares on the calibration "
                                     "data (else fold the removed channels' mean into its bias).",
                               flag="--reconstruct")
    min_channels: int = option(1, "A group never goes below this many channels.")
    target_latency: float | None = option(None, "Keep this fraction of the linear layers' modelled onnxruntime time "
                                                "(block-padded MACs weighted by kernel kind); replaces "
                                                "--sparsity.",
                                          flag="--target-latency")
    channel_multiple: int = option(0, "Keep widths at multiples of this in groups at least this wide (onnxruntime's "
                                      "blocked Conv kernels compute whole blocks and leave the fast path at other "
                                      "widths); 0: this CPU's NCHWc block (16 with AVX-512, else 8), recorded in the "
                                      "recipe as that number; 1 to disable.",
                                   flag="--channel-multiple")
    layers: dict[str, float] = option({}, "Per-layer sparsity overrides: producer node name -> fraction (recipe "
                                          "only; 0 leaves a layer alone).")
    ridge: float = option(1e-2, "Ridge strength of the refit, relative to the mean input energy.")
    seed: int = option(0, "Seed of the receptive fields sampled from Conv inputs.")

    def __post_init__(self):
        for what, value in (("sparsity", self.sparsity), *self.layers.items()):
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise OptionError(f"prune-channels: sparsity of {what!r} must be in [0, 1), got {value!r}")
        for what, value in (("target_macs", self.target_macs), ("target_params", self.target_params),
                            ("target_latency", self.target_latency)):
            if value is not None and not 0.0 < value <= 1.0:
                raise OptionError(f"prune-channels: {what} is a keep fraction in (0, 1], got {value}")
        if sum(v is not None for v in self.targets) > 1:
            raise OptionError("prune-channels: give one of target_macs, target_params and target_latency")
        if self.importance not in ("l1", "l2", "activation", "reconstruction"):
            raise OptionError(f"prune-channels: importance must be l1, l2, activation or reconstruction, "
                              f"got {self.importance!r}")
        if self.min_channels < 1 or self.channel_multiple < 0 or self.ridge < 0:
            raise OptionError("prune-channels: min_channels must be >= 1, channel_multiple >= 0, ridge >= 0")
        if self.channel_multiple == 0:  # resolved here, so a recipe records the number and replays it anywhere
            object.__setattr__(self, "channel_multiple", nchwc_block())

    @classmethod
    def conflict(cls, given: set[str]) -> str | None:
        targets = [t for t in ("target_macs", "target_params", "target_latency") if t in given]
        if "sparsity" in given and targets:
            return f"give --sparsity or --{targets[0].replace('_', '-')}, not both (a target replaces --sparsity)"
        return None

    @property
    def targets(self) -> tuple[float | None, float | None, float | None]:
        """(target_macs, target_params, target_latency): at most one is set, and it replaces ``sparsity``."""
        return self.target_macs, self.target_params, self.target_latency

    @property
    def multiple(self) -> int:
        """The channel multiple in force (0 was resolved to this CPU's NCHWc block when the options were made)."""
        return self.channel_multiple

    @property
    def needs_data(self) -> bool:
        return self.reconstruct or self.importance in ("activation", "reconstruction")


def group_key(group: ChannelGroup) -> str:
    return group.producers[0].nodes[0].name


@dataclass(frozen=True, eq=False)
class _Candidate:
    """A prunable group: its removal order over stripes and the cost of each layer it touches."""

    group: ChannelGroup
    order: np.ndarray  # stripes, least important first
    level: float | None  # per-layer override


def removal_count(group: ChannelGroup, level: float, min_channels: int, multiple: int) -> int:
    """Channels removed at ``level``: whole stripes, at least ``min_channels`` kept, the kept count rounded up to
    a multiple of ``multiple`` when the group is at least that wide (narrower layers keep their exact count).
    A blocked kernel computes whole blocks, so a width between two multiples costs the upper one (and a grouped
    Conv at such a width leaves onnxruntime's NCHWc path): see :mod:`..analysis.layer_latency`."""
    stripe = group.width // group.period
    keep = max(min_channels, group.width - int(math.floor(level * group.width + 1e-9)), 1)
    if multiple > 1 and group.width >= multiple:
        keep = min(group.width, -(-keep // multiple) * multiple)
    keep = min(group.width, -(-keep // stripe) * stripe)  # whole stripes
    return group.width - keep


def removal_mask(cand: _Candidate, count: int) -> np.ndarray:
    stripes = stripe_of(cand.group)
    gone = cand.order[: count // (cand.group.width // cand.group.period)]
    return np.isin(stripes, gone)


class _Costs:
    """MACs and parameters of the whole model, and the modelled time of its linear layers, for a choice of
    removal masks. The linear layers' MACs and parameters follow the masks exactly; the rest of the model
    (a ConvTranspose head, normalisation weights, ...: :func:`graph_figures` less the linear layers) is a
    fixed cost, so a ``target_macs`` of 0.5 keeps half of the MACs the report counts."""

    def __init__(self, graph: gs.Graph, candidates: list[_Candidate], block: int,
                 input_shapes: dict[str, tuple[int, ...]] | None = None):
        """``input_shapes``: each input's shape at one sample, where the graph's sides are dynamic."""
        self.layers: dict[str, tuple[float, float]] = {}  # head node -> (MACs, parameters)
        self.shapes: dict[str, LayerShape] = {}
        shape = graph_shapes(graph, input_shapes)
        for node in graph.nodes:
            layer = match_linear_layer(graph, node)
            if isinstance(layer, LinearLayer) and node is layer.nodes[0]:
                self.layers[node.name] = (float(layer.size * layer.positions(shape)), float(layer.param_count))
                self.shapes[node.name] = LayerShape.of(layer, self.layers[node.name][0])
        figures = graph_figures(graph, shapes=shape)
        self.fixed = (max(0.0, float(figures.macs) - sum(m for m, _ in self.layers.values())),
                      max(0.0, float(figures.params) - sum(p for _, p in self.layers.values())))
        self.candidates = candidates
        self.block = block

    def total(self, masks: list[np.ndarray] | None) -> tuple[float, float, float]:
        """(MACs, parameters, modelled time) with ``masks`` (one per candidate) removed."""
        rows = dict.fromkeys(self.layers, 1.0)
        cols = dict.fromkeys(self.layers, 1.0)
        for cand, mask in zip(self.candidates, masks or [], strict=False):
            idx = np.flatnonzero(mask)
            g = cand.group
            for p in g.producers:
                rows[p.nodes[0].name] *= 1.0 - idx.size / g.width
            for link in g.consumers:
                key = link.layer.nodes[0].name
                cols[key] *= 1.0 - link.columns(idx).size / max(link.layer.in_features, 1)
            for t in g.tied:
                layer = getattr(t, "layer", None)
                if layer is not None:
                    frac = 1.0 - t.map(idx).size / max(layer.out_features, 1)
                    rows[layer.nodes[0].name] *= frac
        macs = self.fixed[0] + sum(m * rows[k] * cols[k] for k, (m, _) in self.layers.items())
        params = self.fixed[1] + sum(p * rows[k] * cols[k] for k, (_, p) in self.layers.items())
        time = sum(layer_time(s, rows[k] * s.out_channels, cols[k] * s.in_channels, self.block)
                   for k, s in self.shapes.items())
        return macs, params, time


class PruneChannels(Pass):
    name = "prune-channels"
    Options = PruneChannelsOptions
    summary = ("remove the least important output channels of each channel group and refit the layers that read "
               "them by least squares on the calibration data")
    repeatable = False
    lossy = True
    options: PruneChannelsOptions

    # ---- plan -------------------------------------------------------------------------------------------
    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        # every skipped site named (not the first three): a sensitivity scan reads why its layer was left whole
        o, tally = self.options, SkipTally(examples=1 << 30)
        if o.needs_data and ctx.data is None:
            raise OptionError(f"prune-channels with importance '{o.importance}'"
                              f"{' and reconstruction' if o.reconstruct else ''} needs calibration data (--calib); "
                              "use --importance l1 --no-reconstruct to prune from the weights alone")
        found = find_channel_groups(graph)
        for skip in found.skips:
            tally.add(skip.reason, skip.node)
        groups = [g for g in found.groups if g.consumers and g.producers]
        overrides = self._overrides(groups, found)
        moments: dict[str, Moments] = {}
        if o.importance in ("activation", "reconstruction") and ctx.data is not None:
            # with the consumers' own outputs as targets when refitting: the first group apply rewrites sees
            # the graph planned here, so its refit reuses these moments instead of another data pass
            links = [c.layer for g in groups for c in g.consumers if refittable(c)]
            moments = collect_layer_moments(graph, ctx.data, _unique(links), seed=o.seed, own_targets=o.reconstruct,
                                            progress=ctx.bar("prune-channels: layer moments"))
        candidates = [_Candidate(g, removal_order(g, o.importance, moments), overrides.get(group_key(g)))
                      for g in groups]
        masks = self._masks(graph, candidates, ctx.data.input_shapes(graph) if ctx.data is not None else None)
        matches = []
        for cand, mask in zip(candidates, masks, strict=True):
            site = group_key(cand.group)
            if not mask.any():
                why = self._kept_whole(cand)
                if why:
                    tally.add(why, site)
                continue
            problem = removal_problem(cand.group, mask)
            if problem is not None:
                tally.add(problem, site)
                continue
            n = int(mask.sum())
            matches.append(Match(site, "prune", n, 0, f"{n} of {cand.group.width} channels ({o.importance})",
                                 {"remove": mask, "relus": cand.group.relus}))
        shared = {"data": ctx.data, "progress": ctx.bar("prune-channels: groups pruned and refit") if matches else None,
                  "reference": to_model_proto(graph, ctx.data.ctx, infer_shapes=False)
                  if ctx.data is not None and o.reconstruct and matches else None,
                  "moments": moments if matches else {}}
        matches = [Match(m.site, m.action, m.units, m.params_saved, m.detail, dict(m.data, shared=shared))
                   for m in matches]
        return tally.plan(self.name, matches, approximate=bool(matches))

    def _kept_whole(self, cand: _Candidate) -> str:
        """Why a group the level would prune keeps every channel because of the width multiple ('' otherwise).
        Under a target the level is the allocation's, so only a group no level can shrink is named."""
        o, g = self.options, cand.group
        targeted = any(t is not None for t in o.targets)
        level = cand.level if cand.level is not None else (0.999 if targeted else o.sparsity)
        if level <= 0 or removal_count(g, level, o.min_channels, o.multiple) > 0 \
                or removal_count(g, level, o.min_channels, 1) == 0:
            return ""
        if g.width == o.multiple:
            return (f"kept whole: widths stay at multiples of {o.multiple} (onnxruntime's blocked Conv kernels compute "
                    "whole blocks) and this group is one block wide; --channel-multiple 1 prunes it anyway")
        return (f"kept whole at this level: the width left would round back up to a multiple of {o.multiple} "
                "(--channel-multiple; 1 prunes to any width)")

    def _overrides(self, groups: list[ChannelGroup], found) -> dict[str, float]:
        """Per-layer levels keyed by group; a name that is no layer, or a layer that cannot be pruned, is an error."""
        out = {}
        for name, level in self.options.layers.items():
            group = next((g for g in groups if any(p.nodes[0].name == name for p in g.producers)), None)
            if group is None:
                skip = found.skipped_starts.get(name)
                if skip is not None:
                    raise OptionError(f"prune-channels: layer '{name}' cannot be pruned ({skip.reason})")
                raise OptionError(f"prune-channels: unknown layer '{name}' in the per-layer overrides (give the "
                                  "node name of a Conv/Gemm/MatMul whose channels can be pruned)")
            out[group_key(group)] = float(level)
        return out

    def _masks(self, graph: gs.Graph, candidates: list[_Candidate],
               input_shapes: dict[str, tuple[int, ...]] | None) -> list[np.ndarray]:
        o = self.options

        def counts(level: float) -> list[int]:
            return [removal_count(c.group, c.level if c.level is not None else level, o.min_channels, o.multiple)
                    for c in candidates]

        def masks(n: list[int]) -> list[np.ndarray]:
            return [removal_mask(c, k) for c, k in zip(candidates, n, strict=True)]

        targets = o.targets
        which = next((i for i, t in enumerate(targets) if t is not None), None)
        if which is None:
            return masks(counts(o.sparsity))
        costs = _Costs(graph, candidates, o.multiple, input_shapes)
        full, target = costs.total(None)[which], targets[which]

        def fits(n: list[int]) -> bool:
            return costs.total(masks(n))[which] <= target * full

        lo, hi = 0.0, 0.999
        if not fits(counts(hi)):
            what = ("MACs", "parameters", "modelled latency")[which]
            raise OptionError(f"prune-channels: cannot reach {target:g} of the {what} with at least "
                              f"{o.min_channels} channel(s) per layer and widths at multiples of {o.multiple} "
                              f"(lowest reachable: {costs.total(masks(counts(hi)))[which] / max(full, 1):.3f})")
        for _ in range(30):
            mid = (lo + hi) / 2
            if fits(counts(mid)):
                hi = mid
            else:
                lo = mid
        return masks(_fill(counts(hi), counts(lo), fits))

    # ---- apply ------------------------------------------------------------------------------------------
    def apply(self, graph: gs.Graph, plan: Plan) -> PassResult:
        names, tally = NameSource(graph), SkipTally()
        kept: dict[str, np.ndarray] = {}
        rows: dict[str, np.ndarray] = {}  # layer -> indices of its original output rows still present
        removed = rewritten = refits = 0
        fitted: dict[str, int] = {}  # consumer -> groups rewritten when it was last refit
        pruned: list[list[str]] = []  # producers of each rewritten group, in order
        for match in plan.matches:
            # found again by any of its producers: a rewrite's toposort may reorder them
            group = next((g for g in find_channel_groups(graph).groups
                          if any(p.nodes[0].name == match.site for p in g.producers)), None)
            mask = match.data["remove"]
            if group is None or group.width != mask.size or set(group.relus) != set(match.data["relus"]):
                tally.add("site changed since it was planned", match.site)
                continue
            widths = {r: len(group.member_channels(r)) for r in group.relus}
            params = self._consumer_params(graph, group, mask, match, rows, planned=rewritten == 0)
            result = remove_channels(graph, names, group, mask)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            for key, (w, b) in params.items():
                layer = match_linear_layer(graph, node_named(graph, key))
                if not isinstance(layer, LinearLayer) or layer.size != w.size:
                    tally.add("consumer changed shape during the rewrite (not refit)", key)
                    continue
                write_linear_layer(graph, names, layer, w.reshape(layer.shape), b)
                refits += 1
                fitted[key] = rewritten + 1
            pruned.append([p.nodes[0].name for p in group.producers])
            for p in group.producers:
                key = p.nodes[0].name
                rows[key] = rows.get(key, np.arange(group.width))[result.kept]
            for relu in group.relus:
                kept[relu] = relu_channels_kept(group, relu, result.kept, widths[relu])
            removed += result.removed
            rewritten += 1
            refresh_shapes(graph)
            if match.data["shared"]["progress"] is not None:
                match.data["shared"]["progress"](rewritten, len(plan.matches))
        again = 0
        if self.options.reconstruct and plan.matches and plan.matches[0].data["shared"]["data"] is not None:
            again = self._refit_stale(graph, names, plan.matches[0].data["shared"], fitted, pruned, rows, tally)
        skipped = dict(plan.skipped)
        for why, n in tally.counts.items():
            skipped[why] = skipped.get(why, 0) + n
        return PassResult(self.name, changed=rewritten > 0, matched=len(plan.matches), rewritten=rewritten,
                          approximate=rewritten > 0, skipped=skipped,
                          counts={"units_removed": removed, "groups_pruned": rewritten,
                                  ("layers_refit" if self.options.reconstruct else "biases_shifted"): refits,
                                  **({"layers_refit_again": again} if again else {})},
                          kept=kept, notes=(f"{again} layer(s) refit again: a group pruned after their refit (a side "
                                            "branch) changed what they read",) if again else ())

    def _refit_stale(self, graph: gs.Graph, names: NameSource, shared: dict, fitted: dict[str, int],
                     pruned: list[list[str]], rows: dict[str, np.ndarray], tally: SkipTally) -> int:
        """Refit again, on the final graph, each consumer whose input a group rewritten *after* its refit can
        reach: a side branch pruned later (a squeeze-excitation gate multiplying the main path) changes what
        the consumer reads after it was fit. A layer refit again changes what the fitted layers after it read,
        so they join the list. In waves: each wave is the stale layers no other stale layer feeds, refit from one
        data pass (the same result as one layer at a time in graph order); in a plain chain no consumer is stale
        and nothing runs. The number of layers refit again."""
        order = {n.name: i for i, n in enumerate(graph.nodes)}
        layers = {k: match_linear_layer(graph, node_named(graph, k)) for k in fitted if k in order}
        layers = {k: v for k, v in layers.items() if isinstance(v, LinearLayer)}
        above = upstream_sites(graph, {p for producers in pruned for p in producers} | set(layers))
        feeds = {k: above.get(v.input.name, frozenset()) for k, v in layers.items()}  # sites upstream of k
        pending = {k for k in layers if any(feeds[k] & set(ps) for ps in pruned[fitted[k]:])}
        done: set[str] = set()
        count = 0
        while pending:
            # the pending layers that no other pending layer feeds: their inputs are final (the graph order
            # would reach every layer upstream of them first), so one data pass collects all their moments
            ready = sorted((k for k in pending if not feeds[k] & (pending - {k})), key=order.__getitem__)
            pending -= set(ready)
            done |= set(ready)
            moments = collect_layer_moments(graph, shared["data"],
                                            [match_linear_layer(graph, node_named(graph, k)) for k in ready],
                                            shared["reference"], seed=self.options.seed)
            for key in ready:
                m = moments.get(key)
                if m is None or m.cross is None:
                    continue
                layer = match_linear_layer(graph, node_named(graph, key))
                if key in rows:
                    m.cross = m.cross[:, rows[key]]
                w = layer.weight.reshape(layer.out_features, -1)
                if m.cross.shape[1] != w.shape[0]:
                    tally.add("consumer changed shape since its refit (not refit again)", key)
                    continue
                w2, b2 = refit(m, np.arange(m.cols), w, layer.bias, self.options.ridge)
                write_linear_layer(graph, names, layer, w2.reshape(layer.shape), b2)
                count += 1
                pending |= {k for k in layers.keys() - done if key in feeds[k]}  # what it feeds reads anew
        return count

    def _consumer_params(self, graph: gs.Graph, group: ChannelGroup, mask: np.ndarray, match: Match,
                         rows: dict[str, np.ndarray], planned: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """New (weight without the removed columns, bias) of each consumer: refit, or mean folded into the bias.

        ``planned``: the graph is still the one planned (no group rewritten yet), so the plan's moments of the
        consumers, when it has them all, are what a new data pass would collect."""
        o, shared = self.options, match.data["shared"]
        idx = np.flatnonzero(mask)
        links = [c for c in group.consumers if refittable(c)]
        if len({id(c.layer.nodes[0]) for c in links}) != len(links):
            return {}  # a layer reading the group twice: plain removal
        if shared["data"] is None:
            return {}  # weights only: plain removal
        # on the current graph (an earlier group may have removed columns of the same consumer, a Concat reader);
        # the target, when refitting, is the unpruned graph's output
        moments = {c.layer.nodes[0].name: shared["moments"].get(c.layer.nodes[0].name) for c in links}
        if not planned or any(m is None or (o.reconstruct and m.cross is None) for m in moments.values()):
            moments = collect_layer_moments(graph, shared["data"], [c.layer for c in links],
                                            shared["reference"] if o.reconstruct else None, seed=o.seed)
        out = {}
        for link in links:
            key = link.layer.nodes[0].name
            m = moments.get(key)
            if m is None:
                continue
            cols, owner = consumer_owner(link, group.width)
            gone = cols[np.isin(owner, idx)]
            keep = np.setdiff1d(np.arange(m.cols), gone)
            w = link.layer.weight.reshape(link.layer.out_features, -1)
            if o.reconstruct and m.cross is not None:
                if key in rows:
                    m.cross = m.cross[:, rows[key]]
                out[key] = refit(m, keep, w, link.layer.bias, o.ridge)
            else:
                out[key] = (w[:, keep], link.layer.bias + w[:, gone] @ m.mean[gone])
        return out


def _fill(chosen: list[int], lighter: list[int], fits) -> list[int]:
    """Give back, group by group, the channels removed at the bisection's fitting level ``chosen`` but kept at the
    next lighter one, while the target still fits: with coarse widths (channel multiples) one uniform level
    can overshoot the target by a whole block in every group at once."""
    out = list(chosen)
    for i, (a, b) in enumerate(zip(chosen, lighter, strict=True)):
        if b < a:
            trial = out[:i] + [b] + out[i + 1:]
            if fits(trial):
                out = trial
    return out


def _unique(layers: list[LinearLayer]) -> list[LinearLayer]:
    seen, out = set(), []
    for layer in layers:
        if id(layer.nodes[0]) not in seen:
            seen.add(id(layer.nodes[0]))
            out.append(layer)
    return out


__all__ = ["PruneChannels", "PruneChannelsOptions", "removal_count"]
