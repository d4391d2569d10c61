"""The ``optimize`` job as a library call: load, canonicalise, calibrate, rewrite, verify, report."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from .calibration import CollectOptions, StatsSet, collect_relu_stats, input_specs, open_calibration
from .calibration.collector import Progress, fixed_batch, iterate_feeds
from .calibration.data_source import CalibrationSource
from .canonicalize import CanonicalizeReport, canonicalize
from .errors import LincompError, VerificationGateError
from .latency import Latency, LatencyOptions, make_session, measure_session
from .model_io import LoadedModel, load_model, model_from_proto, to_model_proto
from .analysis.model_report import ModelReport, model_report
from .passes import DEFAULT_PASSES, PASSES, PassContext
from .passes.fold_linear_relu import LayerThreshold
from .pipeline import PassRecord, run_passes
from .relu_sites import relu_nodes
from .verify import Verification, compare_models, model_accuracy

logger = logging.getLogger(__name__)
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 21))


@dataclass(frozen=True)
class OptimizeOptions:
    passes: tuple[str, ...] = DEFAULT_PASSES
    dead_rate: float = 0.0
    linear_rate: float = 1.0
    layer_threshold: LayerThreshold = "auto"
    verify_split: float = 0.2
    labels: str | None = None
    max_accuracy_drop: float | None = None  # percentage points on the held-out split
    max_abs_error: float | None = None
    batch_size: int = 16
    max_samples: int | None = None
    threads: int = 0
    latency: bool = True
    search: bool = False  # with max_accuracy_drop: search the most aggressive linear rate within budget
    channel_multiple: int = 1  # remove-dead keeps widths at multiples of this (onnxruntime's blocked convs like 8)
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self):
        unknown = [p for p in self.passes if p not in PASSES]
        if unknown:
            raise LincompError(f"unknown pass '{unknown[0]}' (known: {', '.join(PASSES)})")
        if not 0.0 <= self.dead_rate < 1.0:
            raise LincompError(f"--dead-rate must be in [0, 1), got {self.dead_rate}")
        if not 0.0 < self.linear_rate <= 1.0:
            raise LincompError(f"--linear-rate must be in (0, 1], got {self.linear_rate}")
        if not 0.0 <= self.verify_split < 1.0:
            raise LincompError(f"--verify-split must be in [0, 1), got {self.verify_split}")
        if self.batch_size <= 0:
            raise LincompError(f"--batch-size must be positive, got {self.batch_size}")
        if self.channel_multiple < 1:
            raise LincompError(f"--channel-multiple must be at least 1, got {self.channel_multiple}")
        if self.max_accuracy_drop is not None and self.labels is None:
            raise LincompError("--max-accuracy-drop needs --labels KEY (the labels array in the calibration data)")


@dataclass(frozen=True)
class SizeFigures:
    params: int
    macs: int
    size_bytes: int
    latency_b1: Latency | None = None
    latency_batch: Latency | None = None

    @staticmethod
    def of(report: ModelReport, lat1: Latency | None, latb: Latency | None) -> "SizeFigures":
        return SizeFigures(report.params, report.macs, report.size_bytes, lat1, latb)

    def as_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "size_bytes": self.size_bytes,
                "latency_batch1": self.latency_b1.as_dict() if self.latency_b1 else None,
                "latency_batch": self.latency_batch.as_dict() if self.latency_batch else None}


@dataclass(frozen=True)
class OptimizeReport:
    model: str
    calibration: str
    random_calibration: bool
    calibration_samples: int
    heldout_samples: int
    canonicalize: CanonicalizeReport
    passes: tuple[PassRecord, ...]
    before: SizeFigures
    after: SizeFigures
    on_calibration: Verification | None
    on_heldout: Verification | None
    linear_rate: float
    dead_rate: float
    exact_on_calibration: bool
    messages: tuple[str, ...] = ()
    not_analysed: tuple[tuple[str, str], ...] = ()
    search: tuple[dict, ...] = ()

    def as_dict(self) -> dict:
        return {
            "model": self.model, "calibration": self.calibration, "random_calibration": self.random_calibration,
            "calibration_samples": self.calibration_samples, "heldout_samples": self.heldout_samples,
            "canonicalize": self.canonicalize.as_dict(), "passes": [p.as_dict() for p in self.passes],
            "before": self.before.as_dict(), "after": self.after.as_dict(),
            "verification_calibration": self.on_calibration.as_dict() if self.on_calibration else None,
            "verification_heldout": self.on_heldout.as_dict() if self.on_heldout else None,
            "linear_rate": self.linear_rate, "dead_rate": self.dead_rate,
            "exact_on_calibration": self.exact_on_calibration, "messages": list(self.messages),
            "not_analysed": [list(x) for x in self.not_analysed], "search": list(self.search),
        }


@dataclass(frozen=True)
class Result:
    model: onnx.ModelProto
    report: OptimizeReport


@dataclass
class Prepared:
    """A loaded model in canonical form, its original proto and the calibration split."""

    original: onnx.ModelProto
    loaded: LoadedModel
    canon: CanonicalizeReport
    source: CalibrationSource
    n_calib: int
    source_name: str = field(default="")


def prepare(model: str | Path | onnx.ModelProto, calib: str | Path, options: OptimizeOptions) -> Prepared:
    if isinstance(model, onnx.ModelProto):
        loaded, name = model_from_proto(model), "<in-memory model>"
    else:
        loaded, name = load_model(model), str(model)
    original = to_model_proto(loaded.graph, loaded.ctx)
    canon = canonicalize(loaded.graph, ctx=loaded.ctx)
    source = open_calibration(calib, input_specs(loaded.graph), labels=options.labels,
                              max_samples=options.max_samples, shape_overrides=dict(options.input_shapes))
    n = len(source)
    n_calib = n if source.is_random or options.verify_split == 0 else max(1, int(round(n * (1 - options.verify_split))))
    return Prepared(original, loaded, canon, source, n_calib, name)


def calibrate(prep: Prepared, options: OptimizeOptions, progress: Progress | None = None) -> StatsSet:
    return collect_relu_stats(prep.loaded.graph, prep.loaded.ctx, prep.source,
                              CollectOptions(batch_size=options.batch_size, threads=options.threads),
                              progress=progress, stop=prep.n_calib)


def compress(prep: Prepared, stats: StatsSet, options: OptimizeOptions) -> tuple[onnx.ModelProto, list[PassRecord]]:
    graph = prep.loaded.graph.copy()
    ctx = PassContext(stats, dead_rate=options.dead_rate, linear_rate=options.linear_rate)
    records = run_passes(graph, options.passes, ctx, options.layer_threshold, channel_multiple=options.channel_multiple)
    return to_model_proto(graph, prep.loaded.ctx), records


def _heldout_range(prep: Prepared) -> tuple[int, int | None]:
    if prep.source.is_random:
        return len(prep.source), 2 * len(prep.source)  # fresh random samples
    return prep.n_calib, None


def _verify(prep: Prepared, model: onnx.ModelProto, options: OptimizeOptions) -> tuple[Verification, Verification | None]:
    g = prep.loaded.graph
    on_cal = compare_models(prep.original, model, g, prep.source, 0, prep.n_calib, labels=options.labels,
                            threads=options.threads)
    start, stop = _heldout_range(prep)
    if not prep.source.is_random and start >= len(prep.source):
        return on_cal, None
    if prep.source.is_random:
        held_src = replace_random_count(prep.source, stop)
        return on_cal, compare_models(prep.original, model, g, held_src, start, stop, threads=options.threads)
    return on_cal, compare_models(prep.original, model, g, prep.source, start, stop, labels=options.labels,
                                  threads=options.threads)


def replace_random_count(source: CalibrationSource, count: int) -> CalibrationSource:
    return CalibrationSource(source.specs, random_samples=count, shape_overrides=source.shape_overrides,
                             seed=source.seed, description=source.description)


def _latencies(prep: Prepared, model: onnx.ModelProto, options: OptimizeOptions) -> tuple[Latency | None, Latency | None]:
    if not options.latency:
        return None, None
    feeds_b = next(iter(iterate_feeds(prep.loaded.graph, prep.source, options.batch_size, 0, options.batch_size)))[0]
    fixed = prep.source.per_sample or fixed_batch(prep.loaded.graph) is not None
    feeds_1 = feeds_b if fixed else {k: v[:1] for k, v in feeds_b.items()}
    runs = [(feeds_1, 1)] if fixed else [(feeds_1, 1), (feeds_b, len(next(iter(feeds_b.values()))))]
    results = []
    with tempfile.TemporaryDirectory(prefix="lincomp-lat-") as workdir:
        sess = make_session(model, workdir, options.threads)
        for feeds, bs in runs:
            results.append(measure_session(sess, feeds, LatencyOptions(runs=30, warmup=3, threads=options.threads, batch_size=bs)))
    return results[0], (results[1] if len(results) > 1 else None)  # a fixed-batch model has no second figure


def _check_gates(report: OptimizeReport, options: OptimizeOptions) -> None:
    held = report.on_heldout or report.on_calibration
    if options.max_abs_error is not None and held.max_abs > options.max_abs_error:
        raise VerificationGateError(f"max abs error {held.max_abs:.3g} exceeds --max-abs-error {options.max_abs_error:g}; no output written")
    if options.max_accuracy_drop is not None and held.accuracy_before is not None:
        drop = 100.0 * (held.accuracy_before - held.accuracy_after)
        if drop > options.max_accuracy_drop:
            raise VerificationGateError(f"accuracy drop {drop:.2f} points exceeds --max-accuracy-drop {options.max_accuracy_drop:g}; no output written")


def _threshold_rows(prep: Prepared, stats: StatsSet, options: OptimizeOptions, thresholds) -> list[dict]:
    """Compress at each linear-rate threshold from one set of statistics: size, MACs, latency, held-out accuracy."""
    start, stop = _heldout_range(prep)
    rows = []
    for t in thresholds:
        m, records = compress(prep, stats, replace(options, linear_rate=t))
        rep = model_report(m, dict(options.input_shapes))
        skip_params = sum(int(np.prod(i.dims)) for i in m.graph.initializer if i.name.startswith("skip_w"))
        lat1, _ = _latencies(prep, m, options)
        acc = model_accuracy(m, prep.loaded.graph, prep.source, options.labels, start, stop) if options.labels else None
        rows.append({"threshold": t, "params": rep.params, "layer_params": rep.params - skip_params,
                     "skip_params": skip_params, "macs": rep.macs,
                     "latency_ms": lat1.median_ms if lat1 else None, "accuracy": acc,
                     "neurons_folded": sum(r.result.neurons_folded for r in records),
                     "neurons_removed": sum(r.result.neurons_removed for r in records)})
    return rows


def _search_rate(prep: Prepared, stats: StatsSet, options: OptimizeOptions) -> tuple[OptimizeOptions, list[dict]]:
    """Most aggressive linear rate (fewest parameters) whose held-out accuracy drop stays within budget."""
    start, stop = _heldout_range(prep)
    base = model_accuracy(prep.original, prep.loaded.graph, prep.source, options.labels, start, stop)
    rows, best = [], None
    for r in _threshold_rows(prep, stats, replace(options, latency=False), sorted(SWEEP_THRESHOLDS, reverse=True)):
        ok = base is not None and r["accuracy"] is not None and 100.0 * (base - r["accuracy"]) <= options.max_accuracy_drop
        rows.append({"linear_rate": r["threshold"], "params": r["params"], "accuracy": r["accuracy"], "within_budget": ok})
        if ok and (best is None or r["params"] < best[1]):
            best = (r["threshold"], r["params"])
    chosen = replace(options, linear_rate=best[0]) if best else options
    return chosen, rows


def optimize(model: str | Path | onnx.ModelProto, calib: str | Path, options: OptimizeOptions = OptimizeOptions(),
             stats: StatsSet | None = None, progress: Progress | None = None) -> Result:
    """Compress ``model`` with the statistics of ``calib``; raises on a failed verification gate."""
    prep = prepare(model, calib, options)
    if stats is None:
        stats = calibrate(prep, options, progress)
    messages: list[str] = []
    if not relu_nodes(prep.loaded.graph):
        messages.append("the model has no Relu in its main graph: nothing to compress, written unchanged apart from canonicalisation")
    search_rows: list[dict] = []
    if options.search and options.max_accuracy_drop is not None:
        options, search_rows = _search_rate(prep, stats, options)
        messages.append(f"accuracy-budgeted search chose linear rate {options.linear_rate}")
    optimized, records = compress(prep, stats, options)
    on_cal, on_held = _verify(prep, optimized, options)
    exact = options.linear_rate >= 1.0 and options.dead_rate <= 0.0
    report = OptimizeReport(
        model=prep.source_name, calibration=prep.source.description, random_calibration=prep.source.is_random,
        calibration_samples=prep.n_calib, heldout_samples=on_held.samples if on_held else 0,
        canonicalize=prep.canon, passes=tuple(records),
        before=SizeFigures.of(model_report(prep.original, dict(options.input_shapes)), *_latencies(prep, prep.original, options)),
        after=SizeFigures.of(model_report(optimized, dict(options.input_shapes)), *_latencies(prep, optimized, options)),
        on_calibration=on_cal, on_heldout=on_held, linear_rate=options.linear_rate, dead_rate=options.dead_rate,
        exact_on_calibration=exact, messages=tuple(messages), not_analysed=stats.not_analysed, search=tuple(search_rows))
    _check_gates(report, options)
    return Result(optimized, report)


def sweep(model: str | Path, calib: str | Path, options: OptimizeOptions, thresholds=SWEEP_THRESHOLDS,
          progress: Progress | None = None) -> list[dict]:
    """Compress at every linear-rate threshold from one calibration pass; size, MACs, latency, accuracy each."""
    prep = prepare(model, calib, options)
    return _threshold_rows(prep, calibrate(prep, options, progress), options, thresholds)
