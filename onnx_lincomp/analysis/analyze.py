"""``analyze``: which Relu units are dead, which always active, and what removing/folding could save.

Per layer the estimate counts the producer rows and consumer columns of dead units; the total comes
from a dry run of the real passes on a copy of the graph (so it is what ``optimize`` would achieve
with default, exact-on-calibration rates).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..calibration.relu_stats import ReluStats, StatsSet
from ..linear_layer import Skip
from ..model_io import ModelContext, to_model_proto
from .model_report import model_report
from ..passes import DEFAULT_PASSES, PassContext
from ..pipeline import run_passes
from ..relu_sites import ReluSite, find_relu_site

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
        d["sample_rate_hist"] = dict(zip(RATE_BIN_LABELS, self.sample_rate_hist))
        d["position_rate_hist"] = dict(zip(RATE_BIN_LABELS, self.position_rate_hist))
        return d


@dataclass(frozen=True)
class Analysis:
    layers: tuple[LayerAnalysis, ...]
    params: int
    macs: int
    params_after: int
    macs_after: int
    calibration: str
    random: bool
    samples: int
    not_analysed: tuple[tuple[str, str], ...]

    def as_dict(self) -> dict:
        return {"calibration": self.calibration, "random_calibration": self.random, "samples": self.samples,
                "params": self.params, "macs": self.macs, "params_after_exact_passes": self.params_after,
                "macs_after_exact_passes": self.macs_after, "layers": [l.as_dict() for l in self.layers],
                "not_analysed": [list(x) for x in self.not_analysed]}


def _hist(rates: np.ndarray) -> tuple[int, ...]:
    counts, _ = np.histogram(rates, bins=RATE_BINS)
    return tuple(int(c) for c in counts)


def _dead_params(site: ReluSite, dead: np.ndarray) -> int:
    d = int(dead.sum())
    if d == 0:
        return 0
    p = site.producer
    rows = d * (int(p.weight[0].size) + (1 if p.has_bias else 0))
    cols = sum(d * link.block * link.layer.out_features * link.layer.kernel_size for link in site.consumers)
    return rows + cols


def analyze_layer(graph: gs.Graph, relu: gs.Node, stats: ReluStats) -> LayerAnalysis:
    site = find_relu_site(graph, relu)
    rewritable = not isinstance(site, Skip)
    return LayerAnalysis(
        relu=relu.name, width=stats.channels, observed=stats.observed, dead=int(stats.dead.sum()),
        always_active=int(stats.always_active.sum()), sample_rate_hist=_hist(stats.sample_rate),
        position_rate_hist=_hist(stats.position_rate), median_position_rate=float(np.median(stats.position_rate)),
        dead_params=_dead_params(site, stats.dead) if rewritable else 0, rewritable=rewritable,
        reason="" if rewritable else site.reason)


def analyze(graph: gs.Graph, ctx: ModelContext, stats: StatsSet) -> Analysis:
    by_name = {n.name: n for n in graph.nodes}
    layers = tuple(analyze_layer(graph, by_name[s.relu], s) for s in stats.layers if s.relu in by_name)
    before = model_report(to_model_proto(graph, ctx))
    trial = graph.copy()
    run_passes(trial, DEFAULT_PASSES, PassContext(stats))
    after = model_report(to_model_proto(trial, ctx))
    return Analysis(layers, before.params, before.macs, after.params, after.macs, stats.source, stats.random,
                    stats.n_samples, stats.not_analysed)


def plot_rates(stats: StatsSet, path: str) -> None:
    """Per-layer distributions of sample and position activation rates (needs the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(stats.layers), 1)
    fig, ax = plt.subplots(1, 2, figsize=(12, max(3.0, 0.35 * n + 1.5)))
    for k, (title, attr) in enumerate((("sample rate (active anywhere in a sample)", "sample_rate"),
                                       ("position rate (active positions)", "position_rate"))):
        data = [getattr(s, attr) for s in stats.layers]
        if data:
            ax[k].boxplot(data, orientation="horizontal", showfliers=True)
            ax[k].set_yticks(range(1, n + 1), [s.relu[:28] for s in stats.layers], fontsize=7)
        ax[k].set_xlim(-0.02, 1.02)
        ax[k].set_title(title)
        ax[k].axvline(0, color="red", lw=0.8, ls="--")
        ax[k].axvline(1, color="green", lw=0.8, ls="--")
    fig.suptitle(f"ReLU activation rates ({stats.source}, {stats.n_samples} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
