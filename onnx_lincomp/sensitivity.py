"""Per-layer sensitivity of a pruning pass, and per-layer pruning levels allocated from it.

**Scan.** For every prunable layer (a channel group of ``prune-channels``, keyed by its first producer; a
linear layer of ``prune-magnitude``) and every level ``s`` the pass runs with ``layers={layer: s}`` and
``sparsity=0`` on a copy of the canonical graph, and the candidate is scored on the held-out split by the
prepared :class:`~onnx_lincomp.evaluate.evaluator.Evaluator` (the original ran once): accuracy (labels),
top-1 agreement with the original, output error; parameters and MACs come from the one model counter, and
optionally the batch-1 median latency. Level 0 is the unpruned canonical model (scored once).

``prune-channels`` plans with the calibration moments of every group's consumers, whatever the levels, so
the scan plans once per level with *every* group at that level and applies the plan one group's match at
a time (a sub-plan is a valid plan: apply re-reads its site). Each candidate is then exactly what the pass
gives with ``layers={layer: s}`` (tests compare the bytes), at one plan per level instead of one per
candidate. Other passes run through the pipeline once per candidate.

**Allocation.** With ``m_l(s)`` the metric (MACs, parameters or batch-1 latency) saved by layer ``l`` at
level ``s`` alone and ``d_l(s)`` its damage (accuracy drop plus disagreement with the original's top-1;
without labels the disagreement; without a class-score output the mean absolute output change), made
non-decreasing in ``s``, the greedy allocation repeatedly raises the layer whose move to a higher level
adds least damage per unit saved, ``(d_l(s') - d_l(s)) / (m_l(s') - m_l(s))`` (ties: least output error
per unit saved), until ``base - sum_l m_l(s_l)`` meets the target. Savings do not add exactly (pruning a
group also narrows its consumers' inputs), so the combination is built and measured, and the estimate's
goal lowered by the shortfall, until the measured figure meets the target. The model is then built with
the pass (``layers`` = the chosen levels) and verified on the held-out split. With an accuracy budget,
a paired upper bound over budget caps the most damaging layer one level lower and allocates again (other
layers make up the savings), a bounded number of times; if none fits, :class:`VerificationGateError`.

The allocation's recipe (one pass, the chosen levels, the calibration settings) replays through
``optimize --recipe`` to the same model bytes.
"""
from __future__ import annotations

import concurrent.futures as futures
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import onnx

from .analysis.channel_groups import find_channel_groups
from .analysis.model_report import model_report
from .analysis.unit_sets import UnitEvidence
from .errors import LincompError, OptionError, UnsupportedModelError, VerificationGateError
from .evaluate.evaluator import Evaluator, Verification
from .evaluate.paired import PairedDrop, drop_interval
from .gates import compare_two, latency_feeds, require_budget_support
from .graph_edit import refresh_shapes
from .model_io import to_model_proto
from .optimize import compress
from .passes import PASSES, Pass, PassContext, Plan
from .passes.prune_channels import group_key
from .pipeline import run_pipeline
from .prepared import Prepared, calibration_data, prepare
from .recipe import CalibrationSettings, PassSpec, Recipe
from .runtime.latency import LatencyOptions, measure_latency

logger = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
Target = Literal["macs", "params", "latency"]
DEFAULT_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10))
# prune passes need calibration data, not unit statistics: the recipe replays with any evidence
_NO_EVIDENCE = UnitEvidence("statistics", "none (pruning reads the calibration data, not unit statistics)")


@dataclass(frozen=True)
class Method:
    """A pruning method the scan knows: its pass, what a layer is, and what its savings are counted in."""

    name: str
    pass_name: str
    unit: str
    counts_nonzeros: bool  # pruning zeroes weights in place: parameters are counted as non-zeros
    # options under which the pass prunes as many units without reading data (exact counts, cheaply)
    shape_options: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # the user's pass options, in every candidate

    @property
    def saves_macs(self) -> bool:
        return not self.counts_nonzeros


