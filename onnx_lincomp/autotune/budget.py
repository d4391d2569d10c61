"""What a search may lose: an accuracy drop (paired upper bound, labels), a minimum top-1 agreement with the
original, a largest output error, or a mean output error (dense outputs such as detection maps). A candidate
is inside the budget or not; its *damage* orders candidates (how much of the budget it uses)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import OptionError
from ..evaluate.evaluator import Verification

BudgetKind = Literal["accuracy_drop", "agreement", "output_error", "mean_error"]


@dataclass(frozen=True)
class Budget:
    kind: BudgetKind
    value: float

    def __post_init__(self):
        if self.kind == "agreement" and not 0.0 < self.value <= 1.0:
            raise OptionError(f"--min-agreement is a fraction in (0, 1], got {self.value}")
        if self.kind != "agreement" and self.value < 0:
            raise OptionError(f"the budget must be non-negative, got {self.value}")

    def within(self, v: Verification) -> bool:
        if v.non_finite:
            return False
        if self.kind == "accuracy_drop":
            return v.paired is not None and v.paired.upper_points <= self.value
        if self.kind == "agreement":
            a = v.agreement
            return a is not None and a >= self.value
        return self.damage(v) <= self.value

    def damage(self, v: Verification) -> float:
        """How much of the budget the candidate uses (same unit as the budget; larger is worse)."""
        if v.non_finite:
            return float("inf")
        if self.kind == "accuracy_drop":
            return float(v.paired.upper_points) if v.paired is not None else float("inf")
        if self.kind == "agreement":
            a = v.agreement
            return 1.0 - a if a is not None else float("inf")
        return float(v.mean_abs if self.kind == "mean_error" else v.max_abs)

    def describe(self) -> str:
        return {"accuracy_drop": f"accuracy drop <= {self.value:g} points (paired upper bound)",
                "agreement": f"top-1 agreement >= {self.value:g}",
                "output_error": f"max abs output error <= {self.value:g}",
                "mean_error": f"mean abs output error <= {self.value:g}"}[self.kind]
