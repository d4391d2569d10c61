"""Greedy search across passes for the best model within a budget.

1. Calibrate once (the statistics every candidate's exact passes use), save them for the workers. Per-layer
   knobs get their choices from a sensitivity scan of the model after the exact passes (:mod:`.layer_knobs`).
2. Score the exact passes alone, then walk each knob alone from there (the single-pass searches, each with a
   share of ``max_candidates``), then all knobs together from the best candidate so far: repeatedly every
   setting one forward step more aggressive on one knob (pruning level, per-layer pruning allocation,
   low-rank keep ratio, quantization). Each candidate is the *combined* recipe, so interactions are
   measured, never assumed, and the answer is never worse than a single knob's.
3. A step that leaves the budget does not freeze its knob at once: accuracy against the level is noisy and
   not monotone on a small held-out split, so the next rounds also try
   - *look-ahead*: up to ``lookahead`` further forward steps beyond the missed one;
   - *back-off, layer by layer*: on a per-layer knob, the choices between the current one and the missed
     one, one layer move at a time (at most ``backoffs``);
   - *back-off, knob by knob*: the missed step with another active knob one choice milder (the knob whose
     last step cost most budget), once per knob between moves.
   A knob is frozen when these are spent, or when a step inside the budget neither improves the objective
   nor cuts MACs, unless it built the current model again (coarse widths map neighbouring levels to one
   model): then the knob moves on.
4. Among the candidates inside the budget take the one with the best objective gain per unit of budget
   used (latency: ratio against the original at ``latency_batch`` samples a run, 1 by default, in
   interleaved rounds, measured here one candidate
   at a time, never in parallel workers; size: file bytes; MACs), and go on from it.
5. Stop when no move is left, at ``max_candidates`` scored candidates, or at the time budget (checked
   before each round): the answer is
   the best verified candidate seen (ties inside the latency noise go to fewer MACs, then fewer bytes).

Every scored candidate is a row (the Pareto table) with the move that proposed it; the chosen recipe
reproduces the model exactly.
"""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx

from ..calibration import StatsSet
from ..errors import OptionError, VerificationGateError
from ..gates import compare_two, latency_feeds
from ..prepared import Prepared
from ..recipe import CalibrationSettings, Recipe
from .budget import Budget
from .executors import Backend, make_executor
from .judge import JudgeSpec, Outcome
from .layer_knobs import LayerScanReport, resolve_knobs
from .space import Knob, Objective, Setting, default_knobs, describe, family_busy, forward, setting_recipe, with_index

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SearchOptions:
    objective: Objective
    budget: Budget
    jobs: int = 1
    backend: Backend = "local"
    address: str | None = None
    time_budget_s: float | None = None  # the greedy walk's (per-layer scans run first, reported on their own)
    threads: int = 0
    batch_size: int = 16
    lookahead: int = 2  # further forward steps tried on a knob after its step misses the budget
    backoffs: int = 2  # finer choices tried back from a missed step on a per-layer knob
    max_candidates: int = 60  # scored candidates at most (the scan of a per-layer knob not counted)
    per_layer: bool = False  # add the per-layer pruning knob (a sensitivity scan first)
    latency_batch: int = 1  # samples per run at which the latency objective is measured (the serving batch)

    def __post_init__(self):
        if self.lookahead < 0 or self.backoffs < 0 or self.max_candidates < 1:
            raise OptionError("the search needs lookahead >= 0, backoffs >= 0 and max_candidates >= 1")
        if self.latency_batch < 1:
            raise OptionError(f"--latency-batch must be at least 1, got {self.latency_batch}")


MoveKind = Literal["start", "step", "look-ahead", "back-off", "trade"]


@dataclass(frozen=True)
class Move:
    """A candidate setting and why it was proposed: which knob it advances (-1: none) and how."""

    setting: Setting
    knob: int
    kind: MoveKind
    milder: int = -1  # a trade: the knob set one choice milder


@dataclass
class Scored:
    setting: Setting
    label: str
    outcome: Outcome
    within: bool
    damage: float
    latency_ratio: float | None = None
    latency_change: str | None = None
    move: MoveKind = "step"

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
                "move": self.move, "chosen": chosen, "recipe": o.recipe}


