"""onnxruntime latency: single-model figures and interleaved, noise-aware comparisons.

``measure`` times one session: warm-up, then at least ``runs`` runs (more for fast models, until
``min_seconds`` are measured); it reports the median, p90 and interquartile range (IQR = q75 - q25).

``compare_latency`` compares sessions on the same feeds in interleaved rounds so that a slow phase of a
shared machine hits all models alike: in round r every model runs one block of k_i runs (k_i fills about
``round_ms``), in an order rotated by r (A B, B A, ... for two models). Per round, ``ratio_r,i =
median_r,i / median_r,0``. The reported ratio is the median over rounds and its interval is the
distribution-free confidence interval of a median: the order statistics ``(ratio_(j), ratio_(R+1-j))``
with the largest j such that ``P(Bin(R, 1/2) < j) <= (1 - confidence) / 2``. The verdict is "no
change" when that interval contains 1 or the median ratio is within ``noise_band`` of 1 (5% by
default: byte-identical copies of 10-30 µs models measured up to 2.5% apart, consistently within one
comparison, on a loaded 2-core machine; see benchmarks/latency_noise.py);
otherwise "x.xx× slower" (ratio > 1) or "x.xx× faster" (1 / ratio).
Sessions for comparisons should be pinned (:func:`pinned_options`: a fixed intra-op thread count, 1 by
default, and one inter-op thread). Spinning stays on: with 2 threads on a loaded 2-core machine, turning
it off widened the ratio intervals several-fold (wake-up latency), and with 1 thread it does not matter.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import OptionError
from .session import SessionOptions, SessionScope, open_session

Feeds = dict[str, np.ndarray]
Change = Literal["no change", "faster", "slower"]


@dataclass(frozen=True)
class LatencyOptions:
    runs: int = 50
    warmup: int = 5
    threads: int = 0
    batch_size: int = 1
    min_seconds: float = 0.3  # fast models run more than ``runs`` times until this much time is measured
    max_runs: int = 5000

    def __post_init__(self):
        if self.runs <= 0 or self.warmup < 0 or self.batch_size <= 0 or self.threads < 0:
            raise OptionError("runs and batch_size must be positive; warmup and threads non-negative")


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    batch_size: int
    threads: int
    runs: int
    iqr_ms: float = 0.0  # spread: q75 - q25 of the run times

    @staticmethod
    def of(times_ms: Sequence[float], batch_size: int, threads: int) -> Latency:
        t = np.sort(np.asarray(times_ms, np.float64))
        p90 = float(t[min(len(t) - 1, int(round(0.9 * (len(t) - 1))))])
        q25, q75 = np.percentile(t, [25, 75])
        return Latency(float(np.median(t)), p90, batch_size, threads, len(t), float(q75 - q25))

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch_size / (self.median_ms / 1000.0) if self.median_ms > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "batch_size": self.batch_size,
                "threads": self.threads, "runs": self.runs, "throughput_per_s": self.throughput,
                "iqr_ms": self.iqr_ms}


def _timed(session: ort.InferenceSession, feeds: Feeds, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure(session: ort.InferenceSession, feeds: Feeds, options: LatencyOptions = LatencyOptions()) -> Latency:
    """Median, p90 and IQR of one session's run time after ``warmup`` runs."""
    _timed(session, feeds, options.warmup)
    times: list[float] = []
    while len(times) < options.runs or (sum(times) < options.min_seconds * 1000.0 and len(times) < options.max_runs):
        times.extend(_timed(session, feeds, 1))
    return Latency.of(times, options.batch_size, options.threads)


measure_session = measure  # the earlier name, kept for callers of the library


def pinned_options(threads: int = 1) -> SessionOptions:
    """Session settings for timing: a fixed intra-op thread count (at least 1) and one inter-op thread."""
    return SessionOptions(threads=max(threads, 1), inter_threads=1, optimize=True)


@dataclass(frozen=True)
class CompareOptions:
    """Interleaved comparison settings; ``noise_band`` is the relative change called 'no change'."""

    rounds: int = 21
    round_ms: float = 15.0
    min_block: int = 3
    max_block: int = 1000
    warmup: int = 10
    threads: int = 1
    batch_size: int = 1
    noise_band: float = 0.05
    confidence: float = 0.95

    def __post_init__(self):
        if self.rounds < 3 or self.round_ms <= 0 or self.min_block < 1 or self.max_block < self.min_block:
            raise OptionError("need rounds >= 3, round_ms > 0 and 1 <= min_block <= max_block")
        if not 0.0 <= self.noise_band < 1.0 or not 0.5 <= self.confidence < 1.0:
            raise OptionError("noise_band must be in [0, 1) and confidence in [0.5, 1)")


