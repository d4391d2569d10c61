"""Scoring one candidate recipe: rebuild the model from the shared model file, verify it on the held-out
split, count its size. A :class:`Judge` prepares the model once (load, canonicalise, the original's held-out
outputs) and is then called once per recipe, in this process or in a worker (:mod:`.executors`)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..analysis.model_report import model_report
from ..analysis.unit_sets import UnitEvidence
from ..calibration import StatsSet
from ..errors import LincompError
from ..evaluate.evaluator import Verification
from ..model_io import model_size_bytes
from ..optimize import compress
from ..prepared import prepare
from ..recipe import CalibrationSettings, Recipe


@dataclass(frozen=True)
class JudgeSpec:
    """Everything a worker needs to rebuild candidates (picklable: paths and settings, no graphs)."""

    model: str
    calib: str
    labels: str | None
    calibration: CalibrationSettings
    stats_path: str
    threads: int = 1
    keep_models: bool = True  # send the candidate's bytes back (latency is measured by the caller)


@dataclass(frozen=True)
class Outcome:
    """A scored candidate: its recipe, figures, held-out verification, or the error that stopped it."""

    recipe: dict
    params: int = 0
    macs: int = 0
    size_bytes: int = 0
    verification: Verification | None = None
    model: bytes | None = None
    error: str | None = None
    seconds: float = 0.0


class Judge:
    def __init__(self, spec: JudgeSpec):
        self.spec = spec
        self.prep = prepare(spec.model, spec.calib, Recipe(calibration=spec.calibration), spec.labels)
        self.evidence = UnitEvidence.from_stats(StatsSet.load(spec.stats_path))
        self.heldout = (self.prep.evaluator("heldout", spec.threads)
                        or self.prep.evaluator("calibration", spec.threads))
        self.shapes = self.prep.figure_shapes(dict(spec.calibration.input_shapes))  # MACs at the data's size

    def __call__(self, recipe: dict) -> Outcome:
        start = time.perf_counter()
        try:
            model, _ = compress(self.prep, self.evidence, Recipe.from_dict(recipe))
            v = self.heldout.score(model)
            rep = model_report(model, self.shapes)
        except LincompError as exc:  # an unreachable target, a pass that refused: the candidate is out
            return Outcome(recipe, error=str(exc), seconds=time.perf_counter() - start)
        data = model.SerializeToString() if self.spec.keep_models and model_size_bytes(model) < (1 << 31) else None
        return Outcome(recipe, rep.params, rep.macs, rep.size_bytes, v, data, None, time.perf_counter() - start)