@dataclass
class SearchResult:
    chosen: Scored | None
    scored: list[Scored] = field(default_factory=list)
    stopped: str = ""
    scans: tuple[LayerScanReport, ...] = ()

    def rows(self) -> list[dict]:
        return [s.row(s is self.chosen) for s in self.scored]

    def counts(self) -> dict[str, int]:
        """Scored candidates by the move that proposed them, with the total and the scans' candidates."""
        by_move = Counter(s.move for s in self.scored)
        return {"scored": len(self.scored), **{k: by_move[k] for k in ("start", "step", "look-ahead", "back-off",
                                                                       "trade")},
                "scan": sum(r.candidates for r in self.scans)}

    def describe_counts(self) -> str:
        c = self.counts()
        extra = ", ".join(f"{c[k]} {k}" for k in ("look-ahead", "back-off", "trade") if c[k])
        scan = f" (+{c['scan']} single-layer scan candidates)" if c["scan"] else ""
        return f"{c['scored']} candidates scored" + (f" ({extra})" if extra else "") + scan

    @property
    def recipe(self) -> Recipe | None:
        return Recipe.from_dict(self.chosen.outcome.recipe) if self.chosen is not None else None


class _Latency:
    """Latency of candidates against the original at ``latency_batch`` samples a run (a model that takes one
    batch shape: that one), in interleaved rounds with pinned threads; cached on the candidate."""

    def __init__(self, prep: Prepared, options: SearchOptions, shapes: dict):
        self.prep, self.threads = prep, options.threads
        _, self.feeds, fixed = latency_feeds(prep, options.latency_batch, shapes)  # latency_batch samples
        self.batch = 1 if fixed else options.latency_batch

    def measure(self, s: Scored) -> None:
        if s.latency_ratio is not None or s.outcome.model is None:
            return
        model = onnx.load_from_string(s.outcome.model)
        est = compare_two(self.prep.original, model, self.feeds, self.threads, self.batch).ratios[1]
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
    knobs = knobs if knobs is not None else default_knobs(options.objective, per_layer=options.per_layer,
                                                           latency_batch=options.latency_batch)
    knobs, scans = resolve_knobs(knobs, prep, stats, calib, calibration, labels, options.objective,
                                 options.jobs if options.backend == "local" else 1, options.threads)
    start = time.monotonic()  # the time budget is the walk's: the scans are bounded (layers x levels) and reported
    with tempfile.TemporaryDirectory(prefix="lincomp-search-") as tmp:
        stats_path = str(Path(tmp) / "stats.npz")
        stats.save(stats_path)
        spec = JudgeSpec(model_path, calib, labels, calibration, stats_path, threads=options.threads)
        executor = make_executor(spec, options.jobs, options.backend, options.address)
        try:
            result = _greedy(prep, knobs, calibration, options, executor, start, progress)
            result.scans = scans
            return result
        finally:
            executor.close()


class _Walk:
    """Per-knob bookkeeping of the greedy walk: which choices missed the budget since the knob last moved,
    the look-aheads, back-offs and trades spent, and the budget each knob's last move used."""

    def __init__(self, knobs: tuple[Knob, ...], options: SearchOptions):
        self.knobs, self.options = knobs, options
        self.frozen: set[int] = set()
        self.missed: dict[int, list[int]] = {j: [] for j in range(len(knobs))}
        self.ahead = dict.fromkeys(range(len(knobs)), 0)
        self.back = dict.fromkeys(range(len(knobs)), 0)
        self.traded: set[int] = set()
        self.cost = dict.fromkeys(range(len(knobs)), 0.0)

    def moved(self, knob: int, damage_added: float) -> None:
        self.missed[knob], self.ahead[knob], self.back[knob] = [], 0, 0
        self.traded.discard(knob)
        self.cost[knob] = damage_added

    def frontier(self, setting: Setting) -> list[Move]:
        out: list[Move] = []
        for j, knob in enumerate(self.knobs):
            if j in self.frozen or not knob.choices or family_busy(self.knobs, setting, j):
                continue
            missed = self.missed[j]
            if not missed:
                nxt = forward(knob, setting[j])
                if nxt is not None:
                    out.append(Move(with_index(setting, j, nxt), j, "step"))
                continue
            ahead = forward(knob, max(missed))
            if ahead is not None and self.ahead[j] <= self.options.lookahead:
                out.append(Move(with_index(setting, j, ahead), j, "look-ahead"))
            here = -1 if setting[j] is None else setting[j]
            if min(missed) - 1 > here and self.back[j] < self.options.backoffs:
                out.append(Move(with_index(setting, j, min(missed) - 1), j, "back-off"))
        return out

    def trade(self, setting: Setting, missed: Move) -> Move | None:
        """The missed setting with the active knob whose last move used most budget one choice milder."""
        j = missed.knob
        if j in self.traded:
            return None
        self.traded.add(j)
        active = [k for k, i in enumerate(setting) if i is not None and k != j]
        if not active:
            return None
        k = max(active, key=lambda a: (self.cost[a], -a))
        milder = setting[k] - 1 if setting[k] > 0 else None
        return Move(with_index(missed.setting, k, milder), j, "trade", k)

    def record(self, move: Move, s: Scored) -> None:
        if s.within or move.kind in ("start", "trade"):
            return
        self.missed[move.knob].append(move.setting[move.knob])
        if move.kind == "back-off":
            self.back[move.knob] += 1
        else:
            self.ahead[move.knob] += 1