METHODS: dict[str, Method] = {
    "channels": Method("channels", "prune-channels", "channel group", False,
                       {"importance": "l1", "reconstruct": False}),
    "magnitude": Method("magnitude", "prune-magnitude", "linear layer", True, {"correct": False}),
}
_SUBPLAN_PASSES = frozenset({"prune-channels"})  # one independent match per layer, its site the layer key


def parse_levels(text: str) -> tuple[float, ...]:
    """``'0.1,0.2,...'`` as sorted distinct floats (validated by :class:`ScanOptions`)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise OptionError(f"--levels: expected comma-separated numbers in [0, 1), got '{text}'") from exc
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class ScanOptions:
    """What to scan: the method, the levels, whether to time candidates, and how many processes."""

    method: str = "channels"
    levels: tuple[float, ...] = DEFAULT_LEVELS
    latency: bool = False
    jobs: int = 1
    threads: int = 0
    batch_size: int = 16  # latency feeds
    channel_multiple: int | None = None  # channels: widths kept at multiples of this (None: the pass default)

    def __post_init__(self):
        if self.method not in METHODS:
            raise OptionError(f"--method: unknown method '{self.method}' (known: {', '.join(METHODS)})")
        if self.channel_multiple is not None and (self.method != "channels" or self.channel_multiple < 0):
            raise OptionError("--channel-multiple: a non-negative width multiple, for --method channels only")
        if not self.levels:
            raise OptionError("--levels: give at least one level in [0, 1)")
        bad = [v for v in self.levels if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0)]
        if bad:
            raise OptionError(f"--levels: every level must be in [0, 1), got {bad[0]!r}")
        if self.jobs < 1:
            raise OptionError(f"--jobs must be at least 1, got {self.jobs}")
        if self.threads < 0 or self.batch_size < 1:
            raise OptionError("--threads must be >= 0 and --batch-size >= 1")
        if PASSES.get(METHODS[self.method].pass_name) is None:
            raise OptionError(f"--method {self.method} needs pass '{METHODS[self.method].pass_name}', which this "
                              f"installation does not have (passes: {', '.join(PASSES)})")

    @property
    def spec(self) -> Method:
        method = METHODS[self.method]
        if self.channel_multiple is None:
            return method
        return replace(method, options={"channel_multiple": self.channel_multiple})


@dataclass(frozen=True)
class ScanInput:
    """What a process needs to prepare the same model on the same split: model, data, settings, labels."""

    model: str | bytes  # a path, or a serialised ModelProto
    calib: str
    calibration: CalibrationSettings = CalibrationSettings()
    labels: str | None = None

    def prepare(self) -> Prepared:
        model = onnx.load_from_string(self.model) if isinstance(self.model, bytes) else self.model
        return prepare(model, self.calib, Recipe(calibration=self.calibration), self.labels)

    @property
    def name(self) -> str:
        return "<in-memory model>" if isinstance(self.model, bytes) else str(self.model)


@dataclass(frozen=True)
class SensitivityRow:
    """One candidate: ``layer`` pruned at ``level`` alone, scored on the evaluation split."""

    layer: str
    level: float
    accuracy: float | None
    agreement: float | None  # top-1 agreement with the original (class-score outputs)
    max_abs_error: float
    mean_abs_error: float
    params: int  # non-zero parameters for methods that zero weights in place
    macs: int
    latency: float | None = None  # batch-1 median ms
    unchanged: str = ""  # why the pass left the model as it was at this level ("" when it changed it)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


COLUMNS = tuple(SensitivityRow.__dataclass_fields__)


@dataclass(frozen=True)
class SensitivityScan:
    model: str
    method: str
    pass_name: str
    levels: tuple[float, ...]
    layers: tuple[str, ...]
    base: SensitivityRow  # the unpruned canonical model
    rows: tuple[SensitivityRow, ...]
    accuracy_before: float | None  # the original's, on the split
    samples: int
    split: str
    jobs: int
    seconds: float
    notes: tuple[str, ...] = ()

    @property
    def unit(self) -> str:
        return METHODS[self.method].unit

    @property
    def figure(self) -> tuple[str, str]:
        """(row field, heading) of the figure to show: accuracy, else agreement, else the output error."""
        if self.base.accuracy is not None:
            return "accuracy", "held-out accuracy %"
        if self.base.agreement is not None:
            return "agreement", "top-1 agreement with the original %"
        return "max_abs_error", "max abs output error"

    def curve(self, layer: str) -> list[SensitivityRow]:
        """The layer's rows by level, starting with level 0 (the base)."""
        rows = sorted((r for r in self.rows if r.layer == layer and r.level > 0), key=lambda r: r.level)
        return [replace(self.base, layer=layer, level=0.0), *rows]

    def as_dict(self) -> dict:
        return {"model": self.model, "method": self.method, "pass": self.pass_name, "levels": list(self.levels),
                "layers": list(self.layers), "samples": self.samples, "split": self.split, "jobs": self.jobs,
                "seconds": self.seconds, "accuracy_before": self.accuracy_before, "base": self.base.as_dict(),
                "rows": [r.as_dict() for r in self.rows], "notes": list(self.notes)}


