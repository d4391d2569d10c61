"""The ``optimize`` job as a library call: prepare -> unit evidence -> pipeline -> verify -> report.

One orchestrator for both modes: the evidence is either calibration statistics (verified on the
calibration part and the held-out part of the data) or a certificate over an input domain (verified on
random points of the domain, stamped into the model's metadata). The recipe that produced the output
goes into the report, so the run can be replayed exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from .analysis.model_report import ModelReport, model_report
from .analysis.unit_sets import UnitEvidence
from .calibration import CollectOptions, StatsSet, collect_relu_stats, input_specs, open_calibration
from .calibration.collector import Progress
from .calibration.data_source import CalibrationSource
from .canonicalize import CanonicalizeReport, canonicalize
from .errors import OptionError, VerificationGateError
from .evaluate.search import SWEEP_THRESHOLDS, Candidate, CandidateScore, scan, smallest_within
from .exact.compress import ExactOutcome, certify_for, stamp_and_check
from .model_io import LoadedModel, load_model, model_from_proto, to_model_proto
from .optimize_report import OptimizeReport, SizeFigures
from .passes import PassContext
from .pipeline import PassRecord, plan_pipeline, run_pipeline
from .recipe import ExactSettings, PassSpec, Recipe
from .relu_sites import relu_nodes
from .runtime.feeds import benchmark_feeds, fixed_batch
from .runtime.latency import CompareOptions, Latency, RatioEstimate, compare_models_latency
from .verify import Verification, compare_models

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizeOptions:
    """A recipe (what to do) plus how to run and judge it."""

    recipe: Recipe = field(default_factory=Recipe)
    labels: str | None = None
    max_accuracy_drop: float | None = None  # percentage points on the held-out split
    max_abs_error: float | None = None
    batch_size: int = 16
    threads: int = 0
    latency: bool = True
    search: bool = False  # with max_accuracy_drop: search the most aggressive linear rate within budget
    allow_larger: bool = False  # a larger or measurably slower output is an error unless allowed
    check_each_pass: bool = False  # compare with the original on calibration samples after every pass

    def __post_init__(self):
        if self.batch_size <= 0:
            raise OptionError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_accuracy_drop is not None and self.labels is None:
            raise OptionError("--max-accuracy-drop needs --labels KEY (the labels array in the calibration data)")
        if self.recipe.exact is not None and (self.max_accuracy_drop is not None or self.search):
            raise OptionError("--exact proves equality on the domain: --max-accuracy-drop does not apply")

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.recipe.calibration.input_shapes)


@dataclass(frozen=True)
class Result:
    model: onnx.ModelProto
    report: OptimizeReport
    exact: ExactOutcome | None = None  # exact mode: the certificate and the witness check


@dataclass
class Prepared:
    """A loaded model in canonical form, its original proto and the calibration split."""

    original: onnx.ModelProto
    loaded: LoadedModel
    canon: CanonicalizeReport
    source: CalibrationSource | None
    n_calib: int
    source_name: str = ""


def prepare(model: str | Path | onnx.ModelProto, calib: str | Path | None, options: OptimizeOptions) -> Prepared:
    if isinstance(model, onnx.ModelProto):
        loaded, name = model_from_proto(model), "<in-memory model>"
    else:
        loaded, name = load_model(model), str(model)
    original = to_model_proto(loaded.graph, loaded.ctx)
    canon = canonicalize(loaded.graph, ctx=loaded.ctx)
    cal = options.recipe.calibration
    source = None
    if calib is not None:
        source = open_calibration(calib, input_specs(loaded.graph), labels=options.labels,
                                  max_samples=cal.max_samples, shape_overrides=dict(cal.input_shapes))
    if source is None:
        return Prepared(original, loaded, canon, None, 0, name)
    n = len(source)
    split = 0.0 if options.recipe.exact is not None else cal.verify_split
    n_calib = n if source.is_random or split == 0 else max(1, int(round(n * (1 - split))))
    return Prepared(original, loaded, canon, source, n_calib, name)


def calibrate(prep: Prepared, options: OptimizeOptions, progress: Progress | None = None) -> StatsSet:
    if prep.source is None:
        raise OptionError("give --calib DATA (or --stats FILE)")
    return collect_relu_stats(prep.loaded.graph, prep.loaded.ctx, prep.source,
                              CollectOptions(batch_size=options.batch_size, threads=options.threads),
                              progress=progress, stop=prep.n_calib)


def pass_check(prep: Prepared, samples: int = 64):
    """A pipeline check: the graph after a pass against the original on the first calibration samples."""
    def check(graph, name: str) -> str:
        model = to_model_proto(graph, prep.loaded.ctx)
        v = compare_models(prep.original, model, prep.loaded.graph, prep.source, 0, min(samples, prep.n_calib))
        return f"after {name}: max abs error {v.max_abs:.3g} (relative {v.rel_max:.3g}) on {v.samples} calibration samples"
    return check


def compress(prep: Prepared, evidence: UnitEvidence, recipe: Recipe, ctx_metadata: dict[str, str] | None = None,
             check_each_pass: bool = False) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run the recipe's passes on a copy of the canonical graph; the prepared model is not touched."""
    graph = prep.loaded.graph.copy()
    check = pass_check(prep) if check_each_pass and prep.source is not None else None
    records = run_pipeline(graph, recipe.passes, PassContext(evidence), check=check)
    ctx = prep.loaded.ctx.with_metadata(ctx_metadata) if ctx_metadata else prep.loaded.ctx
    return to_model_proto(graph, ctx), records


