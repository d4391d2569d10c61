"""onnxruntime latency measurement: warm-up, then median and p90 over repeated runs."""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .model_io import session_source


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
            raise ValueError("runs and batch_size must be positive; warmup and threads non-negative")


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    batch_size: int
    threads: int
    runs: int

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch_size / (self.median_ms / 1000.0) if self.median_ms > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "batch_size": self.batch_size,
                "threads": self.threads, "runs": self.runs, "throughput_per_s": self.throughput}


def make_session(model: onnx.ModelProto, workdir: str, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(session_source(model, workdir), so, providers=["CPUExecutionProvider"])


def measure_session(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], options: LatencyOptions) -> Latency:
    for _ in range(options.warmup):
        sess.run(None, feeds)
    times: list[float] = []
    while len(times) < options.runs or (sum(times) < options.min_seconds * 1000.0 and len(times) < options.max_runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return Latency(statistics.median(times), p90, options.batch_size, options.threads, len(times))


def measure_latency(model: onnx.ModelProto, feeds: dict[str, np.ndarray], options: LatencyOptions = LatencyOptions()) -> Latency:
    with tempfile.TemporaryDirectory(prefix="lincomp-bench-") as workdir:
        return measure_session(make_session(model, workdir, options.threads), feeds, options)