# ---- candidates -------------------------------------------------------------------------------------------
def _pass(method: Method, layers: Mapping[str, float], extra: Mapping[str, Any] | None = None) -> PassSpec:
    return PassSpec.of(method.pass_name, {"sparsity": 0.0, "layers": dict(layers), **method.options, **(extra or {})})


class _Candidates:
    """The single-layer candidates of one method on a prepared model (canonical graph never mutated)."""

    def __init__(self, prep: Prepared, method: Method):
        self.prep, self.method = prep, method
        self.ctx = PassContext(None, calibration_data(prep))
        self._plan: tuple[float, Pass, Plan] | None = None  # the latest level's plan (plans hold moments)
        self.layers = self._find_layers()

    def _find_layers(self) -> tuple[str, ...]:
        graph = self.prep.loaded.graph
        if self.method.pass_name == "prune-channels":
            found = find_channel_groups(graph)
            return tuple(group_key(g) for g in found.groups if g.consumers and g.producers)
        spec = PassSpec.of(self.method.pass_name, {"sparsity": 0.5, **(self.method.shape_options or {})})
        ctx = PassContext(None, None if self.method.shape_options is not None else self.ctx.data)
        return tuple(dict.fromkeys(m.site for m in spec.build().plan(graph, ctx).matches))

    def build(self, layer: str, level: float) -> onnx.ModelProto | None:
        """The model with ``layer`` pruned at ``level`` (None: the pass leaves the model unchanged)."""
        if level <= 0:
            return None
        if self.method.pass_name in _SUBPLAN_PASSES:
            return self._from_level_plan(layer, level)
        model, records = compress(self.prep, _NO_EVIDENCE, Recipe((_pass(self.method, {layer: level}),)))
        return model if any(r.result.changed for r in records) else None

    def why_unchanged(self, layer: str, level: float) -> str:
        """Why :meth:`build` left the model unchanged for ``layer`` at ``level``: the pass's skip reason for
        the layer where its plan names one."""
        if level > 0 and self.method.pass_name in _SUBPLAN_PASSES:
            plan = self._level_plan(level)[1]
            found = next((why for why, names in plan.examples.items() if layer in names), None)
            if found is not None:
                return found
        return f"{self.method.pass_name} removes nothing from this layer at level {level:g}"

    def _level_plan(self, level: float) -> tuple[Pass, Plan]:
        if self._plan is None or self._plan[0] != level:
            self._plan = None  # release the previous plan's moments first
            p = _pass(self.method, dict.fromkeys(self.layers, level)).build()
            self._plan = (level, p, p.plan(self.prep.loaded.graph, self.ctx))
        return self._plan[1], self._plan[2]

    def _from_level_plan(self, layer: str, level: float) -> onnx.ModelProto | None:
        """Apply the level plan's match for ``layer`` alone, then what the pipeline does after a pass."""
        p, plan = self._level_plan(level)
        mine = tuple(m for m in plan.matches if m.site == layer)
        if not mine:
            return None
        graph = self.prep.loaded.graph.copy()
        result = p.apply(graph, Plan(plan.pass_name, mine, approximate=plan.approximate))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if not result.changed:
            return None
        refresh_shapes(graph)
        return to_model_proto(graph, self.prep.loaded.ctx)


