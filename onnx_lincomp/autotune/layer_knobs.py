"""Per-layer knobs: ``prune-channels`` levels set layer by layer from a sensitivity scan.

The scan runs on the model *after the exact passes* (the graph ``prune-channels`` sees in every candidate
recipe, so its channel-group keys are the names the recipe's ``layers`` option uses): every channel group
alone at each of a few levels, scored on the held-out split (:func:`onnx_lincomp.sensitivity.scan`). From the
curves (the fraction of MACs, or of parameters for ``--objective size``, each layer saves at each level, and
its damage: accuracy lost plus disagreement, made non-decreasing) the allocation of
:mod:`onnx_lincomp.sensitivity` raises, one move at a time, the layer that adds least damage per unit saved.
Every move is one choice of the knob: ``prune-channels`` with ``sparsity=0`` and ``layers`` = the levels so
far. The chain is fine (one layer move apart); the search steps ``stride`` moves forward and, when a combined
candidate misses the budget, backs off one move at a time, i.e. one layer one level lower.

The estimate of each choice (``1 - sum of the savings``) only orders the chain: every candidate is still
built with the pass and verified combined with the other knobs by the search's judge.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..analysis.unit_sets import UnitEvidence
from ..calibration import StatsSet
from ..errors import LincompError
from ..optimize import compress
from ..prepared import Prepared
from ..recipe import CalibrationSettings, Recipe
from ..sensitivity import ScanInput, ScanOptions, SensitivityScan, Target, curves, scan
from ..sensitivity import _Greedy as LayerGreedy
from .space import Choice, Knob, Objective, exact_specs

logger = logging.getLogger(__name__)
SCAN_LEVELS = (0.2, 0.35, 0.5, 0.65, 0.8)
COARSE_STEPS = 8  # forward steps along a chain (its stride is the chain length over this)


@dataclass(frozen=True)
class LayerScanReport:
    """What building a per-layer knob cost and gave (for the search report)."""

    knob: str
    layers: int
    candidates: int  # single-layer candidates the scan scored
    choices: int
    stride: int
    seconds: float
    note: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def allocation_chain(result: SensitivityScan, target: Target) -> list[dict[str, float]]:
    """Per-layer levels after each greedy move (least damage per unit of ``target`` saved first)."""
    greedy = LayerGreedy(curves(result, target))
    chain: list[dict[str, float]] = []
    while greedy.step():
        levels = greedy.levels()
        if not chain or chain[-1] != levels:
            chain.append(levels)
    return chain


def chain_choice(levels: Mapping[str, float]) -> Choice:
    note = "per-layer " + ",".join(f"{k}={v:g}" for k, v in levels.items())
    return Choice("prune-channels", {"sparsity": 0.0, "layers": dict(levels)}, note)


def scan_target(objective: Objective) -> Target:
    return "params" if objective == "size" else "macs"


def exact_model_bytes(prep: Prepared, stats: StatsSet, calibration: CalibrationSettings,
                      objective: Objective | None = None) -> bytes:
    """The model after the exact passes, as every candidate recipe builds it before its lossy passes."""
    recipe = Recipe(tuple(exact_specs(objective)), calibration)
    return compress(prep, UnitEvidence.from_stats(stats), recipe)[0].SerializeToString()


def build_layer_knob(knob: Knob, prep: Prepared, stats: StatsSet, calib: str, calibration: CalibrationSettings,
                     labels: str | None, objective: Objective, jobs: int = 1, threads: int = 0
                     ) -> tuple[Knob, LayerScanReport]:
    """``knob`` with its choices built from a channel-sensitivity scan (no choices when the scan finds nothing
    to prune or fails; the report says why)."""
    start = time.perf_counter()
    try:
        source = ScanInput(exact_model_bytes(prep, stats, calibration, objective), calib, calibration, labels)
        scanned = scan(source.prepare(), source, ScanOptions("channels", SCAN_LEVELS, jobs=jobs, threads=threads))
    except LincompError as exc:
        logger.info("per-layer knob %s left out: %s", knob.name, exc)
        return replace(knob, choices=()), LayerScanReport(knob.name, 0, 0, 0, 1, time.perf_counter() - start,
                                                          f"left out: {exc}")
    target = scan_target(objective)
    chain = allocation_chain(scanned, target)
    stride = max(1, math.ceil(len(chain) / COARSE_STEPS))
    choices = tuple(chain_choice(levels) for levels in chain)
    report = LayerScanReport(knob.name, len(scanned.layers), len(scanned.rows), len(choices), stride,
                             time.perf_counter() - start)
    return replace(knob, choices=choices, stride=stride), report


def resolve_knobs(knobs: tuple[Knob, ...], prep: Prepared, stats: StatsSet, calib: str,
                  calibration: CalibrationSettings, labels: str | None, objective: Objective, jobs: int = 1,
                  threads: int = 0) -> tuple[tuple[Knob, ...], tuple[LayerScanReport, ...]]:
    """Every knob with choices: per-layer knobs built from their scans (one scan per kind), the others as given."""
    out, reports = [], []
    for k in knobs:
        if k.scan is None or k.choices:
            out.append(k)
            continue
        built, report = build_layer_knob(k, prep, stats, calib, calibration, labels, objective, jobs, threads)
        out.append(built)
        reports.append(report)
    return tuple(out), tuple(reports)