@dataclass(frozen=True)
class RatioEstimate:
    """Latency of one model relative to the first: median over rounds, its interval, and the verdict."""

    ratio: float
    low: float
    high: float
    change: Change
    noise_band: float

    @property
    def verdict(self) -> str:
        if self.change == "no change":
            return "no change"
        if self.change == "slower":
            return f"{self.ratio:.2f}× slower"
        return f"{1.0 / self.ratio:.2f}× faster"

    def as_dict(self) -> dict:
        return {"ratio": self.ratio, "low": self.low, "high": self.high, "change": self.change,
                "verdict": self.verdict, "noise_band": self.noise_band}


@dataclass(frozen=True)
class LatencyComparison:
    latencies: tuple[Latency, ...]
    ratios: tuple[RatioEstimate, ...]  # one per model, the first against itself
    rounds: int
    blocks: tuple[int, ...]
    confidence: float

    def as_dict(self) -> dict:
        models = [{**lat.as_dict(), **r.as_dict()} for lat, r in zip(self.latencies, self.ratios, strict=True)]
        return {"rounds": self.rounds, "blocks": list(self.blocks), "confidence": self.confidence, "models": models}


def _binom_half_cdf(j: int, r: int) -> float:
    """P(X <= j) for X ~ Binomial(r, 1/2), exactly (stdlib; scipy.stats costs a second to import)."""
    return sum(math.comb(r, i) for i in range(j + 1)) / 2.0**r


def median_interval(values: Sequence[float] | np.ndarray, confidence: float) -> tuple[float, float]:
    """Distribution-free CI of a median: order statistics j and R+1-j, P(Bin(R,1/2) < j) <= alpha/2."""
    v = np.sort(np.asarray(values, np.float64))
    r = len(v)
    alpha = 1.0 - confidence
    j = 0
    while j + 1 <= r // 2 and _binom_half_cdf(j, r) <= alpha / 2:  # cdf(j) = P(X <= j) = P(X < j + 1)
        j += 1
    if j == 0:  # too few rounds for this confidence: the whole range
        return float(v[0]), float(v[-1])
    return float(v[j - 1]), float(v[r - j])


def _verdict(ratios: Sequence[float] | np.ndarray, options: CompareOptions) -> RatioEstimate:
    """Median ratio over rounds, its interval, and the verdict against the noise band."""
    mid = float(np.median(ratios))
    low, high = median_interval(ratios, options.confidence)
    band = options.noise_band
    if low <= 1.0 <= high or abs(np.log(mid)) <= np.log1p(band):
        change: Change = "no change"
    else:
        change = "slower" if mid > 1.0 else "faster"
    return RatioEstimate(mid, low, high, change, band)


def _block_sizes(sessions: Sequence[ort.InferenceSession], feeds: Feeds, options: CompareOptions) -> list[int]:
    """Warm every session up and size its block so that one block takes about ``round_ms``."""
    blocks = []
    for s in sessions:
        t = statistics.median(_timed(s, feeds, max(options.warmup, 1)))
        blocks.append(int(min(options.max_block, max(options.min_block, options.round_ms / max(t, 1e-6)))))
    return blocks


def compare_latency(sessions: Sequence[ort.InferenceSession], feeds: Feeds,
                    options: CompareOptions = CompareOptions()) -> LatencyComparison:
    """Interleaved rounds over ``sessions`` on the same ``feeds``; every model is judged against the first."""
    if not sessions:
        raise ValueError("compare_latency needs at least one session")
    blocks = _block_sizes(sessions, feeds, options)
    m = len(sessions)
    medians = np.zeros((options.rounds, m))
    times: list[list[float]] = [[] for _ in sessions]
    for r in range(options.rounds):
        for i in (list(range(m))[r % m:] + list(range(m))[:r % m]):
            block = _timed(sessions[i], feeds, blocks[i])
            medians[r, i] = statistics.median(block)
            times[i].extend(block)
    ratios = medians / medians[:, :1]
    lats = tuple(Latency.of(t, options.batch_size, options.threads) for t in times)
    return LatencyComparison(lats, tuple(_verdict(ratios[:, i], options) for i in range(m)), options.rounds,
                             tuple(blocks), options.confidence)


def compare_models_latency(models: Sequence[onnx.ModelProto | str | Path], feeds: Feeds,
                           options: CompareOptions = CompareOptions()) -> LatencyComparison:
    """Open every model with :func:`pinned_options` and :func:`compare_latency` them against the first."""
    with SessionScope(prefix="lincomp-bench-") as scope:
        sessions = [scope.open(m, pinned_options(options.threads)) for m in models]
        return compare_latency(sessions, feeds, options)


def make_session(model: onnx.ModelProto, workdir: str, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
    """Backward-compatible wrapper of :func:`open_session`."""
    return open_session(model, workdir, SessionOptions(threads=threads, optimize=optimize))


def measure_latency(model: onnx.ModelProto, feeds: Feeds, options: LatencyOptions = LatencyOptions()) -> Latency:
    """Open ``model`` in a temporary folder and :func:`measure` it."""
    with SessionScope(prefix="lincomp-bench-") as scope:
        return measure(scope.open(model, SessionOptions(threads=options.threads)), feeds, options)
