"""The ``analyze`` job: per Relu, which units are dead or always active, and what the passes' plans
would save. Nothing is mutated: the figures come from the read-only plans of remove-dead and
fold-linear at exact rates (first round: later folds and merges can save more)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .analysis.model_report import graph_figures
from .analysis.unit_sets import UnitEvidence
from .calibration.relu_stats import ReluStats, StatsSet
from .linear_layer import Skip
from .model_io import ModelContext
from .passes import PassContext, Plan
from .pipeline import plan_pipeline
from .recipe import PassSpec
from .relu_sites import find_relu_site

RATE_BINS = (0.0, 1e-12, 0.25, 0.5, 0.75, 1.0 - 1e-12, 1.0 + 1e-12)
RATE_BIN_LABELS = ("0", "(0,.25]", "(.25,.5]", "(.5,.75]", "(.75,1)", "1")


@dataclass(frozen=True)
class LayerAnalysis:
    relu: str
    width: int
    observed: str
    dead: int
    always_active: int
    sample_rate_hist: tuple[int, ...]
    position_rate_hist: tuple[int, ...]
    median_position_rate: float
    dead_params: int
    rewritable: bool
    reason: str

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["sample_rate_hist"] = dict(zip(RATE_BIN_LABELS, self.sample_rate_hist, strict=True))
        d["position_rate_hist"] = dict(zip(RATE_BIN_LABELS, self.position_rate_hist, strict=True))
        return d


@dataclass(frozen=True)
class Analysis:
    layers: tuple[LayerAnalysis, ...]
    params: int
    macs: int
    plans: tuple[Plan, ...]
    calibration: str
    random: bool
    samples: int
    not_analysed: tuple[tuple[str, str], ...]

    def _saved(self, name: str) -> int:
        return sum(p.params_saved for p in self.plans if p.pass_name == name)

    @property
    def dead_params_total(self) -> int:
        return self._saved("remove-dead")

    @property
    def fold_params_total(self) -> int:
        return self._saved("fold-linear")

    def as_dict(self) -> dict:
        return {"calibration": self.calibration, "random_calibration": self.random, "samples": self.samples,
                "params": self.params, "macs": self.macs,
                "params_after_exact_passes": self.params - self.dead_params_total - self.fold_params_total,
                "layers": [la.as_dict() for la in self.layers],
                "plans": [p.as_dict() for p in self.plans], "not_analysed": [list(x) for x in self.not_analysed]}


def _hist(rates: np.ndarray) -> tuple[int, ...]:
    counts, _ = np.histogram(rates, bins=RATE_BINS)
    return tuple(int(c) for c in counts)


def analyze_layer(graph: gs.Graph, relu: gs.Node, stats: ReluStats, saved: dict[str, int]) -> LayerAnalysis:
    site = find_relu_site(graph, relu)
    rewritable = not isinstance(site, Skip) or relu.name in saved
    return LayerAnalysis(
        relu=relu.name, width=stats.channels, observed=stats.observed, dead=int(stats.dead.sum()),
        always_active=int(stats.always_active.sum()), sample_rate_hist=_hist(stats.sample_rate),
        position_rate_hist=_hist(stats.position_rate), median_position_rate=float(np.median(stats.position_rate)),
        dead_params=saved.get(relu.name, 0), rewritable=rewritable,
        reason="" if rewritable else site.reason)


def analyze(graph: gs.Graph, ctx: ModelContext, stats: StatsSet) -> Analysis:
    by_name = {n.name: n for n in graph.nodes}
    specs = (PassSpec.of("remove-dead"), PassSpec.of("fold-linear"))
    plans = tuple(plan_pipeline(graph, specs, PassContext(UnitEvidence.from_stats(stats))))
    saved = {m.site: m.params_saved for m in plans[0].matches}
    for m in plans[0].matches:  # residual groups: every member Relu shares the group's saving
        for member in m.data.get("members", ()):
            saved[member] = m.params_saved
    layers = tuple(analyze_layer(graph, by_name[s.relu], s, saved) for s in stats.layers if s.relu in by_name)
    before = graph_figures(graph)  # the one counter on the graph itself: no export, no second inference
    return Analysis(layers, before.params, before.macs, plans, stats.source, stats.random, stats.n_samples,
                    stats.not_analysed)