def heldout_range(prep: Prepared) -> tuple[int, int | None]:
    if prep.source is not None and prep.source.is_random:
        return len(prep.source), 2 * len(prep.source)  # fresh random samples
    return prep.n_calib, None


def heldout_source(prep: Prepared) -> CalibrationSource:
    """The data to verify on: the held-out part, or fresh random samples for random calibration."""
    if prep.source.is_random:
        s = prep.source
        return CalibrationSource(s.specs, random_samples=2 * len(s), shape_overrides=s.shape_overrides, seed=s.seed,
                                 description=s.description)
    return prep.source


def _verify(prep: Prepared, model: onnx.ModelProto, options: OptimizeOptions) -> tuple[Verification, Verification | None]:
    g = prep.loaded.graph
    on_cal = compare_models(prep.original, model, g, prep.source, 0, prep.n_calib, labels=options.labels,
                            threads=options.threads)
    start, stop = heldout_range(prep)
    if not prep.source.is_random and start >= len(prep.source):
        return on_cal, None
    labels = None if prep.source.is_random else options.labels
    return on_cal, compare_models(prep.original, model, g, heldout_source(prep), start, stop, labels=labels,
                                  threads=options.threads)


def _check_gates(report: OptimizeReport, options: OptimizeOptions) -> None:
    held = report.on_heldout or report.on_calibration
    if held is None:
        return
    if options.max_abs_error is not None and held.max_abs > options.max_abs_error:
        raise VerificationGateError(f"max abs error {held.max_abs:.3g} exceeds --max-abs-error {options.max_abs_error:g}; no output written")
    if options.max_accuracy_drop is not None and held.accuracy_before is not None:
        drop = 100.0 * (held.accuracy_before - held.accuracy_after)
        if drop > options.max_accuracy_drop:
            raise VerificationGateError(f"accuracy drop {drop:.2f} points exceeds --max-accuracy-drop {options.max_accuracy_drop:g}; no output written")


def _check_not_worse(report: OptimizeReport, options: OptimizeOptions) -> str | None:
    """Never worse by surprise: a larger or more expensive output is a gate failure unless allowed."""
    b, a = report.before, report.after
    worse = [f"{what} {x:,} -> {y:,}" for what, x, y in (("parameters", b.params, a.params), ("MACs", b.macs, a.macs))
             if y > x]
    if a.latency_verdict == "slower":
        worse.append(f"batch-1 latency {a.latency_ratio:.2f}x the original")
    if not worse:
        return None
    message = "the output is worse than the input: " + "; ".join(worse)
    if not options.allow_larger:
        raise VerificationGateError(message + " (pass --allow-larger to keep it); no output written")
    return message + " (allowed by --allow-larger)"


def _evidence(prep: Prepared, options: OptimizeOptions, stats: StatsSet | None, progress: Progress | None,
              certificate) -> tuple[UnitEvidence, StatsSet | None, ExactOutcome | None]:
    if options.recipe.exact is not None:
        outcome = certify_for(prep.loaded, prep.source, options.recipe.exact, options.input_shapes, certificate)
        return outcome.certificate.unit_evidence(), None, outcome
    if stats is None:
        stats = calibrate(prep, options, progress)
    return UnitEvidence.from_stats(stats), stats, None


