"""Confidence intervals for accuracies and for the paired accuracy drop of a candidate against its original.

Both models see the same n samples. Per sample each is right or wrong, giving the paired table

    both right: a   original right, candidate wrong: b   original wrong, candidate right: c   both wrong: d

so accuracy_before = (a + b) / n, accuracy_after = (a + c) / n and the drop is D = (b - c) / n. The
discordant counts b and c carry all the information about D (a and d only through n).

Drop interval: Tango's asymptotic score interval for a difference of paired proportions (Tango 1998,
Stat Med 17:891; recommended by Fagerland, Lydersen & Laake 2013 for its coverage at small counts).
For a candidate difference Δ the score statistic is

    T(Δ) = (b - c - nΔ) / sqrt(n (2 q + Δ (1 - Δ)))

with q the maximum-likelihood estimate of P(original wrong, candidate right) under the constraint Δ:

    q = (sqrt(B² - 4AC) - B) / (2A),  A = 2n,  B = -b - c + (2n - b + c) Δ,  C = -c Δ (1 - Δ).

The interval is {Δ : |T(Δ)| <= z} with z the two-sided normal quantile of the confidence; T decreases in
Δ, so each end is found by bisection. With b = c = 0 it is ±z² / (n + z²) (the Wilson bound of 0/n): it
contains 0, its upper end is positive, and it shrinks like 1/n. The gate uses the upper end.

Single accuracies use the Wilson score interval: for k of n right, p = k / n,

    (p + z²/2n ± z sqrt(p (1 - p) / n + z²/4n²)) / (1 + z²/n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


def _z(confidence: float) -> float:
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided confidence interval, all as fractions (x100 for percent or points)."""

    estimate: float
    lower: float
    upper: float
    confidence: float

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "lower": self.lower, "upper": self.upper, "confidence": self.confidence}

    def describe(self, scale: float = 100.0, unit: str = "") -> str:
        """``'91.20% (95% CI 89.1 to 93.0)'``-style text; ``scale`` 100 gives percent / points."""
        return (f"{scale * self.estimate:.2f}{unit} ({100 * self.confidence:.0f}% CI {scale * self.lower:.2f} to "
                f"{scale * self.upper:.2f})")


def accuracy_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for ``k`` right out of ``n``."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    z, p = _z(confidence), k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), confidence)


def _tango_statistic(delta: float, b: int, c: int, n: int) -> float:
    """T(Δ) of Tango's score test (see the module docstring)."""
    a_, b_ = 2.0 * n, -b - c + (2.0 * n - b + c) * delta
    c_ = -c * delta * (1.0 - delta)
    q = (math.sqrt(max(b_ * b_ - 4.0 * a_ * c_, 0.0)) - b_) / (2.0 * a_)
    num = b - c - n * delta
    var = n * (2.0 * q + delta * (1.0 - delta))
    if var <= 1e-300:
        return 0.0 if abs(num) < 1e-12 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def _bisect(f, lo: float, hi: float, iterations: int = 60) -> float:
    """The point in [lo, hi] where the decreasing predicate ``f`` turns from True to False."""
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if f(mid):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def drop_interval(worse: int, better: int, n: int, confidence: float = 0.95) -> Interval:
    """Tango score interval for the paired drop ``(worse - better) / n`` (fractions, not points).

    ``worse`` (b): samples the original got right and the candidate wrong; ``better`` (c): the reverse.
    """
    if n <= 0 or worse < 0 or better < 0 or worse + better > n:
        raise ValueError(f"need n > 0 and 0 <= worse + better <= n, got worse={worse}, better={better}, n={n}")
    z, d = _z(confidence), (worse - better) / n
    upper = 1.0 if worse == n else _bisect(lambda x: _tango_statistic(x, worse, better, n) >= -z, d, 1.0)
    lower = -1.0 if better == n else -_bisect(lambda x: _tango_statistic(-x, worse, better, n) <= z, -d, 1.0)
    return Interval(d, lower, upper, confidence)