def _score(knobs, calibration, options: SearchOptions, executor, moves: list[Move],
           seen: dict[Setting, Scored]) -> list[Scored]:
    """The candidates of ``moves``, scoring only settings not scored before (candidates are deterministic);
    the new ones are added to ``seen``."""
    new = list(dict.fromkeys(m.setting for m in moves if m.setting not in seen))
    kinds = {}
    for m in moves:
        kinds.setdefault(m.setting, m.kind)
    recipes = [setting_recipe(knobs, st, calibration, options.objective).as_dict() for st in new]
    for st, o in zip(new, executor.map(recipes), strict=True):
        v = o.verification
        seen[st] = Scored(st, describe(knobs, st), o, v is not None and options.budget.within(v),
                          options.budget.damage(v) if v is not None else float("inf"), move=kinds[st])
    return [seen[m.setting] for m in moves]


@dataclass
class _Run:
    """What every phase of the walk shares: the scorer, the latency timer, the result, the candidates seen."""

    knobs: tuple[Knob, ...]
    calibration: CalibrationSettings
    options: SearchOptions
    executor: object
    latency: _Latency | None
    result: SearchResult
    seen: dict[Setting, Scored]
    start: float
    progress: Progress | None

    def score(self, moves: list[Move]) -> list[Scored]:
        """Score ``moves`` (new settings only), time the ones inside the budget, keep the best seen."""
        known = len(self.seen)
        scored = _score(self.knobs, self.calibration, self.options, self.executor, moves, self.seen)
        self.result.scored += list(self.seen.values())[known:]
        ok = [s for s in scored if s.within]
        if self.latency is not None:
            for s in ok:
                self.latency.measure(s)
        for s in ok:
            if self.result.chosen is None or _better(s, self.result.chosen, self.options.objective):
                self.result.chosen = s
        if self.progress is not None:
            best = self.result.chosen.label if self.result.chosen is not None else "none yet"
            self.progress(f"{len(self.result.scored)} candidates scored; best so far: {best}")
        return scored

    def out_of_time(self) -> bool:
        return self.options.time_budget_s is not None and time.monotonic() - self.start > self.options.time_budget_s


