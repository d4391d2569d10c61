"""The ``optimize`` job as a library call: prepare -> unit evidence -> pipeline -> verify -> gates -> report.

One orchestrator for both modes: the evidence is either calibration statistics (verified on the
calibration part and the held-out part of the data, the accuracy budget gated on a paired bound) or a
certificate over an input domain (verified on random points of the domain, stamped into the model's
metadata). The recipe that produced the output goes into the report, so the run can be replayed exactly.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from . import mapped_data
from .analysis.model_report import graph_figures, model_report
from .analysis.storage import storage_sizes
from .analysis.unit_sets import UnitEvidence
from .calibration import StatsSet
from .calibration.collector import Progress
from .errors import NumericalMismatchError, OptionError
from .evaluate.evaluator import Evaluator, Verification
from .evaluate.search import SWEEP_THRESHOLDS, Candidate, CandidateScore, scan, smallest_within
from .evaluate.tensor_errors import tensor_errors
from .gates import (
    check_gates,
    check_not_worse,
    compare_two,
    latencies,
    latency_feeds,
    require_budget_support,
    require_samples,
)
from .model_io import LoadedModel, to_model_proto
from .optimize_report import OptimizeReport, SizeFigures
from .passes import PASSES, PassContext
from .passes.base import StepProgress
from .pipeline import PassRecord, plan_pipeline, run_pipeline
from .prepared import GateOn, Prepared, calibrate, calibration_data, pass_check, prepare
from .recipe import ExactSettings, PassSpec, Recipe
from .relu_sites import relu_nodes

if TYPE_CHECKING:  # exact mode (and its MILP solver) is imported only when a run asks for it
    from .exact.compress import ExactOutcome

logger = logging.getLogger(__name__)
DEFAULT_MAX_OUTPUT_CHANGE = 0.01
DEFAULT_MIN_SAMPLES = 32
SPOT_CHECK_SAMPLES = 8


@dataclass(frozen=True)
class OptimizeOptions:
    """A recipe (what to do) plus how to run and judge it."""

    recipe: Recipe = field(default_factory=Recipe)
    labels: str | None = None
    max_accuracy_drop: float | None = None  # points, gated on the upper end of the paired interval
    max_abs_error: float | None = None
    # largest held-out output change relative to the output scale; the default applies only when neither
    # --max-abs-error nor --max-accuracy-drop is given (they say what change is acceptable); None: off
    max_output_change: float | None = DEFAULT_MAX_OUTPUT_CHANGE
    min_samples: int = DEFAULT_MIN_SAMPLES  # statistics on fewer calibration samples are a gate failure
    gate_on: GateOn = "heldout"  # "all": judge the budget on every sample (statistics still from the calibration part)
    batch_size: int = 16
    threads: int = 0
    latency: bool = True
    search: bool = False  # with max_accuracy_drop: search the most aggressive linear rate within budget
    allow_larger: bool = False  # a larger or measurably slower output is an error unless allowed
    check_each_pass: bool = False  # compare with the original on calibration samples after every pass
    min_agreement: float | None = None  # gate: top-1 agreement with the original on the gate split
    max_mean_error: float | None = None  # gate: mean absolute output error on the gate split (dense outputs)

    def __post_init__(self):
        if self.batch_size <= 0:
            raise OptionError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_accuracy_drop is not None and self.labels is None:
            raise OptionError("--max-accuracy-drop needs --labels KEY (the labels array in the calibration data)")
        if self.recipe.exact is not None and (self.max_accuracy_drop is not None or self.search):
            raise OptionError("--exact proves equality on the domain: --max-accuracy-drop does not apply")
        if self.gate_on not in ("heldout", "all"):
            raise OptionError(f"--gate-on must be 'heldout' or 'all', got {self.gate_on!r}")
        if self.recipe.exact is not None and self.lossy_passes:
            raise OptionError(f"--exact proves the output unchanged on the domain: lossy pass "
                              f"'{self.lossy_passes[0]}' cannot run in exact mode")
        if self.min_samples < 1 or (self.max_output_change is not None and self.max_output_change <= 0):
            raise OptionError("--min-samples must be at least 1 and --max-output-change positive")

    @property
    def lossy_passes(self) -> tuple[str, ...]:
        """Passes of the recipe that change outputs by design (pruning, ...)."""
        return tuple(s.name for s in self.recipe.passes if PASSES[s.name].lossy)

    @property
    def output_change_limit(self) -> float | None:
        """The relative output-change gate in force: explicit error or accuracy gates replace the default, and
        the default (a guard for passes meant to be exact) does not apply to a recipe with a lossy pass."""
        if self.max_output_change == DEFAULT_MAX_OUTPUT_CHANGE and (
                self.max_abs_error is not None or self.max_accuracy_drop is not None or self.lossy_passes
                or self.min_agreement is not None or self.max_mean_error is not None):
            return None
        return self.max_output_change

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.recipe.calibration.input_shapes)


@dataclass(frozen=True)
class Result:
    """The optimised model and its report. For an input with external data, ``model``'s unchanged weights
    are references to the input's data files (:mod:`.mapped_data`): save it with
    :func:`onnx_lincomp.model_io.save_model_proto` (which copies them), not with ``onnx.save``."""

    model: onnx.ModelProto
    report: OptimizeReport
    exact: ExactOutcome | None = None  # exact mode: the certificate and the witness check


def compress(prep: Prepared, evidence: UnitEvidence, recipe: Recipe, ctx_metadata: dict[str, str] | None = None,
             check_each_pass: bool = False, threads: int = 0, progress: StepProgress | None = None
             ) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run the recipe's passes on a copy of the canonical graph; the prepared model is not touched.
    ``progress``: where the passes' long steps (decompositions, refits) report, one label each."""
    graph = prep.loaded.graph.copy()
    check = pass_check(prep) if check_each_pass and prep.source is not None else None
    ctx = PassContext(evidence, calibration_data(prep, threads=threads), progress)
    records = run_pipeline(graph, recipe.passes, ctx, check=check)
    model_ctx = prep.loaded.ctx.with_metadata(ctx_metadata) if ctx_metadata else prep.loaded.ctx
    # unchanged weights mapped from the input's external data stay references (Result.model docstring)
    mapped = mapped_data.release(prep.loaded.graph) + mapped_data.release(graph)
    if mapped:  # the pages the passes read from the input's data files go; replaced weights are freed now
        gc.collect()  # (graphs are cycles of nodes and tensors: without this, only at the next collection)
    model = to_model_proto(graph, model_ctx, keep_mapped=True)
    if mapped:
        del graph, ctx
        gc.collect()
    return model, records