def optimize(model: str | Path | onnx.ModelProto, calib: str | Path | None, options: OptimizeOptions = OptimizeOptions(),
             stats: StatsSet | None = None, progress: Progress | None = None, certificate=None) -> Result:
    """Compress ``model``; raises on a failed verification gate (nothing is returned to write)."""
    prep = prepare(model, calib, options)
    evidence, stats, exact = _evidence(prep, options, stats, progress, certificate)
    messages: list[str] = []
    if not relu_nodes(prep.loaded.graph):
        messages.append("the model has no Relu in its main graph: the linearity passes have nothing to do")
    recipe, search_rows, chosen = options.recipe, (), None
    if options.search and options.max_accuracy_drop is not None:
        chosen, search_rows = _search_linear_rate(prep, evidence, options)
        recipe = chosen.recipe if chosen is not None else recipe
        messages.append(f"accuracy-budgeted search chose linear rate {chosen.value}" if chosen is not None else
                        "accuracy-budgeted search found no linear rate within the budget; exact rates kept")
    metadata = exact.metadata if exact is not None else None
    optimized, records = ((chosen.model, list(chosen.records)) if chosen is not None
                          else compress(prep, evidence, recipe, metadata, options.check_each_pass))
    if options.latency and any(r.result.count("skip_params") for r in records):
        recipe, optimized, records, note = _cheaper_without_skips(prep, evidence, recipe, metadata, optimized, records, options)
        messages.append(note)
    if exact is not None:
        on_cal, on_held = stamp_and_check(prep.original, optimized, prep.loaded.graph, exact), None
    else:
        on_cal, on_held = _verify(prep, optimized, options)
    lat = _latencies(prep, optimized, options) if options.latency else ((None, None), (None, None, None, None))
    report = OptimizeReport(
        model=prep.source_name, evidence=evidence.description, random_calibration=bool(stats and stats.random),
        calibration_samples=prep.n_calib if exact is None else 0,
        heldout_samples=on_held.samples if on_held else 0, canonicalize=prep.canon, passes=tuple(records),
        before=SizeFigures.of(model_report(prep.original, options.input_shapes), *lat[0]),
        after=SizeFigures.of(model_report(optimized, options.input_shapes), *lat[1]),
        on_calibration=on_cal, on_heldout=on_held, recipe=recipe,
        exact_on_evidence=not any(r.result.approximate for r in records), messages=tuple(messages),
        not_analysed=evidence.not_analysed, search=tuple(search_rows),
        certificate=exact.as_dict() if exact is not None else None)
    _check_gates(report, options)
    worse = _check_not_worse(report, options)
    if worse:
        report = replace(report, messages=report.messages + (worse,))
    return Result(optimized, report, exact)


def with_linear_rate(recipe: Recipe, rate: float) -> Recipe:
    """``recipe`` with fold-linear's linear rate set to ``rate`` (fold-linear added when absent)."""
    if recipe.spec("fold-linear") is None:
        return replace(recipe, passes=recipe.passes + (PassSpec.of("fold-linear", {"linear_rate": rate}),))
    return _with_fold_options(recipe, linear_rate=rate)


def _cheaper_without_skips(prep: Prepared, evidence: UnitEvidence, recipe: Recipe, metadata, model, records,
                           options: OptimizeOptions):
    """Skip paths save parameters but add nodes: keep them only when onnxruntime runs them no slower than
    the same recipe without skip paths (batch 1, interleaved rounds). The recipe records the choice."""
    alt_recipe = _with_fold_options(recipe, skip_paths=False)
    alt_model, alt_records = compress(prep, evidence, alt_recipe, metadata)
    feeds = _latency_feeds(prep, options)[0]
    c = compare_models_latency([alt_model, model], feeds, CompareOptions(threads=options.threads or 1, batch_size=1))
    verdict = c.ratios[1]
    if verdict.change == "slower":
        return alt_recipe, alt_model, alt_records, (f"skip paths dropped: {verdict.verdict} at batch 1 than the same folds "
                                                    f"without them (fold-linear skip_paths=false in the recipe)")
    return recipe, model, records, f"skip paths kept: {verdict.verdict} at batch 1 against the form without them"


def _with_fold_options(recipe: Recipe, **changes) -> Recipe:
    specs = tuple(PassSpec(s.name, replace(s.options, **changes)) if s.name == "fold-linear" else s for s in recipe.passes)
    return replace(recipe, passes=specs)


def _threshold_candidates(prep: Prepared, evidence: UnitEvidence, options: OptimizeOptions, thresholds,
                          latency: bool) -> list[Candidate]:
    start, stop = heldout_range(prep)
    labels = None if prep.source.is_random else options.labels
    held = heldout_source(prep)
    g = prep.loaded.graph

    def build(rate: float):
        recipe = with_linear_rate(options.recipe, rate)
        model, records = compress(prep, evidence, recipe)
        return recipe, model, records

    def measure(model):
        rep = model_report(model, options.input_shapes)
        return rep.params, rep.macs

    def score(model) -> CandidateScore:
        v = compare_models(prep.original, model, g, held, start, stop, labels=labels, threads=options.threads)
        lat = _latencies(prep, model, options)[1][0] if latency else None
        drop = None if v.accuracy_before is None else 100.0 * (v.accuracy_before - v.accuracy_after)
        low, high = (drop, drop) if drop is not None else (None, None)
        return CandidateScore(v.accuracy_after, drop, low, high, lat.median_ms if lat else None, v.max_abs)

    return scan(thresholds, build, measure, score)


