"""Greedy search across passes for the best model within a budget.

1. Calibrate once (the statistics every candidate's exact passes use), save them for the workers.
2. Score the exact passes alone, then repeatedly every setting one step more aggressive on one knob
   (pruning level, low-rank keep ratio, quantization); each candidate is the *combined* recipe, so
   interactions are measured, never assumed. A knob whose next step leaves the budget is frozen.
3. Among the candidates inside the budget take the one with the best objective gain per unit of budget
   used (latency: batch-1 ratio against the original in interleaved rounds, measured here one candidate
   at a time, never in parallel workers; size: file bytes; MACs), and go on from it.
4. Stop when no step stays inside the budget, or at the time budget: the answer is the best verified
   candidate seen (ties inside the latency noise go to fewer MACs, then fewer bytes).

Every scored candidate is a row (the Pareto table); the chosen recipe reproduces the model exactly.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..calibration import StatsSet
from ..errors import VerificationGateError
from ..gates import compare_two, latency_feeds
from ..prepared import Prepared
from ..recipe import CalibrationSettings, Recipe
from .budget import Budget
from .executors import Backend, make_executor
from .judge import JudgeSpec, Outcome
from .space import Knob, Objective, Setting, default_knobs, describe, neighbours, setting_recipe

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SearchOptions:
    objective: Objective
    budget: Budget
    jobs: int = 1
    backend: Backend = "local"
    address: str | None = None
    time_budget_s: float | None = None
    threads: int = 0
    batch_size: int = 16


@dataclass
class Scored:
    setting: Setting
    label: str
    outcome: Outcome
    within: bool
    damage: float
    latency_ratio: float | None = None
    latency_change: str | None = None

    def objective(self, which: Objective) -> float:
        if which == "latency":
            return self.latency_ratio if self.latency_ratio is not None else float("inf")
        return float(self.outcome.size_bytes if which == "size" else self.outcome.macs)

    def row(self, chosen: bool) -> dict:
        o, v = self.outcome, self.outcome.verification
        return {"candidate": self.label, "params": o.params, "macs": o.macs, "size_bytes": o.size_bytes,
                "latency_ratio": self.latency_ratio, "latency_change": self.latency_change,
                "accuracy": v.accuracy_after if v else None,
                "drop_high": v.paired.upper_points if v and v.paired else None,
                "agreement": v.agreement if v else None, "max_abs": v.max_abs if v else None,
                "within_budget": self.within, "error": o.error, "seconds": round(o.seconds, 3),
                "chosen": chosen, "recipe": o.recipe}


@dataclass
class SearchResult:
    chosen: Scored | None
    scored: list[Scored] = field(default_factory=list)
    stopped: str = ""

    def rows(self) -> list[dict]:
        return [s.row(s is self.chosen) for s in self.scored]

    @property
    def recipe(self) -> Recipe | None:
        return Recipe.from_dict(self.chosen.outcome.recipe) if self.chosen is not None else None


class _Latency:
    """Batch-1 latency of candidates against the original (interleaved rounds, pinned threads), cached."""

    def __init__(self, prep: Prepared, options: SearchOptions, shapes: dict):
        self.prep, self.threads = prep, options.threads
        self.feeds = latency_feeds(prep, options.batch_size, shapes)[0]

    def measure(self, s: Scored) -> None:
        if s.latency_ratio is not None or s.outcome.model is None:
            return
        model = onnx.load_from_string(s.outcome.model)
        est = compare_two(self.prep.original, model, self.feeds, self.threads).ratios[1]
        s.latency_ratio, s.latency_change = est.ratio, est.change


def _better(a: Scored, b: Scored, objective: Objective) -> bool:
    """Whether ``a`` beats ``b``: latency differences inside the noise fall back to MACs, then bytes."""
    noise = a.latency_change == b.latency_change == "no change" or \
        abs(a.objective("latency") - b.objective("latency")) < 0.02
    if objective == "latency" and noise:
        return (a.outcome.macs, a.outcome.size_bytes) < (b.outcome.macs, b.outcome.size_bytes)
    return (a.objective(objective), a.outcome.macs, a.outcome.size_bytes) < \
        (b.objective(objective), b.outcome.macs, b.outcome.size_bytes)


def run_search(prep: Prepared, stats: StatsSet, model_path: str, calib: str, calibration: CalibrationSettings,
               labels: str | None, options: SearchOptions, knobs: tuple[Knob, ...] | None = None,
               progress: Progress | None = None) -> SearchResult:
    """Search from ``prep`` (the model at ``model_path`` prepared with ``calibration``) using the statistics
    ``stats`` of its calibration part; workers rebuild candidates from the same files."""
    knobs = knobs if knobs is not None else default_knobs(options.objective)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lincomp-search-") as tmp:
        stats_path = str(Path(tmp) / "stats.npz")
        stats.save(stats_path)
        spec = JudgeSpec(model_path, calib, labels, calibration, stats_path, threads=options.threads)
        executor = make_executor(spec, options.jobs, options.backend, options.address)
        try:
            return _greedy(prep, knobs, calibration, options, executor, start, progress)
        finally:
            executor.close()


def _greedy(prep, knobs, calibration, options: SearchOptions, executor, start: float, progress) -> SearchResult:
    latency = _Latency(prep, options, dict(calibration.input_shapes)) if options.objective == "latency" else None
    result = SearchResult(None)
    frozen: set[int] = set()
    state: Setting = (None,) * len(knobs)
    frontier = [state]
    current: Scored | None = None
    while frontier:
        recipes = [setting_recipe(knobs, s, calibration).as_dict() for s in frontier]
        scored = [Scored(s, describe(knobs, s), o, o.verification is not None and options.budget.within(o.verification),
                         options.budget.damage(o.verification) if o.verification is not None else float("inf"))
                  for s, o in zip(frontier, executor.map(recipes), strict=True)]
        result.scored += scored
        ok = [s for s in scored if s.within]
        for s in scored:
            if not s.within and current is not None:
                frozen.add(_changed_knob(current.setting, s.setting))
        if latency is not None:
            for s in ok:
                latency.measure(s)
        for s in ok:
            if result.chosen is None or _better(s, result.chosen, options.objective):
                result.chosen = s
        if progress is not None:
            best = result.chosen.label if result.chosen is not None else "none yet"
            progress(f"{len(result.scored)} candidates scored; best so far: {best}")
        if current is None:
            if not ok:
                result.stopped = "the exact passes alone leave the budget"
                break
            current = ok[0]
        else:
            step = _step(current, ok, options.objective)
            frozen |= {_changed_knob(current.setting, s.setting) for s in ok if s is not step and
                       _gain(current, s, options.objective) <= 0 and s.outcome.macs >= current.outcome.macs}
            if step is None:
                result.stopped = ("no further step stays within the budget" if not ok else
                                  "no step within the budget improves the objective")
                break
            current = step
        if options.time_budget_s is not None and time.monotonic() - start > options.time_budget_s:
            result.stopped = f"time budget of {options.time_budget_s:g} s reached"
            break
        frontier = [n for n in neighbours(knobs, current.setting) if _changed_knob(current.setting, n) not in frozen]
        if not frontier:
            result.stopped = "every knob is at its last level or frozen"
    return result


def _changed_knob(a: Setting, b: Setting) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


def _gain(current: Scored, s: Scored, objective: Objective) -> float:
    base, new = current.objective(objective), s.objective(objective)
    if objective == "latency" and s.latency_change == "no change":
        return 0.0
    return (base - new) / base if base and base != float("inf") else 0.0


def _step(current: Scored, ok: list[Scored], objective: Objective) -> Scored | None:
    """The next state: the best objective gain per unit of budget used among the improving candidates;
    when none improves (a latency change inside the noise), the one that cuts most MACs (deeper steps may
    pay off); None when no candidate does either."""
    improving = [s for s in ok if _gain(current, s, objective) > 0]
    if improving:
        return max(improving, key=lambda s: (_gain(current, s, objective) /
                                             (max(s.damage - current.damage, 0.0) + 1e-3), -s.outcome.macs))
    cheaper = [s for s in ok if s.outcome.macs < current.outcome.macs]
    return min(cheaper, key=lambda s: (s.outcome.macs, s.outcome.size_bytes)) if cheaper else None


def require_result(result: SearchResult, budget: Budget) -> Scored:
    """The chosen candidate, or the gate error naming the best candidate's figures (nothing is written)."""
    if result.chosen is not None:
        return result.chosen
    scored = [s for s in result.scored if s.outcome.verification is not None]
    best = min(scored, key=lambda s: s.damage, default=None)
    detail = ""
    if best is not None:
        v = best.outcome.verification
        detail = (f"; the closest candidate ({best.label}) reached accuracy drop bound "
                  f"{v.paired.upper_points:.2f} points" if v.paired is not None else
                  f"; the closest candidate ({best.label}) reached agreement {v.agreement} and max abs error "
                  f"{v.max_abs:.3g}")
    raise VerificationGateError(f"no candidate meets the budget ({budget.describe()}){detail}; nothing written")
