"""What every pass shares: the context it reads and the frozen result it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from ..calibration.relu_stats import StatsSet


@dataclass(frozen=True)
class PassContext:
    """Read-only inputs of a pass: the statistics (or proven sets) that say which units are dead or linear."""

    stats: StatsSet | None
    dead_rate: float = 0.0
    linear_rate: float = 1.0
    exact: bool = False  # sets come from a proof over an input domain rather than calibration samples


@dataclass(frozen=True)
class PassResult:
    name: str
    changed: bool
    matched: int = 0
    rewritten: int = 0
    neurons_removed: int = 0
    neurons_folded: int = 0
    approximate: bool = False
    skipped: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # Relu name -> indices (into the width before the pass) of the units that remain
    kept: dict[str, "np.ndarray"] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "kept"}
        return dict(d, skipped=dict(self.skipped), notes=list(self.notes))


class Pass(Protocol):
    name: str

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult: ...