# ---- scoring ----------------------------------------------------------------------------------------------
def _agreement(v: Verification) -> float | None:
    return next((o.top1_agreement for o in v.outputs if o.top1_agreement is not None), None)


def _mean_abs(v: Verification) -> float:
    return max((o.mean_abs for o in v.outputs), default=0.0)


class _Scanner:
    """Scores candidates of one prepared model on its evaluation split."""

    def __init__(self, prep: Prepared, options: ScanOptions, input_shapes: Mapping[str, tuple[int, ...]]):
        self.prep, self.options, self.input_shapes = prep, options, dict(input_shapes)
        self.mac_shapes = prep.figure_shapes(self.input_shapes)  # dynamic sides counted at the data's size
        self.split = "heldout"
        evaluator = prep.evaluator("heldout", options.threads)
        if evaluator is None:
            self.split, evaluator = "calibration", prep.evaluator("calibration", options.threads)
        if evaluator is None:
            raise OptionError("give --calib DATA")
        self.evaluator: Evaluator = evaluator
        self.candidates = _Candidates(prep, options.spec)
        self._feeds: dict | None = None
        canonical = to_model_proto(prep.loaded.graph, prep.loaded.ctx)
        self.base_verification = self.evaluator.score(canonical)
        self.base = self.row("", 0.0, canonical, self.base_verification)

    @property
    def layers(self) -> tuple[str, ...]:
        return self.candidates.layers

    def latency_ms(self, model: onnx.ModelProto) -> float:
        if self._feeds is None:
            self._feeds = latency_feeds(self.prep, self.options.batch_size, self.input_shapes)[0]
        return measure_latency(model, self._feeds, LatencyOptions(threads=max(self.options.threads, 1))).median_ms

    def row(self, layer: str, level: float, model: onnx.ModelProto, v: Verification) -> SensitivityRow:
        rep = model_report(model, self.mac_shapes)
        params = rep.nonzeros if self.options.spec.counts_nonzeros and rep.nonzeros is not None else rep.params
        return SensitivityRow(layer, level, v.accuracy_after, _agreement(v), v.max_abs, _mean_abs(v), params,
                              rep.macs, self.latency_ms(model) if self.options.latency else None)

    def rows(self, level: float, layers: Sequence[str]) -> list[SensitivityRow]:
        out = []
        for layer in layers:
            model = self.candidates.build(layer, level)
            out.append(replace(self.base, layer=layer, level=level,
                               unchanged=self.candidates.why_unchanged(layer, level)) if model is None
                       else self.row(layer, level, model, self.evaluator.score(model)))
        return out


_WORKER: dict[str, _Scanner] = {}  # a pool process's scanner, built once by its initializer


def _init_worker(source: ScanInput, options: ScanOptions) -> None:
    _WORKER["scanner"] = _Scanner(source.prepare(), options, dict(source.calibration.input_shapes))


def _worker_rows(level: float, layers: tuple[str, ...]) -> list[SensitivityRow]:
    return _WORKER["scanner"].rows(level, layers)


def _tasks(layers: Sequence[str], levels: Sequence[float], jobs: int) -> list[tuple[float, tuple[str, ...]]]:
    """(level, layers) work items: one per level, split further when there are fewer levels than processes
    (each item plans its level once)."""
    per = max(1, math.ceil(2 * jobs / max(len(levels), 1))) if jobs > 1 else 1
    size = max(1, math.ceil(len(layers) / per))
    return [(lv, tuple(layers[i:i + size])) for lv in levels for i in range(0, len(layers), size)]


def _run_tasks(scanner: _Scanner, source: ScanInput, options: ScanOptions, tasks, progress: Progress | None
               ) -> list[SensitivityRow]:
    total, done, rows = sum(len(t[1]) for t in tasks), 0, []
    if options.jobs == 1:
        for level, layers in tasks:
            rows += scanner.rows(level, layers)
            done += len(layers)
            if progress is not None:
                progress(done, total)
        return rows
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(options.jobs, mp_context=context, initializer=_init_worker,
                                     initargs=(source, options)) as pool:
        pending = [pool.submit(_worker_rows, level, layers) for level, layers in tasks]
        try:
            for fut in futures.as_completed(pending):
                part = fut.result()
                rows += part
                done += len(part)
                if progress is not None:
                    progress(done, total)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return rows


