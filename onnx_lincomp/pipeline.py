"""The pass pipeline: runs pass specs in order until a fixed point, owns cleanup/toposort and shape refresh,
measures every pass with the one model counter, can verify after each pass, and wraps every failure with
the pass name and the passes already run.

Repeatable passes run again (up to ``max_rounds``) while any of them changes the graph; passes marked
``runs_last`` (quantization) run once after that. The unit evidence follows the units that remain.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from .analysis.model_report import Figures, graph_figures
from .errors import LincompError, PassError
from .graph_edit import refresh_shapes
from .passes import Pass, PassContext, PassResult, Plan
from .recipe import PassSpec

logger = logging.getLogger(__name__)
Check = Callable[[gs.Graph, str], str | None]  # (graph after a pass, pass name) -> a one-line summary


@dataclass(frozen=True)
class PassRecord:
    """One application of a pass: its result, the figures before and after, time, and an optional check."""

    result: PassResult
    before: Figures
    after: Figures
    seconds: float
    round: int = 0
    check: str | None = None
    shapes: str | None = None  # why shapes could not be re-inferred after the pass (later sites may skip)

    @property
    def params_before(self) -> int:
        return self.before.params

    @property
    def params_after(self) -> int:
        return self.after.params

    def as_dict(self) -> dict:
        return dict(self.result.as_dict(), round=self.round, seconds=self.seconds, check=self.check, shapes=self.shapes,
                    before=self.before.as_dict(), after=self.after.as_dict(),
                    params_before=self.before.params, params_after=self.after.params)


def _fail(spec_name: str, exc: Exception, records: list[PassRecord]) -> PassError:
    done = ", ".join(r.result.name for r in records) or "none"
    detail = str(exc) if isinstance(exc, LincompError) else f"{type(exc).__name__}: {exc}"
    err = PassError(f"pass '{spec_name}' failed ({detail}); passes already run: {done}")
    err.exit_code = getattr(exc, "exit_code", PassError.exit_code)
    return err


def _run_one(graph: gs.Graph, p: Pass, ctx: PassContext, records: list[PassRecord]) -> tuple[PassResult, str | None]:
    """Plan and apply one pass, then clean up and re-infer shapes (a failed inference is reported, not hidden)."""
    try:
        result = p.apply(graph, p.plan(graph, ctx))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        refresh = refresh_shapes(graph) if result.changed else None
        problem = None if refresh is None or refresh.inferred else f"shapes not re-inferred: {refresh.reason}"
        return result, problem
    except Exception as exc:  # typed or not: name the pass and what ran before, never half-report
        raise _fail(p.name, exc, records) from exc


def run_pipeline(graph: gs.Graph, specs: Sequence[PassSpec], ctx: PassContext, *, max_rounds: int = 3,
                 check: Check | None = None) -> list[PassRecord]:
    """Run ``specs`` over ``graph`` (mutated); returns one record per pass application that changed
    something (and every pass of the first round)."""
    passes = [s.build() for s in specs]
    repeatable = [p for p in passes if not p.runs_last]
    records: list[PassRecord] = []
    shapes = ctx.data.input_shapes(graph) if ctx.data is not None else None  # MACs of a graph with dynamic sides
    figures = graph_figures(graph, input_shapes=shapes)
    for round_no in range(max_rounds):
        changed = False
        for p in repeatable:
            ctx, figures, did = _step(graph, p, ctx, records, figures, round_no, check, shapes)
            changed |= did
        if not changed or not any(p.repeatable for p in repeatable):
            break
        repeatable = [p for p in repeatable if p.repeatable]
    for p in passes:
        if p.runs_last:
            ctx, figures, _ = _step(graph, p, ctx, records, figures, 0, check, shapes)
    return records


def _step(graph: gs.Graph, p: Pass, ctx: PassContext, records: list[PassRecord], before: Figures, round_no: int,
          check: Check | None, input_shapes: dict | None = None) -> tuple[PassContext, Figures, bool]:
    start = time.perf_counter()
    result, shapes = _run_one(graph, p, ctx, records)
    after = graph_figures(graph, input_shapes=input_shapes) if result.changed else before
    seconds = time.perf_counter() - start
    summary = check(graph, p.name) if check is not None and result.changed else None
    if result.changed or round_no == 0:
        records.append(PassRecord(result, before, after, seconds, round_no, summary, shapes))
    if ctx.evidence is not None and result.changed and p.lossy:
        # refit layers change the pre-activations downstream: the statistics no longer describe the graph
        ctx = replace(ctx, evidence=None)
    elif ctx.evidence is not None and result.kept:
        ctx = replace(ctx, evidence=ctx.evidence.subset(result.kept))
    logger.info("pass %s: changed=%s in %.3fs", p.name, result.changed, seconds)
    return ctx, after, result.changed


def plan_pipeline(graph: gs.Graph, specs: Sequence[PassSpec], ctx: PassContext) -> list[Plan]:
    """Every pass's plan on ``graph`` as it is now (read-only: nothing is applied)."""
    plans = []
    for spec in specs:
        try:
            plans.append(spec.build().plan(graph, ctx))
        except Exception as exc:
            raise _fail(spec.name, exc, []) from exc
    return plans
