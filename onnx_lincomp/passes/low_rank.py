"""low-rank: factorise Gemm / MatMul / Conv layers into an encoder and a decoder with per-layer ranks (ALDS).

A layer ``y = W x + b`` with its weight folded to ``W`` (``f x n``; a Conv kernel ``f x c x kh x kw`` is
reshaped to ``f x (c kh kw)``, seeds.md 3.2 scheme 0) is split along its input channels into ``k``
groups ``[W_1 ... W_k]`` and each group is replaced by a rank-``j`` projection ``U_i U_i^T W_i``
(:mod:`..analysis.low_rank_alloc`):

* Conv (group 1): ``Conv(x, E, group=k, out=k j, the original kernel / strides / pads / dilations, no
  bias)`` then ``Conv_1x1(., D, b)`` where ``E`` stacks the encoders ``U_i^T W_i`` unfolded to
  ``j x c/k x kh x kw`` and ``D = [U_1 ... U_k]`` sums the groups;
* Gemm / MatMul: ``MatMul(x, E^T)`` (``k = 1``), then ``MatMul(., D^T)`` and ``Add(b)``. With ``k > 1`` the
  encoder is either ``Split`` along the features, one ``MatMul`` per group and ``Concat``, or one batched
  ``MatMul``: ``Reshape`` to ``[..., k, n/k]``, ``Transpose`` the groups to the front, ``MatMul`` with the
  ``[k, n/k, j]`` stack of ``E_i^T``, ``Transpose`` and ``Reshape`` back to ``[..., k j]``; both are timed
  once per layer shape in onnxruntime and the faster is written (``grouped_form``; the note says which).

The result computes ``W^ x + b'`` with ``W^ = [U_1 U_1^T W_1 ... U_k U_k^T W_k]``: exact at full rank,
and in weight space at rank ``j`` with ``k = 1`` its relative operator-norm error is
``sigma_{j+1} / sigma_1`` (Eckart-Young-Mirsky). **Data-aware** (default): ``U_i`` are the top left
singular vectors of ``W_i C_ii^{1/2}`` with ``C`` the covariance of the layer's input rows on the
calibration data (streamed second moments, :mod:`..calibration.moments`), so the truncation minimises
the output error on real activations; the mean error is folded into the bias, ``b' = b + (W - W^) mu``.

Ranks: ``alds`` minimises the largest per-layer relative operator-norm error (in weight space, or on the
data) under a parameter (``keep_params``) or MAC (``keep_macs``) budget for the whole model, choosing ``k``
per layer; for ``k = 1`` the error is ``sigma_{j+1} / sigma_1`` of ``W S``, for ``k > 1`` either the exact
error of the grouped factorisation (``error = "exact"``, default) or ALDS's lower bound
``max_i sigma_{j+1}(W_i S_i) / ||W S||`` (``error = "bound"``). With data, a grouped layer's decoder is
refit by least squares on all groups' codes (:meth:`..analysis.low_rank_alloc.Spectrum.factors`).
With calibration data (``choose_on_data``) the per-layer errors above do not say how much each layer's
error reaches the model's outputs, so the allocations reached from ALDS's starts and the uniform
allocation at the same budget are each written into a copy of the graph and run on the calibration
samples, and the one with the lowest relative output error ``sum ||y^ - y||^2 / sum ||y - mean y||^2``
is kept (the first note names it and the others' errors);
``uniform`` keeps one fraction of every layer's rank; ``energy`` keeps a fraction of every layer's
squared singular values (or, with a budget, minimises the largest energy lost). A layer whose factorised
form is not smaller stays dense, and a layer whose output reaches a graph output through no other linear
layer (a classifier) keeps a total rank ``k j`` of at least its output width (``min_rank_out``) unless the
budget cannot be met otherwise (then the report says so); layers that cannot be factorised are skipped
with a reason. Grouped and depthwise Convs are skipped. The pass is approximate (``lossy``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis.low_rank_alloc import Allocation, Allocator, Choices, Spectrum, choices, divisors, uniform_ranks
from ..analysis.model_report import Shape, graph_figures, graph_shapes
from ..calibration.activations import CalibrationData
from ..calibration.moments import Moments, collect_layer_moments
from ..errors import OptionError
from ..graph_edit import NameSource, is_graph_output
from ..linear_layer import LinearLayer, match_linear_layer
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan, Progress, SkipTally, node_named, option

Method = Literal["alds", "uniform", "energy"]
ErrorKind = Literal["exact", "bound"]
GroupedForm = Literal["measure", "split", "batched"]
DEFAULT_KEEP = 0.5
MAX_WHITEN_COLS = 8192  # layers with wider rows are factorised in weight space (their covariance is too big)
START_K = (2, 3, 4, 5, 8)  # ALDS starts from every layer at k = 1 and at the feasible k nearest each of these


@dataclass(frozen=True)
class LowRankOptions(PassOptions):
    keep_params: float | None = option(None, "Keep this fraction of the model's parameters (default 0.5 when no "
                                             "other budget, rank ratio or energy is given).", flag="--keep-params")
    keep_macs: float | None = option(None, "Keep this fraction of the model's MACs instead.", flag="--keep-macs")
    method: Method = option("alds", "How ranks are chosen: alds (min-max error with groups k per layer), uniform "
                                    "(one rank fraction), energy (singular-value energy kept).", flag="--rank-method")
    rank_ratio: float | None = option(None, "uniform: keep this fraction of every layer's rank (instead of a "
                                            "budget).", flag="--rank-ratio")
    energy: float | None = option(None, "energy: keep this fraction of every layer's squared singular values "
                                        "(instead of a budget).", flag="--energy")
    error: ErrorKind = option("exact", "alds error of a grouped layer: exact (the relative operator-norm error of the "
                                       "factorised layer, refit decoder included) or bound (ALDS's max over groups "
                                       "of sigma_{j+1}, a lower bound).", flag="--rank-error")
    data_aware: bool = option(True, "Whitened SVD on the calibration data's input covariance (else plain SVD of "
                                    "the weights).", flag="--data-aware")
    max_groups: int = option(8, "Largest number of input-channel groups k per layer (alds; 1: plain SVD).",
                             flag="--max-groups")
    min_rank_out: float = option(1.0, "An output layer (a classifier) keeps a total rank k*j of at least this "
                                      "fraction of its output width unless the budget needs less (0: no guard).",
                                 flag="--min-rank-out")
    layers: dict[str, float] = option({}, "Per-layer rank fractions: node name -> fraction of its rank kept with "
                                          "k = 1 (0: leave dense; recipe only).")
    rounds: int = option(4, "Alternating global/local rounds of the ALDS allocation.")
    ridge: float = option(1e-3, "Whitening regularisation: added to the input covariance, relative to its mean "
                                "diagonal.")
    seed: int = option(0, "Seed of the receptive fields sampled from Conv inputs.")
    choose_on_data: bool = option(True, "alds with a budget and calibration data: measure the output error of "
                                        "the allocation reached from every ALDS start, and of the uniform "
                                        "allocation at the same budget, on the calibration data and keep the "
                                        "lowest.", flag="--rank-choose-on-data")
    grouped_form: GroupedForm = option("measure", "Form of a Gemm / MatMul with k > 1: split (Split, one MatMul "
                                                  "per group, Concat), batched (Reshape, Transpose, one batched "
                                                  "MatMul) or measure (time both in onnxruntime once per shape and "
                                                  "emit the faster).", flag="--rank-grouped-form")
    check_latency: bool = option(False, "Time each factorised layer against the dense one in onnxruntime (batch 1 "
                                        "and 32, once per shape) and keep a layer dense (or at k = 1) where the "
                                        "factorised form runs slower; the budget is then re-allocated.",
                                 flag="--rank-latency-check")

    def __post_init__(self):
        for what, value in (("keep_params", self.keep_params), ("keep_macs", self.keep_macs),
                            ("rank_ratio", self.rank_ratio), ("energy", self.energy)):
            if value is not None and not 0.0 < value <= 1.0:
                raise OptionError(f"low-rank: {what} is a fraction in (0, 1], got {value}")
        if self.keep_params is not None and self.keep_macs is not None:
            raise OptionError("low-rank: give keep_params or keep_macs, not both")
        if self.error not in ("exact", "bound"):
            raise OptionError(f"low-rank: error must be exact or bound, got {self.error!r}")
        if self.grouped_form not in ("measure", "split", "batched"):
            raise OptionError(f"low-rank: grouped_form must be measure, split or batched, got {self.grouped_form!r}")
        if self.method not in ("alds", "uniform", "energy"):
            raise OptionError(f"low-rank: method must be alds, uniform or energy, got {self.method!r}")
        budget = self.keep_params is not None or self.keep_macs is not None
        for what, value, owner in (("rank_ratio", self.rank_ratio, "uniform"), ("energy", self.energy, "energy")):
            if value is not None and self.method != owner:
                raise OptionError(f"low-rank: {what} applies to method {owner} (--rank-method {owner})")
            if value is not None and budget:
                raise OptionError(f"low-rank: give a budget (keep_params / keep_macs) or {what}, not both")
        for name, value in self.layers.items():
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise OptionError(f"low-rank: rank fraction of layer {name!r} must be in [0, 1], got {value!r}")
        if self.max_groups < 1 or self.rounds < 0 or self.ridge < 0 or not 0.0 <= self.min_rank_out <= 1.0:
            raise OptionError("low-rank: max_groups must be >= 1, rounds >= 0, ridge >= 0, min_rank_out in [0, 1]")

    @property
    def by_macs(self) -> bool:
        return self.keep_macs is not None

    @property
    def keep(self) -> float | None:
        """The budget fraction, or None when ranks come from a rank ratio or an energy threshold."""
        if self.keep_macs is not None:
            return self.keep_macs
        if self.keep_params is not None:
            return self.keep_params
        return None if self.rank_ratio is not None or self.energy is not None else DEFAULT_KEEP


@dataclass(eq=False)
class _Site:
    """A layer that may be factorised: its view, folded spectrum, cost weight and allowed choices."""

    layer: LinearLayer
    spectrum: Spectrum
    positions: int
    min_width: int  # the total rank k * j it needs (output layers: their output width)
    override: float | None = None
    slow: bool = False  # the latency check found it slower factorised, the budget needs it anyway
    rows: int = 0  # calibration rows its input covariance was estimated from (data-aware; 0 in weight space)

    @property
    def name(self) -> str:
        return self.layer.nodes[0].name

    def dense_params(self) -> int:
        return int(self.layer.size)


def output_layer(graph: gs.Graph, layer: LinearLayer) -> bool:
    """Whether ``layer``'s output reaches a graph output through no other linear layer."""
    seen, todo = set(), [layer.output]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if is_graph_output(graph, t):
            return True
        for node in t.outputs:
            if node.op not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
                todo.extend(node.outputs)
    return False