def _evidence(prep: Prepared, options: OptimizeOptions, stats: StatsSet | None, progress: Progress | None,
              certificate) -> tuple[UnitEvidence, StatsSet | None, ExactOutcome | None]:
    if options.recipe.exact is not None:
        from .exact.compress import certify_for

        exact = options.recipe.exact
        outcome = certify_for(prep.loaded, prep.source, exact, options.input_shapes, certificate,
                              unit_time_limit=exact.unit_time_limit, method=exact.milp_method)
        return outcome.certificate.unit_evidence(), None, outcome
    if stats is None:
        if relu_nodes(prep.loaded.graph):  # nothing rests on statistics in a model without Relu
            require_samples(prep.n_calib, options.min_samples, "the statistics would")
        stats = calibrate(prep, options.batch_size, options.threads, progress)
    else:
        stats.check_model([n.name for n in relu_nodes(prep.loaded.graph)], prep.source_name)
        require_samples(stats.n_samples, options.min_samples, "the saved statistics")
    return UnitEvidence.from_stats(stats), stats, None


def _prepare(model, calib, options: OptimizeOptions) -> Prepared:
    prep = prepare(model, calib, options.recipe, options.labels, options.batch_size)
    if options.max_accuracy_drop is not None:
        require_budget_support(prep, options.max_accuracy_drop, options.gate_on)
    return prep


def _before_figures(prep: Prepared, options: OptimizeOptions, lat, messages: list[str]) -> SizeFigures:
    """The input's figures. Weights the input computes at run time (ConstantOfShape, Cast/Transpose of
    constants) count once folded, so that the passes' savings are compared like with like; its file size
    stays the input file's."""
    shapes = prep.figure_shapes(options.input_shapes)
    original = model_report(prep.original, shapes)
    if not prep.canon.folding.nodes_folded:
        return SizeFigures.of(original, *lat)
    # the canonical graph counted where it is (no export, no second inference) unless input shapes fix
    # dimensions the graph leaves dynamic, which only the exported model's inference applies
    folded = (model_report(to_model_proto(prep.loaded.graph, prep.loaded.ctx), shapes)
              if shapes else graph_figures(prep.loaded.graph))
    if folded.params > original.params:
        messages.append(f"constant folding stored {folded.params - original.params:,} parameters that the input "
                        f"computes at run time; 'before' counts {folded.params:,} (the file holds {original.params:,})")
    elif folded.params < original.params:
        fewer = original.params - folded.params
        messages.append(f"canonicalisation (BatchNorm folding, constant folding) left {fewer:,} fewer parameters; "
                        f"'before' counts {folded.params:,} (the file holds {original.params:,})")
    return SizeFigures(folded.params, folded.macs, original.size_bytes, folded.nonzeros,
                       tuple(sorted(folded.params_by_dtype.items())), *lat)