@dataclass(frozen=True)
class PairedDrop:
    """Paired counts of original vs candidate correctness and the drop's interval (gate on ``upper_points``)."""

    n: int
    both_right: int
    worse: int  # b: original right, candidate wrong
    better: int  # c: original wrong, candidate right
    drop: Interval

    @staticmethod
    def of(before_correct: np.ndarray, after_correct: np.ndarray, confidence: float = 0.95) -> PairedDrop:
        """From per-sample correctness (boolean arrays of the same length)."""
        x, y = np.asarray(before_correct, bool), np.asarray(after_correct, bool)
        if x.shape != y.shape or x.size == 0:
            raise ValueError(f"need two non-empty correctness arrays of one shape, got {x.shape} and {y.shape}")
        n, worse, better = int(x.size), int((x & ~y).sum()), int((~x & y).sum())
        return PairedDrop(n, int((x & y).sum()), worse, better, drop_interval(worse, better, n, confidence))

    @property
    def confidence(self) -> float:
        return self.drop.confidence

    @property
    def drop_points(self) -> float:
        return 100.0 * self.drop.estimate

    @property
    def lower_points(self) -> float:
        return 100.0 * self.drop.lower

    @property
    def upper_points(self) -> float:
        return 100.0 * self.drop.upper

    @property
    def accuracy_before(self) -> Interval:
        return accuracy_interval(self.both_right + self.worse, self.n, self.confidence)

    @property
    def accuracy_after(self) -> Interval:
        return accuracy_interval(self.both_right + self.better, self.n, self.confidence)

    def within(self, budget_points: float) -> bool:
        """The upper end of the drop interval is at most ``budget_points``."""
        return self.upper_points <= budget_points

    def describe(self) -> str:
        """``'0.40 points (95% CI -0.12 to 0.95; 3 samples lost, 1 gained of 500)'``."""
        return (f"{self.drop_points:.2f} points ({100 * self.confidence:.0f}% CI {self.lower_points:.2f} to "
                f"{self.upper_points:.2f}; {self.worse} samples lost, {self.better} gained of {self.n})")

    def as_dict(self) -> dict:
        return {"samples": self.n, "worse": self.worse, "better": self.better, "both_right": self.both_right,
                "confidence": self.confidence, "drop_points": self.drop_points, "lower_points": self.lower_points,
                "upper_points": self.upper_points,
                "accuracy_before": self.accuracy_before.as_dict(), "accuracy_after": self.accuracy_after.as_dict()}


@dataclass(frozen=True)
class BudgetSupport:
    """Whether ``n`` held-out samples can certify a drop below the budget at all; truthy when they can.

    ``best_upper_points``: the upper bound of a candidate that agrees with the original on every sample
    (b = c = 0), the smallest any candidate without gains can reach. ``samples_needed``: the smallest n for
    which that bound is within budget, n >= z² (1 - β) / β with β the budget as a fraction.
    ``max_worse``: how many net lost samples (b with c = 0) still pass at this n.
    """

    n: int
    budget_points: float
    confidence: float
    best_upper_points: float
    samples_needed: int
    max_worse: int

    @property
    def supported(self) -> bool:
        return self.best_upper_points <= self.budget_points

    def __bool__(self) -> bool:
        return self.supported

    @property
    def message(self) -> str:
        if self.budget_points <= 0:
            return f"a budget of {self.budget_points:g} points can never be certified by a confidence bound"
        if self.supported:
            return (f"{self.n} held-out samples support a {self.budget_points:g}-point budget: up to {self.max_worse} "
                    f"lost samples pass at {100 * self.confidence:.0f}% confidence")
        return (f"{self.n} held-out samples cannot support a {self.budget_points:g}-point budget: even a candidate "
                f"that agrees on every sample has an upper bound of {self.best_upper_points:.2f} points at "
                f"{100 * self.confidence:.0f}% confidence; need at least {self.samples_needed} samples")

    def as_dict(self) -> dict:
        return {"samples": self.n, "budget_points": self.budget_points, "confidence": self.confidence,
                "supported": self.supported, "best_upper_points": self.best_upper_points,
                "samples_needed": self.samples_needed, "max_worse": self.max_worse, "message": self.message}


def _max_worse(n: int, budget_points: float, confidence: float) -> int:
    """Largest b (with c = 0) whose upper bound is within budget; -1 when even b = 0 is not (binary search)."""
    ok = lambda b: 100.0 * drop_interval(b, 0, n, confidence).upper <= budget_points  # noqa: E731
    if not ok(0):
        return -1
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def budget_supportable(n: int, budget_points: float, confidence: float = 0.95) -> BudgetSupport:
    """Can a split of ``n`` samples certify an accuracy drop of at most ``budget_points`` points at all?"""
    if n <= 0:
        raise ValueError(f"need a positive sample count, got {n}")
    z = _z(confidence)
    beta = budget_points / 100.0
    needed = math.ceil(z * z * (1 - beta) / beta) if beta > 0 else -1
    best = 100.0 * drop_interval(0, 0, n, confidence).upper
    return BudgetSupport(n, budget_points, confidence, best, needed, _max_worse(n, budget_points, confidence))