def _covariance(m: Moments, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    mean = m.mean
    cov = m.gram[:-1, :-1] / max(m.rows, 1) - np.outer(mean, mean)
    cov = (cov + cov.T) / 2
    lam = ridge * max(float(np.mean(np.diag(cov))), 1e-12)
    cov[np.diag_indices_from(cov)] += lam
    return cov, mean


class LowRank(Pass):
    name = "low-rank"
    Options = LowRankOptions
    summary = ("factorise Conv / Gemm / MatMul layers into an encoder and a decoder with per-layer ranks chosen "
               "under a parameter or MAC budget (ALDS, optionally whitened on the calibration data)")
    repeatable = False
    lossy = True
    options: LowRankOptions

    # ---- plan -------------------------------------------------------------------------------------------
    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        o, tally = self.options, SkipTally()
        if o.data_aware and ctx.data is None:
            raise OptionError("low-rank with data_aware needs calibration data (--calib); use --no-data-aware for "
                              "a plain SVD of the weights")
        # a MAC budget counts MACs at the data's input size (a graph with dynamic sides); one lookup serves both
        shape = graph_shapes(graph, ctx.data.input_shapes(graph) if ctx.data is not None else None) \
            if o.by_macs else None
        sites = self._sites(graph, tally, shape)
        if o.data_aware and sites:
            self._whiten(graph, ctx, sites)
        total = self._total(graph, shape) if o.keep is not None and sites else 0.0
        tables, relaxed = self._tables(total, sites, ctx.bar("low-rank: layers decomposed") if sites else None)
        judge = None
        if o.choose_on_data and o.method == "alds" and o.keep is not None and ctx.data is not None and sites:
            judge = _OutputErrorJudge(graph, ctx.data, sites, self._factorised)
        picks = self._allocate(total, sites, tables, judge)
        slow: set[str] = set()
        timings = _Timings(o.grouped_form)
        if o.check_latency:
            picks = self._faster_only(total, sites, tables, picks, slow, judge, timings)
        matches = []
        for site, table, (k, idx) in zip(sites, tables, picks, strict=True):
            rank = int(table[k].ranks[idx])
            if rank == 0:
                if not any(len(c.ranks) > 1 for c in table.values()) and site.name not in slow:
                    tally.add("output layer: its total rank may not go below its output width (min_rank_out)"
                              if site.min_width > 1 else "no factorised form has fewer weights", site.name)
                else:
                    tally.add("the factorised form ran slower in onnxruntime (latency check)" if site.name in slow
                              else "left dense by the allocation (the budget keeps it whole)", site.name)
                continue
            form, why = _grouped_form(site.layer, k, rank, timings)
            matches.append(self._match(site, k, rank, site.name in relaxed and k * rank < site.layer.out_features,
                                       form, why, judge.summary if judge is not None else ""))
        return tally.plan(self.name, matches, approximate=bool(matches))

    def _tables(self, total: float, sites: list[_Site], progress: Progress | None = None
                ) -> tuple[list[dict[int, Choices]], set[str]]:
        """Every site's choices; when the budget cannot be met with the output layers at their output width,
        their minimum rank is lowered just enough (those layers are named, and their matches say so).
        ``progress(done, total)`` after each site's decompositions (the slow part on wide layers)."""
        tables = []
        for s in sites:
            tables.append(self._table(s))
            if progress is not None:
                progress(len(tables), len(sites))
        keep = self.options.keep
        if keep is None or not sites:
            return tables, set()
        budget = self._budget(total, sites, keep)
        guarded = [i for i, s in enumerate(sites) if s.min_width > 1 and s.override is None]
        if not guarded or Allocator(tables, budget).min_size() <= budget:
            return tables, set()
        widths = {i: sites[i].min_width for i in guarded}
        for step in range(1, 21):
            q = 1.0 - step / 20
            for i in guarded:
                sites[i].min_width = max(1, math.ceil(q * widths[i] - 1e-9))
                tables[i] = self._table(sites[i])
            if Allocator(tables, budget).min_size() <= budget:
                break
        return tables, {sites[i].name for i in guarded if sites[i].min_width < widths[i]}

    def _faster_only(self, total: float, sites: list[_Site], tables: list[dict[int, Choices]],
                     picks: list[tuple[int, int]], slow: set[str], judge: _OutputErrorJudge | None,
                     timings: _Timings) -> list[tuple[int, int]]:
        """Re-allocate while some factorised layer runs slower than the dense one: such a layer is limited
        to k = 1, then kept dense (``tables`` and ``slow`` are updated), one layer at a time; a restriction
        that makes the budget unreachable is undone (the layer stays factorised; its match says so)."""
        needed: set[int] = set()
        for _ in range(4 * len(sites)):
            worse = [i for i, (k, idx) in enumerate(picks) if i not in needed and tables[i][k].ranks[idx]
                     and _slower(sites[i], k, int(tables[i][k].ranks[idx]), timings)]
            if not worse:
                break
            i = max(worse, key=lambda n: sites[n].dense_params())
            k, before, last = picks[i][0], tables[i], next(iter(tables[i].values()))
            if k > 1 and 1 in before and len(before[1].ranks) > 1:
                tables[i] = {1: before[1]}
            else:
                tables[i] = {1: Choices(1, last.ranks[-1:], last.errors[-1:], last.sizes[-1:])}
            try:
                picks = self._allocate(total, sites, tables, judge)
                if len(tables[i][1].ranks) == 1:
                    slow.add(sites[i].name)
            except OptionError:
                tables[i] = before
                needed.add(i)
        for i in needed:
            sites[i].slow = True
        return picks

    def _sites(self, graph: gs.Graph, tally: SkipTally,
               shape: Callable[[str], Shape | None] | None = None) -> list[_Site]:
        """``shape``: the tensor shapes MACs are counted with (:func:`graph_shapes`; None: the graph's own)."""
        o = self.options
        sites, names = [], set()
        for node in graph.nodes:
            layer = match_linear_layer(graph, node)
            if layer is None or (isinstance(layer, LinearLayer) and node is not layer.nodes[0]):
                continue
            if not isinstance(layer, LinearLayer):
                tally.add(layer.reason, node.name)
                continue
            if layer.kind == "conv" and layer.group != 1:
                tally.add("grouped or depthwise Conv", node.name)
                continue
            weight = layer.weight.reshape(layer.out_features, -1)
            channels = int(layer.shape[1])
            is_out = output_layer(graph, layer)
            min_width = max(1, math.ceil(o.min_rank_out * layer.out_features - 1e-9)) if is_out else 1
            names.add(node.name)
            sites.append(_Site(layer, Spectrum(weight, channels), layer.positions(shape), min_width,
                               o.layers.get(node.name)))
        unknown = sorted(set(o.layers) - names)
        if unknown:
            raise OptionError(f"low-rank: layer '{unknown[0]}' in the per-layer overrides is not a factorisable "
                              "Conv/Gemm/MatMul (give its node name)")
        return sites

    def _whiten(self, graph: gs.Graph, ctx: PassContext, sites: list[_Site]) -> None:
        wide = [s for s in sites if s.spectrum.cols <= MAX_WHITEN_COLS]
        moments = collect_layer_moments(graph, ctx.data, [s.layer for s in wide], seed=self.options.seed,
                                        progress=ctx.bar("low-rank: input covariances") if wide else None)
        for s in wide:
            m = moments.get(s.name)
            if m is not None and m.rows > 0:
                cov, mean = _covariance(m, self.options.ridge)
                s.spectrum = Spectrum(s.spectrum.weight, s.spectrum.channels, cov, mean)
                s.rows = m.rows

    def _table(self, site: _Site) -> dict[int, Choices]:
        """The site's choices per ``k`` (a per-layer override is a single fixed choice)."""
        o, sp = self.options, site.spectrum
        weight = float(site.positions) if o.by_macs else 1.0
        if site.override is not None:
            full = choices(sp.errors(1), 1, sp.out, sp.cols, weight, site.min_width)
            rank = max(site.min_width, math.ceil(site.override * sp.rank_max(1) - 1e-9)) if site.override > 0 else 0
            i = int(np.flatnonzero(full.ranks == rank)[0]) if rank in full.ranks[:-1] else len(full.ranks) - 1
            return {1: Choices(1, full.ranks[i:i + 1], full.errors[i:i + 1], full.sizes[i:i + 1])}
        measure = "energy" if o.method == "energy" else o.error
        ks = divisors(sp.channels, o.max_groups) if o.method == "alds" else (1,)
        return {k: choices(sp.errors(k, measure), k, sp.out, sp.cols, weight, math.ceil(site.min_width / k))
                for k in ks}

    def _allocate(self, total: float, sites: list[_Site], tables: list[dict[int, Choices]],
                  judge: _OutputErrorJudge | None = None) -> list[tuple[int, int]]:
        """(k, choice index) per site; ``total`` is the model's parameters or MACs (what the budget counts).
        With a ``judge`` (alds, calibration data), the allocations reached from ALDS's starts and the uniform
        allocation at the same budget are measured on the calibration data and the lowest output error wins."""
        o = self.options
        if not sites:
            return []
        keep = o.keep
        budget = self._budget(total, sites, keep) if keep is not None else math.inf
        allocator = Allocator(tables, budget)
        if keep is not None and allocator.min_size() > budget + 1e-9:
            self._infeasible(total, sites, allocator, keep)
        if o.method == "uniform":
            return self._uniform(sites, tables, allocator)
        if o.method == "energy" and o.energy is not None:
            return [(1, i) for i in allocator.at_threshold([1] * len(sites), 1.0 - o.energy)]
        targets = [t for t in START_K if t <= o.max_groups]
        if o.method == "alds" and judge is not None:
            found = allocator.alds_candidates(targets, o.rounds)
            candidates = {f"ALDS from k={t}": list(zip(a.ks, a.index, strict=True)) for t, a in found.items()}
            candidates["uniform"] = self._uniform(sites, tables, allocator)
            return judge.choose(tables, candidates)
        alloc: Allocation | None = (allocator.alds(targets, o.rounds) if o.method == "alds"
                                    else allocator.global_step([1] * len(sites)))
        if alloc is None:  # the minimum fits, so a feasible start exists; kept as a guard
            self._infeasible(total, sites, allocator, keep)
        return list(zip(alloc.ks, alloc.index, strict=True))

    def _total(self, graph: gs.Graph, shape: Callable[[str], Shape | None] | None = None) -> float:
        figures = graph_figures(graph, shapes=shape)
        return float(figures.macs if self.options.by_macs else figures.params)

    def _dense(self, sites: list[_Site]) -> float:
        return float(sum((s.positions if self.options.by_macs else 1) * s.dense_params() for s in sites))

    def _budget(self, total: float, sites: list[_Site], keep: float) -> float:
        """What the sites may take: the kept fraction of the model minus everything the pass does not touch."""
        return keep * total - (total - self._dense(sites))

    def _infeasible(self, total: float, sites: list[_Site], allocator: Allocator, keep: float) -> None:
        what = "keep_macs" if self.options.by_macs else "keep_params"
        lowest = (total - self._dense(sites) + allocator.min_size()) / max(total, 1.0)
        raise OptionError(f"low-rank: {what} {keep:g} cannot be met: rank 1 in every factorisable layer keeps "
                          f"{lowest:.3f} of the {'MACs' if self.options.by_macs else 'parameters'}")

    def _uniform(self, sites: list[_Site], tables: list[dict[int, Choices]],
                 allocator: Allocator) -> list[tuple[int, int]]:
        """One rank fraction for every layer: the given one, or the largest that fits the budget."""
        def at(ratio: float) -> list[tuple[int, int]]:
            ranks = uniform_ranks([s.spectrum.rank_max(1) for s in sites], ratio, [s.min_width for s in sites])
            out = []
            for table, rank in zip(tables, ranks, strict=True):
                c = next(iter(table.values()))
                hit = np.flatnonzero(c.ranks == rank)
                out.append((c.k, int(hit[0]) if hit.size else len(c.ranks) - 1))
            return out

        def size(picks: list[tuple[int, int]]) -> float:
            return float(sum(t[k].sizes[i] for t, (k, i) in zip(tables, picks, strict=True)))

        if self.options.rank_ratio is not None:
            return at(self.options.rank_ratio)
        lo, hi = 0.0, 1.0
        if size(at(hi)) <= allocator.budget:
            return at(hi)
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if size(at(mid)) <= allocator.budget else (lo, mid)
        return at(lo)

    def _factorised(self, site: _Site, k: int, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(encoder, decoder, bias, the folded weight they compute) of ``site`` at ``(k, rank)``; the bias
        takes the mean error ``(W - W^) mu`` when data-aware."""
        sp = site.spectrum
        enc, dec = sp.factors(k, rank)
        approx = np.hstack([dec[:, i * rank:(i + 1) * rank] @ enc[i * rank:(i + 1) * rank] for i in range(k)])
        bias = site.layer.bias + ((sp.weight - approx) @ sp.mean if sp.mean is not None else 0.0)
        return enc, dec, bias, approx

    def _match(self, site: _Site, k: int, rank: int, relaxed: bool = False, form: str = "split", why: str = "",
               allocation: str = "") -> Match:
        sp = site.spectrum
        enc, dec, bias, approx = self._factorised(site, k, rank)
        weight_err, data_err = sp.true_errors(approx)
        bound = float(sp.errors(k, self.options.error)[rank])
        before, after = site.dense_params(), int(enc.size + dec.size)
        detail = (f"k={k} rank {rank}: {before:,} -> {after:,} weights; op-norm error {weight_err:.3g} "
                  f"(predicted {bound:.3g})" + (f", data error {data_err:.3g}" if data_err is not None else "")
                  + (f"; output layer cut below its {sp.out} outputs to meet the budget" if relaxed else "")
                  + ("; runs slower than the dense layer in onnxruntime, kept to meet the budget" if site.slow else "")
                  + (f"; {why}" if why else "")
                  + (f"; whitened from {site.rows:,} calibration rows for {sp.cols:,} inputs (a rank-deficient "
                     "covariance: the truncation may fit the calibration data too closely; more samples help)"
                     if 0 < site.rows < sp.cols else ""))
        data = {"k": k, "rank": rank, "encoder": enc, "decoder": dec, "bias": bias, "weight": site.layer.weight,
                "weight_error": weight_err, "data_error": data_err, "bound": bound, "params_before": before,
                "params_after": after, "form": form, "allocation": allocation}
        return Match(site.name, "factorise", rank, before - after, detail, data)

    # ---- apply ------------------------------------------------------------------------------------------
    def apply(self, graph: gs.Graph, plan: Plan) -> PassResult:
        names, tally = NameSource(graph), SkipTally()
        rewritten = before = after = 0
        notes, outputs = [], {}
        for match in plan.matches:
            node = node_named(graph, match.site)
            layer = match_linear_layer(graph, node) if node is not None else None
            d = match.data
            if not isinstance(layer, LinearLayer) or layer.shape != d["weight"].shape \
                    or not np.array_equal(layer.weight, d["weight"]):
                tally.add("site changed since it was planned", match.site)
                continue
            write_factorised(graph, names, layer, d["encoder"], d["decoder"], d["bias"], d["k"], d["form"])
            outputs[match.site] = layer.output.name
            rewritten += 1
            before += d["params_before"]
            after += d["params_after"]
            notes.append(f"{match.site}: {match.detail}")
        chosen = next((m.data["allocation"] for m in plan.matches if m.data.get("allocation")), "")
        if chosen and notes:
            notes.insert(0, f"allocation: {chosen}")
        skipped = dict(plan.skipped)
        for why, n in tally.counts.items():
            skipped[why] = skipped.get(why, 0) + n
        return PassResult(self.name, changed=rewritten > 0, matched=len(plan.matches), rewritten=rewritten,
                          approximate=rewritten > 0, skipped=skipped,
                          counts={"layers_factorised": rewritten, "weights_before": before, "weights_after": after},
                          notes=tuple(notes), changed_outputs=outputs)


LATENCY_BATCHES = (1, 32)
FORM_ROUNDS, FORM_ROUND_MS = 5, 1.0  # a grouped-form timing: 5 interleaved rounds of ~1 ms per form and batch


class _Timings:
    """The onnxruntime timings of one plan, cached per layer shape: whether a factorised layer runs slower than
    the dense one, and which form of a grouped Gemm / MatMul runs faster."""

    def __init__(self, form: GroupedForm):
        self.form = form
        self.slower: dict[tuple, bool] = {}
        self.forms: dict[tuple, tuple[str, str]] = {}


def _shape_key(layer: LinearLayer, k: int, rank: int) -> tuple:
    shape = tuple(str(d) for d in layer.input.shape) if layer.input.shape is not None else None
    return layer.kind, layer.shape, shape, str(sorted(layer.conv_attrs.items())), k, rank


def _timing_feeds(layer: LinearLayer, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    dims = [batch] + [d if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in layer.input.shape[1:]]
    return {"x": rng.standard_normal(dims).astype(np.float32)}


def _slower(site: _Site, k: int, rank: int, timings: _Timings) -> bool:
    """Whether onnxruntime runs ``site`` factorised at ``(k, rank)`` (in the form it would be written)
    measurably slower than dense, at any of :data:`LATENCY_BATCHES` (interleaved rounds; cached per shape)."""
    layer = site.layer
    shape = layer.input.shape
    if shape is None or not len(shape):
        return False
    key = _shape_key(layer, k, rank)
    if key not in timings.slower:
        from ..runtime.latency import CompareOptions, compare_models_latency

        form, _ = _grouped_form(layer, k, rank, timings)
        dense, factorised = _single_layer_models(layer, k, rank, form)
        rng = np.random.default_rng(0)
        verdicts = []
        for batch in LATENCY_BATCHES:
            comparison = compare_models_latency([dense, factorised], _timing_feeds(layer, batch, rng),
                                                CompareOptions(rounds=9, round_ms=5.0, batch_size=batch))
            verdicts.append(comparison.ratios[1].change)
        timings.slower[key] = "slower" in verdicts
    return timings.slower[key]


def _grouped_form(layer: LinearLayer, k: int, rank: int, timings: _Timings) -> tuple[str, str]:
    """(form, what the note says) for writing ``layer`` at ``(k, rank)``: Convs and ``k = 1`` have one form;
    a grouped Gemm / MatMul takes the option's form, or with ``measure`` the faster of the Split form and
    the batched form, timed once per shape in onnxruntime at batch 1 and 32 (interleaved rounds, one pinned
    thread; the geometric mean of the two time ratios decides, Split unless batched is faster)."""
    if layer.kind == "conv" or k == 1:
        return "split", ""
    if not _batchable(layer):
        return "split", "grouped form: Split (the input's rank is unknown: no batched form)"
    if timings.form != "measure":
        return timings.form, f"grouped form: {_FORM_NAMES[timings.form]} (as asked)"
    key = _shape_key(layer, k, rank)
    if key not in timings.forms:
        from ..runtime.latency import CompareOptions, compare_models_latency

        split = _single_layer_models(layer, k, rank, "split")[1]
        batched = _single_layer_models(layer, k, rank, "batched")[1]
        rng = np.random.default_rng(0)
        ratios = []
        for batch in LATENCY_BATCHES:
            options = CompareOptions(rounds=FORM_ROUNDS, round_ms=FORM_ROUND_MS, warmup=3, min_block=1,
                                     batch_size=batch)
            ratios.append(compare_models_latency([split, batched], _timing_feeds(layer, batch, rng),
                                                 options).ratios[1].ratio)
        ratio = math.exp(float(np.mean(np.log(ratios))))
        form = "batched" if ratio < 1.0 else "split"
        timings.forms[key] = form, (f"grouped form: {_FORM_NAMES[form]} (measured: batched MatMul takes {ratio:.3f}x "
                                    "the time of Split + MatMuls)")
    return timings.forms[key]


_FORM_NAMES = {"split": "Split + MatMul per group + Concat", "batched": "batched MatMul"}


def _batchable(layer: LinearLayer) -> bool:
    """Whether the batched form can be written: the input's rank is known and at least 2."""
    return layer.input.shape is not None and len(layer.input.shape) >= 2


def _single_layer_models(layer: LinearLayer, k: int, rank: int, form: str = "split"):
    """(the layer alone, the layer factorised at ``(k, rank)`` in ``form`` with placeholder weights) as
    ModelProtos."""
    from onnx import TensorProto, helper, numpy_helper

    w = layer.weight.astype(np.float32)
    inits = [numpy_helper.from_array(layer.bias.astype(np.float32), "b")]
    if layer.kind == "conv":
        a = layer.conv_attrs
        inits.append(numpy_helper.from_array(w, "w"))
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", pads=a["pads"], strides=a["strides"],
                                  dilations=a["dilations"], kernel_shape=a["kernel_shape"])]
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "w"))
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="layer"),
                 helper.make_node("Add", ["m", "b"], ["y"])]
    shape = [None] + [d if isinstance(d, (int, np.integer)) and d > 0 else None for d in layer.input.shape[1:]]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    dense = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = gs.import_onnx(dense)
    view = match_linear_layer(g, next(n for n in g.nodes if n.name == "layer"))
    n = view.weight[0].size
    rng = np.random.default_rng(0)
    write_factorised(g, NameSource(g), view, rng.standard_normal((k * rank, n // k)),
                     rng.standard_normal((view.out_features, k * rank)), view.bias, k, form)
    g.cleanup().toposort()
    factorised = gs.export_onnx(g)
    del factorised.graph.value_info[:]  # typed without shapes: nothing to say
    return dense, factorised


class _OutputErrorJudge:
    """Chooses among candidate allocations by their measured output error on the calibration data.

    A candidate is written into a copy of the graph (every site factorised as it says, with the factors the
    pass would write) and run on the calibration samples; its error is ``sum ||y^ - y||^2 / sum ||y - mean
    y||^2`` over the graph's float outputs, ``y`` the unfactorised graph's outputs on the same samples. Only
    the calibration part is read (:class:`~onnx_lincomp.calibration.activations.CalibrationData`), never the
    held-out part. Scores are cached per allocation."""

    def __init__(self, graph: gs.Graph, data: CalibrationData, sites: list[_Site], factorised):
        self.graph, self.data, self.sites, self.factorised = graph, data, sites, factorised
        self.outputs = [t.name for t in graph.outputs]
        self.scores: dict[tuple, float] = {}
        self.summary = ""
        self._reference: list[dict[str, np.ndarray]] | None = None
        self._scale = 0.0

    def _load_reference(self) -> None:
        self._reference = [{n: v for n, v in batch.items() if np.issubdtype(v.dtype, np.floating)}
                           for batch in self.data.stream(self.graph, self.outputs)]
        for name in self._reference[0] if self._reference else ():
            values = np.concatenate([b[name].astype(np.float64) for b in self._reference])
            self._scale += float(((values - values.mean(axis=0)) ** 2).sum())

    def score(self, tables: list[dict[int, Choices]], picks: list[tuple[int, int]]) -> float:
        ranks = tuple((k, int(t[k].ranks[i])) for t, (k, i) in zip(tables, picks, strict=True))
        if ranks not in self.scores:
            if self._reference is None:
                self._load_reference()
            g = self.graph.copy()
            names = NameSource(g)
            for site, (k, rank) in zip(self.sites, ranks, strict=True):
                if rank:
                    enc, dec, bias, _ = self.factorised(site, k, rank)
                    write_factorised(g, names, match_linear_layer(g, node_named(g, site.name)), enc, dec, bias, k)
            g.cleanup().toposort()
            err = 0.0
            for ref, got in zip(self._reference, self.data.stream(g, self.outputs), strict=True):
                err += sum(float(((got[n].astype(np.float64) - v) ** 2).sum()) for n, v in ref.items())
            self.scores[ranks] = err / max(self._scale, 1e-300)
        return self.scores[ranks]

    def choose(self, tables: list[dict[int, Choices]],
               candidates: dict[str, list[tuple[int, int]]]) -> list[tuple[int, int]]:
        """The candidate with the lowest output error (the first on a tie); :attr:`summary` says which."""
        scored = {label: self.score(tables, picks) for label, picks in candidates.items()}
        best = min(scored, key=lambda label: scored[label])
        others = ", ".join(f"{label} {err:.3g}" for label, err in scored.items() if label != best)
        self.summary = (f"{best} chosen by relative output error on {self.data.samples} calibration samples "
                        f"({scored[best]:.3g}; {others or 'no other candidate'})")
        return candidates[best]


def write_factorised(graph: gs.Graph, names: NameSource, layer: LinearLayer, encoder: np.ndarray,
                     decoder: np.ndarray, bias: np.ndarray, k: int, form: str = "split") -> None:
    """Replace ``layer`` by its encoder (``k j x n/k`` stacked by group) and decoder (``f x k j``) with
    ``bias``; the layer's output tensor is kept, so its readers are untouched. A Gemm / MatMul with ``k > 1``
    is written in ``form``: ``split`` (Split along the features, one MatMul per group, Concat) or
    ``batched`` (Reshape the input of rank ``r`` to ``[..., k, n/k]``, Transpose the groups to the front,
    one MatMul with the ``[k, 1.., n/k, j]`` encoder, Transpose and Reshape back to ``[..., k j]``)."""
    head = layer.nodes[0]
    dtype = np.asarray(head.inputs[1].values).dtype
    base = head.name or layer.output.name
    x, out = layer.input, layer.output
    for node in layer.nodes:
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)

    def const(tag: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(names.fresh(f"{base}_{tag}"), np.ascontiguousarray(value.astype(dtype)))

    def var(tag: str) -> gs.Variable:
        return gs.Variable(names.fresh(f"{base}_{tag}"), dtype=out.dtype)

    def node(op: str, tag: str, inputs: list, outputs: list, attrs: dict | None = None) -> None:
        graph.nodes.append(gs.Node(op, names.fresh(f"{base}_{tag}"), attrs or {}, inputs, outputs))

    mid = var("lowrank")
    need_bias = layer.has_bias or bool(np.any(bias != 0))
    if layer.kind == "conv":
        kernel = [int(s) for s in layer.shape[2:]]
        attrs = {key: v for key, v in head.attrs.items() if key != "group"}
        attrs.update(group=k, kernel_shape=kernel)
        j = encoder.shape[0] // k
        node("Conv", "encoder", [x, const("encoder", encoder.reshape(k * j, -1, *kernel))], [mid], attrs)
        inputs = [mid, const("decoder", decoder.reshape(*decoder.shape, *[1] * len(kernel)))]
        node("Conv", "decoder", inputs + ([const("bias", bias)] if need_bias else []), [out],
             {"kernel_shape": [1] * len(kernel)})
        return
    if k == 1:
        node("MatMul", "encoder", [x, const("encoder", encoder.T)], [mid])
    elif form == "batched" and x.shape is not None and len(x.shape) >= 2:
        r, m, j = len(x.shape), layer.in_features // k, encoder.shape[0] // k
        lead = [0] * (r - 1)  # Reshape copies these dimensions

        def shape(tag: str, dims: list[int]) -> gs.Constant:
            return gs.Constant(names.fresh(f"{base}_{tag}"), np.array(dims, np.int64))

        grouped, moved, codes, back = var("grouped"), var("grouped_t"), var("codes"), var("codes_t")
        node("Reshape", "group_reshape", [x, shape("group_shape", lead + [k, m])], [grouped])
        node("Transpose", "group_transpose", [grouped], [moved], {"perm": [r - 1, *range(r - 1), r]})
        stacked = encoder.reshape(k, j, m).transpose(0, 2, 1).reshape(k, *[1] * (r - 2), m, j)
        node("MatMul", "encoder", [moved, const("encoder", stacked)], [codes])
        node("Transpose", "code_transpose", [codes], [back], {"perm": [*range(1, r), 0, r]})
        node("Reshape", "code_reshape", [back, shape("code_shape", lead + [k * j])], [mid])
    else:
        m, j = layer.in_features // k, encoder.shape[0] // k
        parts = [var(f"part{i}") for i in range(k)]
        if graph.opset >= 13:
            sizes = gs.Constant(names.fresh(f"{base}_split"), np.full(k, m, np.int64))
            node("Split", "split", [x, sizes], parts, {"axis": -1})
        else:
            node("Split", "split", [x], parts, {"axis": -1, "split": [m] * k})
        codes = [var(f"code{i}") for i in range(k)]
        for i in range(k):
            node("MatMul", f"encoder{i}", [parts[i], const(f"encoder{i}", encoder[i * j:(i + 1) * j].T)], [codes[i]])
        node("Concat", "concat", codes, [mid], {"axis": -1})
    if need_bias:
        dec_out = var("decoded")
        node("MatMul", "decoder", [mid, const("decoder", decoder.T)], [dec_out])
        node("Add", "bias_add", [dec_out, const("bias", bias)], [out])
    else:
        node("MatMul", "decoder", [mid, const("decoder", decoder.T)], [out])


__all__ = ["LowRank", "LowRankOptions", "write_factorised", "output_layer"]