def _search_linear_rate(prep: Prepared, evidence: UnitEvidence, options: OptimizeOptions) -> tuple[Candidate | None, list[dict]]:
    """The fewest-parameter linear rate whose paired drop bound keeps the budget, and every row scanned."""
    candidates = _threshold_candidates(prep, evidence, options, sorted(SWEEP_THRESHOLDS, reverse=True), latency=False)
    best = smallest_within(candidates, options.max_accuracy_drop)
    rows = [dict(c.row(), linear_rate=c.value, within_budget=c is best or (c.score.drop_high is not None
             and c.score.drop_high <= options.max_accuracy_drop)) for c in candidates]
    return best, rows


def _latency_feeds(prep: Prepared, options: OptimizeOptions) -> tuple[dict, dict, bool]:
    """(batch-1 feeds, batch feeds, whether the model takes only one batch shape)."""
    graph = prep.loaded.graph
    source = prep.source or open_calibration(f"random:{options.batch_size}", input_specs(graph),
                                             shape_overrides=options.input_shapes)
    feeds_b, _ = benchmark_feeds(graph, source, options.batch_size)
    fixed = bool(source.per_sample) or fixed_batch(graph, source.per_sample) is not None
    return (feeds_b if fixed else {k: v[:1] for k, v in feeds_b.items()}), feeds_b, fixed


def _latencies(prep: Prepared, model: onnx.ModelProto, options: OptimizeOptions):
    """((before b1, before batch), (after b1, after batch, change b1, change batch)) from interleaved rounds."""
    feeds_1, feeds_b, fixed = _latency_feeds(prep, options)
    threads = options.threads or 1
    c1 = compare_models_latency([prep.original, model], feeds_1, CompareOptions(threads=threads, batch_size=1))
    if fixed:
        return (c1.latencies[0], None), (c1.latencies[1], None, c1.ratios[1], None)
    n = len(next(iter(feeds_b.values())))
    cb = compare_models_latency([prep.original, model], feeds_b, CompareOptions(threads=threads, batch_size=n))
    return (c1.latencies[0], cb.latencies[0]), (c1.latencies[1], cb.latencies[1], c1.ratios[1], cb.ratios[1])


def compress_exact(loaded: LoadedModel, domain_spec: tuple[str, ...], *, calib: str | None = None,
                   passes=("remove-dead", "fold-linear", "merge-affine"), check_points: int = 10000,
                   milp_time_limit: float = 240.0, milp: bool = True, input_shapes: dict | None = None,
                   certificate=None) -> Result:
    """Exact compression of an already loaded model through the one orchestrator."""
    recipe = Recipe(tuple(PassSpec.of(p) for p in passes),
                    exact=ExactSettings(tuple(domain_spec), milp_time_limit, milp, check_points))
    if input_shapes:
        recipe = replace(recipe, calibration=replace(recipe.calibration, input_shapes=tuple(input_shapes.items())))
    return optimize(to_model_proto(loaded.graph, loaded.ctx), calib, OptimizeOptions(recipe, latency=False),
                    certificate=certificate)


def sweep(model: str | Path, calib: str | Path, options: OptimizeOptions, thresholds=SWEEP_THRESHOLDS,
          progress: Progress | None = None) -> list[dict]:
    """Compress at every linear-rate threshold from one calibration pass; size, MACs, latency, accuracy each."""
    prep = prepare(model, calib, options)
    evidence = UnitEvidence.from_stats(calibrate(prep, options, progress))
    rows = []
    for c in _threshold_candidates(prep, evidence, options, thresholds, latency=options.latency):
        skip = sum(r.result.count("skip_params") for r in c.records)
        rows.append({"threshold": c.value, "params": c.params, "layer_params": c.params - skip, "skip_params": skip,
                     "macs": c.macs, "latency_ms": c.score.latency_ms, "accuracy": c.score.accuracy,
                     "drop_low": c.score.drop_low, "drop_high": c.score.drop_high,
                     "neurons_folded": sum(r.result.neurons_folded for r in c.records),
                     "neurons_removed": sum(r.result.neurons_removed for r in c.records)})
    return rows


def explain(model: str | Path | onnx.ModelProto, calib: str | Path | None, options: OptimizeOptions,
            stats: StatsSet | None = None, progress: Progress | None = None):
    """The recipe's plans on the canonical model (read-only) and, in exact mode, the certificate."""
    prep = prepare(model, calib, options)
    evidence, _, exact = _evidence(prep, options, stats, progress, None)
    plans = plan_pipeline(prep.loaded.graph, options.recipe.passes, PassContext(evidence))
    return plans, exact.certificate if exact is not None else None