def worker_options(options: ScanOptions) -> ScanOptions:
    """Settings of each pool process: onnxruntime threads split between the processes unless set."""
    if options.jobs > 1 and options.threads == 0:
        return replace(options, threads=max(1, (os.cpu_count() or 1) // options.jobs))
    return options


def scan(prep: Prepared, source: ScanInput, options: ScanOptions, progress: Progress | None = None,
         scanner: _Scanner | None = None) -> SensitivityScan:
    """Prune each layer alone at each level and score it (``source`` prepares the same model in pool processes)."""
    start = time.perf_counter()
    scanner = scanner or _Scanner(prep, options, dict(source.calibration.input_shapes))
    if not scanner.layers:
        raise UnsupportedModelError(f"{prep.source_name}: {options.spec.pass_name} finds no {options.spec.unit} "
                                    "it can prune")
    tasks = _tasks(scanner.layers, [lv for lv in options.levels if lv > 0], options.jobs)
    rows = _run_tasks(scanner, source, worker_options(options), tasks, progress)
    rows += [replace(scanner.base, layer=layer, level=0.0) for layer in scanner.layers if 0.0 in options.levels]
    order = {name: i for i, name in enumerate(scanner.layers)}
    rows.sort(key=lambda r: (order[r.layer], r.level))
    notes = ("latency measured in concurrent processes: figures are noisier than with --jobs 1",) \
        if options.latency and options.jobs > 1 else ()
    return SensitivityScan(prep.source_name, options.method, options.spec.pass_name, options.levels, scanner.layers,
                           scanner.base, tuple(rows), scanner.evaluator.accuracy, scanner.evaluator.samples,
                           scanner.split, options.jobs, time.perf_counter() - start, notes)


# ---- allocation -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocationOptions:
    """Keep ``keep`` of the target figure (MACs, parameters, batch-1 latency) within an optional accuracy budget."""

    target: Target
    keep: float
    max_accuracy_drop: float | None = None  # points, on the paired upper bound of the held-out drop
    max_backoffs: int = 6  # allocations retried with the most damaging layer capped lower
    max_rounds: int = 12  # builds to meet the target per allocation

    def __post_init__(self):
        if self.target not in ("macs", "params", "latency"):
            raise OptionError(f"allocation target must be macs, params or latency, got {self.target!r}")
        if not 0.0 < self.keep <= 1.0:
            raise OptionError(f"--target-{self.target}: a keep fraction in (0, 1], got {self.keep}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise OptionError(f"--max-accuracy-drop must be >= 0, got {self.max_accuracy_drop}")
        if self.max_backoffs < 0 or self.max_rounds < 1:
            raise OptionError("max_backoffs must be >= 0 and max_rounds >= 1")

    @property
    def flag(self) -> str:
        return f"--target-{self.target} {self.keep:g}"

    def check_method(self, method: Method) -> None:
        if self.target == "macs" and not method.saves_macs:
            raise OptionError(f"--target-macs: {method.name} pruning zeroes weights in place and leaves the dense "
                              "MACs unchanged; use --target-params or --method channels")


@dataclass(frozen=True)
class AllocationRound:
    """One allocation tried: the levels, the target figure it reached, and the verdict."""

    levels: Mapping[str, float]
    kept: float  # measured fraction of the target figure
    drop_upper: float | None  # paired upper bound of the accuracy drop (points)
    outcome: str

    def as_dict(self) -> dict:
        return {"levels": dict(self.levels), "kept": self.kept, "drop_upper_points": self.drop_upper,
                "outcome": self.outcome}


@dataclass(frozen=True)
class Allocation:
    options: AllocationOptions
    levels: Mapping[str, float]
    recipe: Recipe
    model: onnx.ModelProto = field(repr=False)
    kept: float
    before: Mapping[str, float | None]
    after: Mapping[str, float | None]
    verification: Verification
    drop: PairedDrop | None
    rounds: tuple[AllocationRound, ...]

    def as_dict(self) -> dict:
        return {"target": self.options.target, "keep": self.options.keep,
                "max_accuracy_drop": self.options.max_accuracy_drop, "kept": self.kept, "levels": dict(self.levels),
                "before": dict(self.before), "after": dict(self.after),
                "verification": self.verification.as_dict(), "gate_drop": self.drop.as_dict() if self.drop else None,
                "rounds": [r.as_dict() for r in self.rounds]}


def row_damage(row: SensitivityRow, base: SensitivityRow) -> float:
    """Accuracy lost plus top-1 disagreement (fractions); without a class-score output, the mean output change."""
    damage = 0.0
    if row.accuracy is not None and base.accuracy is not None:
        damage += max(base.accuracy - row.accuracy, 0.0)
    if row.agreement is not None:
        damage += 1.0 - row.agreement
    elif row.accuracy is None:
        damage += row.mean_abs_error
    return damage


def _figure(row: SensitivityRow, target: Target) -> float:
    value = {"macs": row.macs, "params": row.params, "latency": row.latency}[target]
    if value is None:
        raise OptionError("--target-latency needs the latency of every candidate (the scan measures it then)")
    if target == "macs" and value <= 0:
        raise OptionError("--target-macs: the model's MACs could not be counted (dynamic input sides without shapes: "
                          "give --input-shape NAME=D1,D2,...)")
    return float(value)


@dataclass(frozen=True)
class _Curve:
    """One layer's levels with the fraction of the target figure each saves, its damage and output error."""

    layer: str
    levels: tuple[float, ...]
    saved: tuple[float, ...]
    damage: tuple[float, ...]  # made non-decreasing in the level
    error: tuple[float, ...]


def curves(result: SensitivityScan, target: Target) -> list[_Curve]:
    base = _figure(result.base, target)
    out = []
    for layer in result.layers:
        rows = result.curve(layer)
        damage = [row_damage(r, result.base) for r in rows]
        for i in range(1, len(damage)):
            damage[i] = max(damage[i], damage[i - 1])
        saved = tuple(max(base - _figure(r, target), 0.0) / max(base, 1e-30) for r in rows)
        out.append(_Curve(layer, tuple(r.level for r in rows), saved, tuple(damage),
                          tuple(r.mean_abs_error for r in rows)))
    return out


class _Greedy:
    """Per-layer level indices, raised one move at a time by least damage per unit of the figure saved."""

    def __init__(self, layer_curves: list[_Curve]):
        self.curves = {c.layer: c for c in layer_curves}
        self.state = dict.fromkeys(self.curves, 0)
        self.cap = {c.layer: len(c.levels) - 1 for c in layer_curves}

    def estimate(self) -> float:
        """Kept fraction if the savings added up."""
        return 1.0 - sum(c.saved[self.state[k]] for k, c in self.curves.items())

    def levels(self) -> dict[str, float]:
        return {k: c.levels[self.state[k]] for k, c in self.curves.items() if self.state[k] > 0}

    def step(self) -> bool:
        best, key = None, None
        for name, c in self.curves.items():
            i = self.state[name]
            for j in range(i + 1, self.cap[name] + 1):
                gain = c.saved[j] - c.saved[i]
                if gain <= 1e-12:
                    continue
                k = ((c.damage[j] - c.damage[i]) / gain, (c.error[j] - c.error[i]) / gain, -gain)
                if key is None or k < key:
                    best, key = (name, j), k
        if best is None:
            return False
        self.state[best[0]] = best[1]
        return True

    def run_to(self, goal: float) -> bool:
        """Raise levels until the estimate is at most ``goal``; False when no move is left."""
        while self.estimate() > goal:
            if not self.step():
                return False
        return True

    def back_off(self) -> str | None:
        """Cap the most damaging pruned layer one level lower; its name (None when nothing is pruned)."""
        pruned = [k for k, i in self.state.items() if i > 0]
        if not pruned:
            return None
        worst = max(pruned, key=lambda k: (self.curves[k].damage[self.state[k]], self.curves[k].error[self.state[k]]))
        self.state[worst] -= 1
        self.cap[worst] = self.state[worst]
        return worst


class _Unreachable(Exception):
    """The greedy fit ended above the target: every move made (``exhausted``) or out of builds."""

    def __init__(self, kept: float, exhausted: bool):
        super().__init__(kept, exhausted)
        self.kept, self.exhausted = kept, exhausted


def gate_drop(v: Verification) -> PairedDrop | None:
    """The paired accuracy drop (labels), else the drop of agreement with the original's top-1 (class scores)."""
    if v.paired is not None:
        return v.paired
    agree = _agreement(v)
    if agree is None or v.samples <= 0:
        return None
    worse = int(round((1.0 - agree) * v.samples))
    return PairedDrop(v.samples, v.samples - worse, worse, 0, drop_interval(worse, 0, v.samples))


class _Allocator:
    """Fits the greedy allocation to the measured target, builds it with the pass, verifies, backs off."""

    def __init__(self, prep: Prepared, source: ScanInput, result: SensitivityScan, scanner: _Scanner,
                 options: AllocationOptions):
        self.prep, self.source, self.result, self.scanner, self.options = prep, source, result, scanner, options
        self.method = scanner.options.spec
        self.greedy = _Greedy(curves(result, options.target))
        self.goal = options.keep  # what the estimate aims at, lowered by each measured shortfall
        self.base = _figure(result.base, options.target)

    def recipe(self, levels: Mapping[str, float]) -> Recipe:
        return Recipe((_pass(self.method, levels),), self.source.calibration)

    def build(self, levels: Mapping[str, float], shapes_only: bool) -> onnx.ModelProto:
        """The pass with ``layers=levels``; ``shapes_only``: options that give the same shapes without data."""
        if not (shapes_only and self.method.shape_options is not None):
            return compress(self.prep, _NO_EVIDENCE, self.recipe(levels))[0]
        graph = self.prep.loaded.graph.copy()
        run_pipeline(graph, [_pass(self.method, levels, self.method.shape_options)], PassContext(None, None))
        return to_model_proto(graph, self.prep.loaded.ctx)

    def kept(self, model: onnx.ModelProto) -> float:
        """Measured fraction of the target figure: counted exactly, or latency against the original."""
        if self.options.target == "latency":
            feeds = latency_feeds(self.prep, self.scanner.options.batch_size, self.scanner.input_shapes)[0]
            return compare_two(self.prep.original, model, feeds, self.scanner.options.threads).ratios[1].ratio
        rep = model_report(model, self.scanner.mac_shapes)
        if self.options.target == "macs":
            return rep.macs / max(self.base, 1e-30)
        count = rep.nonzeros if self.method.counts_nonzeros and rep.nonzeros is not None else rep.params
        return count / max(self.base, 1e-30)

    def fit(self) -> tuple[dict[str, float], onnx.ModelProto, float]:
        """Levels whose built model keeps at most ``keep`` of the figure (raises _Unreachable)."""
        kept = 1.0
        for _ in range(self.options.max_rounds):
            exhausted = not self.greedy.run_to(self.goal)
            levels = self.greedy.levels()
            model = self.build(levels, shapes_only=True)
            kept = self.kept(model)
            if kept <= self.options.keep:
                return levels, model, kept
            if exhausted:
                raise _Unreachable(kept, True)
            self.goal = min(self.goal, self.greedy.estimate()) - (kept - self.options.keep)
        raise _Unreachable(kept, False)

    def run(self) -> Allocation:
        rounds: list[AllocationRound] = []
        budget = self.options.max_accuracy_drop
        for attempt in range(self.options.max_backoffs + 1):
            try:
                levels, shaped, kept = self.fit()
            except _Unreachable as exc:
                raise self._unreachable(exc, attempt) from None
            model = self.build(levels, shapes_only=False)
            if self.options.target != "latency" and model is not shaped:
                kept = self.kept(model)
            v = self.scanner.evaluator.score(model)
            drop = gate_drop(v)
            over = budget is not None and drop is not None and drop.upper_points > budget
            rounds.append(AllocationRound(levels, kept, drop.upper_points if drop else None,
                                          "accuracy budget missed" if over else "accepted"))
            logger.info("allocation %d: kept %.3f, drop bound %s", attempt, kept, rounds[-1].drop_upper)
            if not over:
                return self._result(levels, model, kept, v, drop, rounds)
            if self.greedy.back_off() is None:
                break
        raise VerificationGateError(f"no allocation meets {self.options.flag} within --max-accuracy-drop {budget:g}: "
                                    f"the last ({_describe(rounds[-1].levels)}) has an accuracy drop "
                                    f"{drop.describe() if drop else '?'} after {len(rounds)} tries; nothing written")

    def _unreachable(self, exc: _Unreachable, attempt: int) -> Exception:
        flag, what = self.options.flag, self.options.target
        if not exc.exhausted:
            return LincompError(f"{flag}: the allocation still kept {exc.kept:.3f} of the {what} after "
                                f"{self.options.max_rounds} builds; nothing written")
        reach = (f"the most pruned allocation with levels up to {max(self.result.levels):g} keeps {exc.kept:.3f} of "
                 f"the {what}")
        if attempt == 0:
            return OptionError(f"{flag} is out of reach: {reach} (add higher --levels or raise the target)")
        return VerificationGateError(f"no allocation meets {flag} within --max-accuracy-drop "
                                     f"{self.options.max_accuracy_drop:g}: with the {attempt} most damaging "
                                     f"layer level(s) capped lower, {reach}; nothing written")

    def _result(self, levels: dict[str, float], model: onnx.ModelProto, kept: float, v: Verification,
                drop: PairedDrop | None, rounds: list[AllocationRound]) -> Allocation:
        shapes = self.scanner.mac_shapes
        before = _sizes(model_report(to_model_proto(self.prep.loaded.graph, self.prep.loaded.ctx), shapes))
        after = _sizes(model_report(model, shapes))
        if self.options.target == "latency":
            before["latency_ms"], after["latency_ratio"] = self.result.base.latency, kept
        return Allocation(self.options, levels, self.recipe(levels), model, kept, before, after, v, drop,
                          tuple(rounds))


def _sizes(rep) -> dict[str, float | None]:
    return {"params": rep.params, "nonzeros": rep.nonzeros, "macs": rep.macs}


def _describe(levels: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in levels.items()) or "nothing pruned"


def check_allocation(prep: Prepared, base: Verification, labels: str | None, options: AllocationOptions) -> None:
    """Refuse, before the scan, a budget the model's outputs or the split cannot judge."""
    if options.max_accuracy_drop is None:
        return
    if gate_drop(base) is None:
        need = ("the model has no class-score output to compare" if labels is not None else
                "the model's output is not a class score, so agreement with the original cannot stand in; give "
                "--labels KEY")
        raise OptionError(f"--max-accuracy-drop: {need}")
    require_budget_support(prep, options.max_accuracy_drop, None)


@dataclass(frozen=True)
class SensitivityResult:
    scan: SensitivityScan
    allocation: Allocation | None = None

    def as_dict(self) -> dict:
        out = self.scan.as_dict()
        if self.allocation is not None:
            out["allocation"] = self.allocation.as_dict()
            out["recipe"] = self.allocation.recipe.as_dict()
        return out


def sensitivity(source: ScanInput, options: ScanOptions, allocation: AllocationOptions | None = None,
                progress: Progress | None = None) -> SensitivityResult:
    """Scan every layer at every level and, with ``allocation``, build the allocated model."""
    if allocation is not None:
        allocation.check_method(options.spec)
        if allocation.target == "latency":
            options = replace(options, latency=True)
    prep = source.prepare()
    scanner = _Scanner(prep, options, dict(source.calibration.input_shapes))
    if allocation is not None:
        check_allocation(prep, scanner.base_verification, source.labels, allocation)
    result = scan(prep, source, options, progress, scanner)
    if allocation is None:
        return SensitivityResult(result)
    return SensitivityResult(result, _Allocator(prep, source, result, scanner, allocation).run())


__all__ = ["METHODS", "DEFAULT_LEVELS", "COLUMNS", "Method", "ScanOptions", "ScanInput", "SensitivityRow",
           "SensitivityScan", "AllocationOptions", "AllocationRound", "Allocation", "SensitivityResult",
           "parse_levels", "scan", "sensitivity", "curves", "row_damage", "gate_drop", "check_allocation"]
