"""The checks a result must pass before it is written, and the latency figures they read.

* accuracy budget: gated on the upper end of the paired interval of the drop (never the point estimate),
  and refused up front when the gate split is too small to certify the budget at all;
* output error: the largest held-out difference;
* never worse by surprise: more parameters or MACs, or a measurably slower batch-1 run (interleaved
  rounds, outside the noise), is a gate failure unless the user allows it.
"""
from __future__ import annotations

import onnx

from .calibration import input_specs, open_calibration
from .errors import VerificationGateError
from .evaluate.evaluator import Verification
from .evaluate.paired import BudgetSupport, budget_supportable
from .optimize_report import SizeFigures
from .prepared import GateOn, Prepared
from .runtime.feeds import benchmark_feeds, fixed_batch
from .runtime.latency import CompareOptions, compare_models_latency


def require_budget_support(prep: Prepared, budget: float, gate_on: GateOn | None,
                           confidence: float = 0.95) -> BudgetSupport:
    """Refuse (before any work) a budget the gate split cannot certify even for an unchanged model.
    ``gate_on`` None: the command gates on the held-out split and has no ``--gate-on`` to suggest."""
    n = prep.gate_count(gate_on or "heldout")
    if n <= 0:
        raise VerificationGateError("--max-accuracy-drop needs held-out samples (--verify-split > 0"
                                    + (", or --gate-on all)" if gate_on else ")"))
    support = budget_supportable(n, budget, confidence)
    if not support:
        message = support.message if gate_on != "all" else support.message.replace("held-out samples", "samples")
        hint = {"heldout": " (try --gate-on all: the statistics stay on the calibration part)",
                None: " (hold out more samples: more data or a larger --verify-split; or a larger budget)"}
        raise VerificationGateError(f"{message}{hint.get(gate_on, '')}; nothing written")
    return support


def check_gates(gate: Verification | None, max_abs_error: float | None, max_accuracy_drop: float | None,
                max_output_change: float | None = None, min_agreement: float | None = None,
                max_mean_error: float | None = None) -> None:
    """Raise when the output error, the relative output change or the paired accuracy-drop bound on the gate
    split exceeds its limit."""
    if gate is None:
        return
    if gate.non_finite:
        raise VerificationGateError(f"the optimised model gives {gate.non_finite} NaN/Inf outputs where the original "
                                    "does not; nothing written")
    if max_output_change is not None and gate.rel_max > max_output_change:
        raise VerificationGateError(
            f"outputs changed by up to {gate.rel_max:.3g} of their scale on {gate.samples} verification samples "
            f"(limit {max_output_change:g}): the statistics do not hold beyond the calibration data; use more or "
            "real calibration data, exact rates, or loosen with --max-output-change / --max-abs-error / "
            "--max-mean-error / --max-accuracy-drop; nothing written")
    if max_abs_error is not None and gate.max_abs > max_abs_error:
        raise VerificationGateError(f"max abs error {gate.max_abs:.3g} exceeds --max-abs-error {max_abs_error:g}; "
                                    "no output written")
    if max_mean_error is not None and gate.mean_abs > max_mean_error:
        raise VerificationGateError(f"mean abs error {gate.mean_abs:.3g} exceeds --max-mean-error {max_mean_error:g}; "
                                    "no output written")
    if min_agreement is not None and (gate.agreement is None or gate.agreement < min_agreement):
        found = "no classifier-shaped output" if gate.agreement is None else f"{gate.agreement:.4f}"
        raise VerificationGateError(f"top-1 agreement {found} is below --min-agreement {min_agreement:g}; "
                                    "no output written")
    if max_accuracy_drop is not None and gate.paired is not None and gate.paired.upper_points > max_accuracy_drop:
        raise VerificationGateError(f"accuracy drop {gate.paired.describe()} exceeds --max-accuracy-drop "
                                    f"{max_accuracy_drop:g} at its upper bound; no output written")


def require_samples(n: int, minimum: int, what: str) -> None:
    """Statistics that rest on fewer samples than ``minimum`` cannot be trusted to generalise."""
    if n < minimum:
        raise VerificationGateError(f"{what} rest on {n} calibration sample{'s' * (n != 1)}, fewer than the minimum "
                                    f"of {minimum}: give more data (or a smaller --verify-split), or lower "
                                    "--min-samples explicitly; nothing written")


def check_not_worse(before: SizeFigures, after: SizeFigures, allow_larger: bool) -> str | None:
    """Never worse by surprise: a larger or more expensive output is a gate failure unless allowed."""
    worse = [f"{what} {x:,} -> {y:,}" for what, x, y in (("parameters", before.params, after.params),
                                                         ("MACs", before.macs, after.macs)) if y > x]
    if after.size_bytes > before.size_bytes * 1.01 + 4096:  # metadata (a certificate, the recipe) is allowed
        worse.append(f"file bytes {before.size_bytes:,} -> {after.size_bytes:,}")
    if after.latency_verdict == "slower":
        worse.append(f"batch-1 latency {after.latency_ratio:.2f}x the original (outside the noise)")
    if not worse:
        return None
    message = "the output is worse than the input: " + "; ".join(worse)
    if not allow_larger:
        raise VerificationGateError(message + " (pass --allow-larger to keep it); no output written")
    return message + " (allowed by --allow-larger)"


def latency_feeds(prep: Prepared, batch_size: int, input_shapes: dict) -> tuple[dict, dict, bool]:
    """(batch-1 feeds, batch feeds, whether the model takes only one batch shape)."""
    graph = prep.loaded.graph
    source = prep.source or open_calibration(f"random:{batch_size}", input_specs(graph), shape_overrides=input_shapes)
    feeds_b, _ = benchmark_feeds(graph, source, batch_size)
    fixed = bool(source.per_sample) or fixed_batch(graph, source.per_sample) is not None
    return (feeds_b if fixed else {k: v[:1] for k, v in feeds_b.items()}), feeds_b, fixed


def compare_two(first: onnx.ModelProto, second: onnx.ModelProto, feeds: dict, threads: int, batch: int = 1):
    """The second model's latency against the first, in interleaved rounds with pinned threads."""
    return compare_models_latency([first, second], feeds, CompareOptions(threads=threads or 1, batch_size=batch))


def latencies(prep: Prepared, model: onnx.ModelProto, batch_size: int, threads: int, input_shapes: dict):
    """((before b1, before batch), (after b1, after batch, change b1, change batch)) from interleaved rounds."""
    feeds_1, feeds_b, fixed = latency_feeds(prep, batch_size, input_shapes)
    c1 = compare_two(prep.original, model, feeds_1, threads)
    if fixed:
        return (c1.latencies[0], None), (c1.latencies[1], None, c1.ratios[1], None)
    cb = compare_two(prep.original, model, feeds_b, threads, len(next(iter(feeds_b.values()))))
    return (c1.latencies[0], cb.latencies[0]), (c1.latencies[1], cb.latencies[1], c1.ratios[1], cb.ratios[1])
