"""Unit sets: one decision per Relu, which of its units are dead and which are linear, and why.

Two kinds of evidence produce them and every linearity pass reads them the same way:

* **statistics** (calibration data): a unit is dead when it is positive on no position of any sample
  (``dead_rate = 0``) or active on at most a fraction ``dead_rate`` of the samples; it is linear when it is
  positive on every position (``linear_rate = 1``) or on at least a fraction ``linear_rate`` of them. At the
  default rates both sets are exact *on the calibration data*; a removed unit's mean output is carried so a
  pass can fold it into the consumer bias when the rate is looser.
* **a certificate** (exact mode): a unit is dead when proven stably inactive over the input domain, linear
  when proven stably active (every position of a Conv channel). Rates do not apply to proofs.

The rates are options of the passes that use them (remove-dead's ``dead_rate``, fold-linear's
``linear_rate``); the evidence only answers ``unit_set(relu, width, dead_rate=..., linear_rate=...)``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from ..calibration.relu_stats import StatsSet
from ..errors import OptionError

EvidenceKind = Literal["statistics", "certificate"]


@dataclass(frozen=True, eq=False)
class UnitSet:
    """The decision for one Relu: boolean masks over its channels and where they came from."""

    relu: str
    dead: np.ndarray
    linear: np.ndarray
    mean_output: np.ndarray  # mean Relu output per position (0 for proven sets): the bias fold of a removed unit
    ever_active: np.ndarray  # units seen positive at least once (a removed one makes the result approximate)
    origin: str

    @property
    def width(self) -> int:
        return int(self.dead.size)


@dataclass(frozen=True)
class ProvenUnits:
    """Channel masks a certificate proved over its domain."""

    active: np.ndarray
    inactive: np.ndarray


@dataclass(frozen=True, eq=False)
class UnitEvidence:
    """What unit sets are decided from: statistics of calibration data, or a certificate's proven sets."""

    kind: EvidenceKind
    description: str
    stats: StatsSet | None = None
    proven: Mapping[str, ProvenUnits] = field(default_factory=dict)
    not_analysed: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def from_stats(stats: StatsSet) -> UnitEvidence:
        kind = "random data" if stats.random else "data"
        return UnitEvidence("statistics", f"statistics of {stats.n_samples} samples ({kind}: {stats.source})", stats,
                            not_analysed=stats.not_analysed)

    @staticmethod
    def from_proofs(proven: Mapping[str, ProvenUnits], domain: str,
                    not_analysed: tuple[tuple[str, str], ...] = ()) -> UnitEvidence:
        return UnitEvidence("certificate", f"proof over {domain}", None, dict(proven), not_analysed)

    @property
    def relus(self) -> tuple[str, ...]:
        if self.stats is not None:
            return tuple(s.relu for s in self.stats.layers)
        return tuple(self.proven)

    def unit_set(self, relu: str, width: int | None, *, dead_rate: float = 0.0,
                 linear_rate: float = 1.0) -> UnitSet | None:
        """The decision for ``relu`` (None when the evidence does not cover it or its width is not ``width``;
        ``width=None`` accepts the width the evidence has)."""
        if self.kind == "certificate":
            return self._proven_set(relu, width, dead_rate, linear_rate)
        s = self.stats.get(relu) if self.stats is not None else None
        if s is None or (width is not None and s.channels != width):
            return None
        width = s.channels
        dead = s.dead.copy() if dead_rate <= 0 else s.sample_rate <= dead_rate
        linear = (s.always_active if linear_rate >= 1.0 else s.position_rate >= linear_rate) & ~s.dead
        mean = s.act_mean if dead_rate > 0 else np.zeros(width)
        origin = f"{self.description}, dead rate {dead_rate:g}, linear rate {linear_rate:g}"
        return UnitSet(relu, dead, linear, mean, s.positive > 0, origin)

    def _proven_set(self, relu: str, width: int, dead_rate: float, linear_rate: float) -> UnitSet | None:
        if dead_rate > 0 or linear_rate < 1.0:
            raise OptionError("rates apply to statistics only: proven sets are exact (drop --dead-rate/--linear-rate)")
        p = self.proven.get(relu)
        if p is None or (width is not None and p.inactive.size != width):
            return None
        width = p.inactive.size
        return UnitSet(relu, p.inactive.copy(), p.active & ~p.inactive, np.zeros(width), ~p.inactive, self.description)

    def subset(self, kept: Mapping[str, np.ndarray]) -> UnitEvidence:
        """The evidence after passes removed units (``kept``: Relu name -> remaining indices)."""
        if not kept:
            return self
        if self.stats is not None:
            return replace(self, stats=self.stats.subset(dict(kept)))
        proven = {r: ProvenUnits(p.active[kept[r]], p.inactive[kept[r]]) if r in kept else p
                  for r, p in self.proven.items()}
        return replace(self, proven=proven)