def _data_messages(prep: Prepared) -> list[str]:
    """What the report must say about the input: a quantized model, casts of input dtypes."""
    out = []
    if prep.canon.quantized:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(prep.canon.quantized.items()))
        out.append(f"the model is quantized already ({ops}): its integer weights are kept; float passes skip "
                   "the layers that compute with them, quantizers decline")
        logger.warning(out[-1])
    for name, (found, fed) in (prep.source.casts.items() if prep.source is not None else ()):
        out.append(f"calibration data for input '{name}' is {found}; it was cast to {fed}, the model's input type")
        logger.warning(out[-1])
    return out


def _build(prep: Prepared, evidence: UnitEvidence, options: OptimizeOptions, exact: ExactOutcome | None,
           messages: list[str], progress: StepProgress | None = None):
    """(recipe, model, records, search rows): the search's pick, or the recipe as given; skip paths by cost."""
    recipe, rows, chosen = _int8_within_budget(options), [], None
    if options.search and options.max_accuracy_drop is not None and not options.lossy_passes:
        chosen, rows = _search_linear_rate(prep, evidence, options)
        recipe = chosen.recipe if chosen is not None else recipe
        messages.append(f"accuracy-budgeted search chose linear rate {chosen.value}" if chosen is not None else
                        "accuracy-budgeted search found no linear rate within the budget; exact rates kept")
    metadata = exact.metadata if exact is not None else None
    model, records = ((chosen.model, list(chosen.records)) if chosen is not None
                      else compress(prep, evidence, recipe, metadata, options.check_each_pass,
                                    options.threads, progress))
    if options.latency and any(r.result.count("skip_params") for r in records):
        recipe, model, records, note = _cheaper_without_skips(prep, evidence, recipe, metadata, model, records, options)
        messages.append(note)
    return recipe, model, records, rows


def _layer_errors(prep: Prepared, model: onnx.ModelProto, records, options: OptimizeOptions) -> dict | None:
    """pass -> layer -> relative error of the layer's output on the held-out split, for the layers lossy
    passes changed by design (``PassResult.changed_outputs``); None when none did or nothing is held out."""
    wanted = {r.result.name: dict(r.result.changed_outputs) for r in records if r.result.changed_outputs}
    held = prep.heldout_split()
    if not wanted or held is None:
        return None
    produced = {o for n in model.graph.node for o in n.output}  # by the candidate, and in the canonical graph
    present = {t.name for t in prep.loaded.graph.tensors().values()} & produced
    names = [t for per in wanted.values() for t in per.values() if t in present]
    reference = to_model_proto(prep.loaded.graph, prep.loaded.ctx, keep_mapped=True)
    errors = tensor_errors(reference, model, names, prep.loaded.graph, held.source, held.start, held.stop,
                           held.batch_size, options.threads)
    out = {name: {site: errors[t] for site, t in per.items() if t in errors} for name, per in wanted.items()}
    return {name: per for name, per in out.items() if per} or None


def _int8_within_budget(options: OptimizeOptions) -> Recipe:
    """With --max-accuracy-drop and labels, quantize-int8 keeps float the layers most sensitive to it until
    the budget fits (its ``exclude_sensitive='auto'``, scored on the calibration split), unless the recipe
    already says how to exclude; the recipe records the choice so it replays exactly."""
    recipe = options.recipe
    spec = recipe.spec("quantize-int8")
    if (spec is None or options.max_accuracy_drop is None or options.labels is None
            or spec.options.exclude_sensitive or spec.options.max_drop is not None):
        return recipe
    specs = tuple(PassSpec(s.name, replace(s.options, exclude_sensitive="auto", max_drop=options.max_accuracy_drop))
                  if s.name == "quantize-int8" else s for s in recipe.passes)
    return replace(recipe, passes=specs)


def _verify(prep: Prepared, model: onnx.ModelProto, options: OptimizeOptions,
            exact: ExactOutcome | None) -> tuple[Verification | None, Verification | None, Verification | None]:
    """(on the calibration part or the box, on the held-out part, on the gate split)."""
    if exact is not None:
        from .exact.compress import stamp_and_check

        return stamp_and_check(prep.original, model, prep.loaded.graph, exact), None, None
    on_cal = prep.evaluator("calibration-check", options.threads).score(model)
    held_ev = prep.evaluator("heldout", options.threads)
    on_held = held_ev.score(model) if held_ev is not None else None
    if options.gate_on == "all" and options.max_accuracy_drop is not None and not prep.source.is_random:
        return on_cal, on_held, prep.evaluator("all", options.threads).score(model)
    return on_cal, on_held, on_held or on_cal


