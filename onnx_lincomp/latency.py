"""Backward-compatible home of the latency API; the implementation lives in :mod:`onnx_lincomp.runtime.latency`."""
from __future__ import annotations

from .runtime.latency import (
    CompareOptions,
    Latency,
    LatencyComparison,
    LatencyOptions,
    RatioEstimate,
    compare_latency,
    compare_models_latency,
    make_session,
    measure,
    measure_latency,
    measure_session,
    pinned_options,
)

__all__ = ["CompareOptions", "Latency", "LatencyComparison", "LatencyOptions", "RatioEstimate", "compare_latency",
           "compare_models_latency", "make_session", "measure", "measure_latency", "measure_session", "pinned_options"]