def _greedy(prep, knobs, calibration, options: SearchOptions, executor, start: float, progress) -> SearchResult:
    """The exact passes alone, then each knob walked alone from there (the single-pass searches: the
    combination is then never worse than any of them), then every knob walked together from the best
    candidate so far."""
    latency = _Latency(prep, options, dict(calibration.input_shapes)) if options.objective == "latency" else None
    run = _Run(knobs, calibration, options, executor, latency, SearchResult(None), {}, start, progress)
    origin = run.score([Move((None,) * len(knobs), -1, "start")])[0]
    if not origin.within:
        run.result.stopped = "the exact passes alone leave the budget"
        return run.result
    singles = [j for j, k in enumerate(knobs) if k.choices] if len(knobs) > 1 else []
    share = max(1, options.max_candidates // (len(singles) + 1))  # each single walk leaves room for the rest
    for j in singles:
        stopped = _walk(run, origin, _Walk(knobs, options), only=j, limit=min(len(run.seen) + share,
                                                                               options.max_candidates))
        if stopped.startswith("time budget"):
            run.result.stopped = stopped
            return run.result
    run.result.stopped = _walk(run, run.result.chosen, _Walk(knobs, options), only=None,
                               limit=options.max_candidates)
    return run.result


def _walk(run: _Run, current: Scored, walk: _Walk, only: int | None, limit: int) -> str:
    """Walk from ``current`` until no move is left (``only``: moves of that knob alone, the others unset), the
    time budget is spent or ``limit`` candidates are scored in all; the reason it stopped."""
    moves: list[Move] = []
    scored: list[Scored] = []
    idle = 0  # rounds that scored nothing new and did not move (a guard: look-aheads and back-offs are bounded)
    while True:
        if run.out_of_time():
            return f"time budget of {run.options.time_budget_s:g} s reached"
        moves = walk.frontier(current.setting) + _trades(walk, current.setting, moves, scored)
        if only is not None:
            moves = [m for m in moves if all(i is None for k, i in enumerate(m.setting) if k != only)]
        if not moves:
            return "every knob is at its last level or frozen"
        moves = _within_limit(moves, run.seen, limit - len(run.seen))
        if not moves:
            return f"candidate limit of {limit} reached"
        known, before = len(run.seen), current
        scored = run.score(moves)
        current = _advance(walk, current, moves, scored, run.options.objective)
        idle = idle + 1 if len(run.seen) == known and current is before else 0
        if idle > 1:
            return "no new candidate in two rounds"


def _within_limit(moves: list[Move], seen: dict[Setting, Scored], room: int) -> list[Move]:
    """The moves in order, keeping at most ``room`` settings not scored before."""
    out, new = [], set()
    for m in moves:
        if m.setting not in seen and m.setting not in new:
            if len(new) >= room:
                continue
            new.add(m.setting)
        out.append(m)
    return out


def _trades(walk: _Walk, setting: Setting, moves: list[Move], scored: list[Scored]) -> list[Move]:
    """Knob-by-knob back-offs for the forward steps of the last round that missed the budget."""
    out = []
    for m, s in zip(moves, scored, strict=True):
        if s.within or m.kind not in ("step", "look-ahead"):
            continue
        here = -1 if setting[m.knob] is None else setting[m.knob]
        if m.setting[m.knob] <= here or family_busy(walk.knobs, setting, m.knob):
            continue
        t = walk.trade(setting, Move(with_index(setting, m.knob, m.setting[m.knob]), m.knob, m.kind))
        if t is not None:
            out.append(t)
    return out


def _advance(walk: _Walk, current: Scored, moves: list[Move], scored: list[Scored], objective: Objective) -> Scored:
    """Record the round, take the best step (or stay), freeze knobs whose kept step does not pay."""
    for m, s in zip(moves, scored, strict=True):
        walk.record(m, s)
    step = _step(current, [s for s in scored if s.within], objective)
    if step is None:
        step = _same_model_step(walk, current, moves, scored)
    for m, s in zip(moves, scored, strict=True):
        if s.within and s is not step and m.kind != "trade" and _gain(current, s, objective) <= 0 and \
                s.outcome.macs >= current.outcome.macs:
            walk.frozen.add(m.knob)
    if step is None:
        return current
    m = next(mv for mv, sc in zip(moves, scored, strict=True) if sc is step)
    walk.moved(m.knob, max(step.damage - current.damage, 0.0))
    if m.kind == "trade":
        walk.moved(m.milder, 0.0)
    return step


def _same_model_step(walk: _Walk, current: Scored, moves: list[Move], scored: list[Scored]) -> Scored | None:
    """A forward step that built the very model of ``current`` (same MACs and bytes) on a knob with choices
    left: coarse widths (channel blocks) map neighbouring levels to one model, and freezing the knob there
    would never reach the next distinct one. Taking it moves the knob on; the index only grows, so it ends."""
    for m, s in zip(moves, scored, strict=True):
        if s.within and m.kind in ("step", "look-ahead") and m.knob >= 0 and \
                (s.outcome.macs, s.outcome.size_bytes) == (current.outcome.macs, current.outcome.size_bytes) and \
                forward(walk.knobs[m.knob], m.setting[m.knob]) is not None:
            return s
    return None


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