def _spot_check(prep: Prepared, model: onnx.ModelProto, options: OptimizeOptions,
                samples: int = SPOT_CHECK_SAMPLES) -> Verification | None:
    """The canonical model against the original on the first few calibration samples (canonicalisation's
    rewrites are exact; this catches a broken one cheaply). Raises when they differ beyond float rounding."""
    if prep.source is None:
        return None
    v = Evaluator(prep.original, prep.loaded.graph, prep.source, 0, min(samples, max(prep.n_calib, 1)),
                  batch_size=prep.batch_size, threads=options.threads).score(model)
    if not v.within(1e-4):
        raise NumericalMismatchError(f"canonicalisation changed the outputs (relative {v.rel_max:.3g} on "
                                     f"{v.samples} samples); nothing written")
    return v


def optimize(model: str | Path | onnx.ModelProto, calib: str | Path | None,
             options: OptimizeOptions = OptimizeOptions(),
             stats: StatsSet | None = None, progress: Progress | None = None, certificate=None,
             step_progress: StepProgress | None = None) -> Result:
    """Compress ``model``; raises on a failed verification gate (nothing is returned to write). ``progress``:
    the calibration pass; ``step_progress``: the passes' long steps (a fresh callback per label)."""
    prep = _prepare(model, calib, options)
    evidence, stats, exact = _evidence(prep, options, stats, progress, certificate)
    messages = _data_messages(prep)
    if not relu_nodes(prep.loaded.graph):
        messages.append("the model has no Relu in its main graph: remove-dead and fold-linear have nothing to do "
                        "(merge-affine may still merge layers; the pass table says what changed)")
    if options.lossy_passes and options.output_change_limit is None and options.max_abs_error is None \
            and options.max_accuracy_drop is None and options.min_agreement is None \
            and options.max_mean_error is None:
        messages.append(f"lossy pass(es) {', '.join(options.lossy_passes)}: the output change is reported, not gated "
                        "(gate it with --max-accuracy-drop, --max-abs-error, --max-mean-error or "
                        "--max-output-change)")
    recipe, optimized, records, search_rows = _build(prep, evidence, options, exact, messages, step_progress)
    unchanged = exact is None and not any(r.result.changed for r in records)
    # the canonical graph runs differently from the input where canonicalisation rewrote computation (BatchNorm
    # folded, activation chains fused, ...): then its latency is still worth measuring
    timed = options.latency and (not unchanged or prep.canon.rewrote)
    if unchanged:  # the output is the canonical graph: exact rewrites only, so spot-check instead of verifying
        on_cal, on_held, on_gate = _spot_check(prep, optimized, options), None, None
        messages.append("no pass changed the graph: the output is the canonical model (exact rewrites only); "
                        "verification reduced to a spot check" + ("" if timed else " and latency skipped"))
    else:
        on_cal, on_held, on_gate = _verify(prep, optimized, options, exact)
    check_gates(on_gate, options.max_abs_error, options.max_accuracy_drop,
                options.output_change_limit if exact is None else None, options.min_agreement,
                options.max_mean_error)
    lat = (latencies(prep, optimized, options.batch_size, options.threads, options.input_shapes)
           if timed else ((None, None), (None, None, None, None)))
    report = OptimizeReport(
        model=prep.source_name, evidence=evidence.description, random_calibration=bool(stats and stats.random),
        calibration_samples=prep.n_calib if exact is None else 0,
        heldout_samples=on_held.samples if on_held else 0, canonicalize=prep.canon, passes=tuple(records),
        before=_before_figures(prep, options, lat[0], messages),
        after=SizeFigures.of(model_report(optimized, prep.figure_shapes(options.input_shapes)), *lat[1]),
        on_calibration=on_cal, on_heldout=on_held, recipe=recipe,
        exact_on_evidence=not any(r.result.approximate for r in records), messages=tuple(messages),
        not_analysed=evidence.not_analysed, search=tuple(search_rows),
        certificate=exact.as_dict() if exact is not None else None,
        on_all=on_gate if on_gate is not on_held and on_gate is not on_cal else None,
        storage=(storage_sizes(optimized).as_dict() if any(r.result.name == "prune-magnitude" for r in records)
                 else None))
    errors = _layer_errors(prep, optimized, records, options) if exact is None and not unchanged else None
    if errors:
        report = replace(report, layer_errors=errors, messages=report.messages + tuple(
            f"{name}: output error of each changed layer on {on_held.samples if on_held else 0} held-out samples "
            f"(relative, upstream changes included): " + ", ".join(f"{k} {v:.3g}" for k, v in per.items())
            for name, per in errors.items()))
    worse = check_not_worse(report.before, report.after, options.allow_larger)
    if worse:
        report = replace(report, messages=report.messages + (worse,))
    return Result(optimized, report, exact)


