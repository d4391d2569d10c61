"""Scans and searches over one knob: build a candidate per value, score it, keep what was built.

Nothing here knows how a candidate is made: the caller passes a ``build`` callable (value -> recipe,
model, records) and a ``score`` callable (model -> :class:`CandidateScore`). A search returns the
candidate it built, so the chosen model is never compressed a second time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import onnx

SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 21))


@dataclass(frozen=True)
class CandidateScore:
    """What the evaluator says of a candidate on held-out data (points are accuracy percentage points)."""

    accuracy: float | None = None
    drop_points: float | None = None  # observed drop, original minus candidate
    drop_low: float | None = None  # paired interval of the drop
    drop_high: float | None = None
    latency_ms: float | None = None
    max_abs: float | None = None


@dataclass(frozen=True, eq=False)
class Candidate:
    value: float
    recipe: Any
    model: onnx.ModelProto
    records: tuple
    params: int
    macs: int
    score: CandidateScore

    def row(self) -> dict:
        s = self.score
        return {"value": self.value, "params": self.params, "macs": self.macs, "accuracy": s.accuracy,
                "drop_points": s.drop_points, "drop_low": s.drop_low, "drop_high": s.drop_high,
                "latency_ms": s.latency_ms, "max_abs": s.max_abs}


Build = Callable[[float], tuple[Any, onnx.ModelProto, list]]
Measure = Callable[[onnx.ModelProto], tuple[int, int]]  # model -> (params, MACs)
Score = Callable[[onnx.ModelProto], CandidateScore]


def scan(values: Iterable[float], build: Build, measure: Measure, score: Score,
         progress: Callable[[int, int], None] | None = None) -> list[Candidate]:
    """Build and score one candidate per value."""
    values = list(values)
    out = []
    for i, v in enumerate(values):
        recipe, model, records = build(v)
        params, macs = measure(model)
        out.append(Candidate(v, recipe, model, tuple(records), params, macs, score(model)))
        if progress is not None:
            progress(i + 1, len(values))
    return out


def within_budget(c: Candidate, budget_points: float) -> bool:
    """Gate on the upper end of the paired interval of the drop, not on the point estimate."""
    return c.score.drop_high is not None and c.score.drop_high <= budget_points


def smallest_within(candidates: list[Candidate], budget_points: float) -> Candidate | None:
    """The candidate with the fewest parameters whose drop bound keeps the budget (ties: the first scanned)."""
    ok = [c for c in candidates if within_budget(c, budget_points)]
    return min(ok, key=lambda c: (c.params, c.macs)) if ok else None