def with_linear_rate(recipe: Recipe, rate: float) -> Recipe:
    """``recipe`` with fold-linear's linear rate set to ``rate`` (fold-linear added when absent)."""
    if recipe.spec("fold-linear") is None:
        return replace(recipe, passes=recipe.passes + (PassSpec.of("fold-linear", {"linear_rate": rate}),))
    return _with_fold_options(recipe, linear_rate=rate)


def _with_fold_options(recipe: Recipe, **changes) -> Recipe:
    specs = tuple(PassSpec(s.name, replace(s.options, **changes)) if s.name == "fold-linear" else s
                  for s in recipe.passes)
    return replace(recipe, passes=specs)


def _cheaper_without_skips(prep: Prepared, evidence: UnitEvidence, recipe: Recipe, metadata, model, records,
                           options: OptimizeOptions):
    """Skip paths save parameters but add nodes: keep them only when onnxruntime runs them no slower than
    the same recipe without skip paths (batch 1, interleaved rounds). The recipe records the choice."""
    alt_recipe = _with_fold_options(recipe, skip_paths=False)
    alt_model, alt_records = compress(prep, evidence, alt_recipe, metadata, options.check_each_pass, options.threads)
    feeds = latency_feeds(prep, options.batch_size, options.input_shapes)[0]
    verdict = compare_two(alt_model, model, feeds, options.threads).ratios[1]
    if verdict.change == "slower":
        return alt_recipe, alt_model, alt_records, (f"skip paths dropped: {verdict.verdict} at batch 1 than the same "
                                                    "folds without them (fold-linear skip_paths=false in the recipe)")
    return recipe, model, records, f"skip paths kept: {verdict.verdict} at batch 1 against the form without them"


def _threshold_candidates(prep: Prepared, evidence: UnitEvidence, options: OptimizeOptions, thresholds,
                          latency: bool) -> list[Candidate]:
    """One candidate per linear rate, scored on the gate split (the original ran once for all of them)."""
    split = "all" if options.gate_on == "all" and not prep.source.is_random else "heldout"
    judge = prep.evaluator(split, options.threads) or prep.evaluator("calibration", options.threads)
    shapes = prep.figure_shapes(options.input_shapes)

    def build(rate: float):
        recipe = with_linear_rate(options.recipe, rate)
        model, records = compress(prep, evidence, recipe)
        return recipe, model, records

    def measure(model):
        rep = model_report(model, shapes)
        return rep.params, rep.macs

    def score(model) -> CandidateScore:
        v = judge.score(model)
        lat = (latencies(prep, model, options.batch_size, options.threads, options.input_shapes)[1][0] if latency
               else None)
        p = v.paired
        return CandidateScore(v.accuracy_after, p.drop_points if p else None, p.lower_points if p else None,
                              p.upper_points if p else None, lat.median_ms if lat else None, v.max_abs)

    return scan(thresholds, build, measure, score)


def _search_linear_rate(prep: Prepared, evidence: UnitEvidence,
                        options: OptimizeOptions) -> tuple[Candidate | None, list[dict]]:
    """The fewest-parameter linear rate whose paired drop bound keeps the budget, and every row scanned."""
    candidates = _threshold_candidates(prep, evidence, options, sorted(SWEEP_THRESHOLDS, reverse=True), latency=False)
    best = smallest_within(candidates, options.max_accuracy_drop)
    rows = [dict(c.row(), linear_rate=c.value, chosen=c is best,
                 within_budget=c.score.drop_high is not None and c.score.drop_high <= options.max_accuracy_drop)
            for c in candidates]
    return best, rows


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
    prep = prepare(model, calib, options.recipe, options.labels, options.batch_size)
    evidence = UnitEvidence.from_stats(calibrate(prep, options.batch_size, options.threads, progress))
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
    prep = prepare(model, calib, options.recipe, options.labels)
    evidence, _, exact = _evidence(prep, options, stats, progress, None)
    plans = plan_pipeline(prep.loaded.graph, options.recipe.passes, PassContext(evidence, calibration_data(prep)))
    return plans, exact.certificate if exact is not None else None
