"""onnxruntime in one place: sessions (threads, optimisation level, big models by file), feeds, latency."""
from .feeds import benchmark_feeds, feeds_samples, fixed_batch, iterate_feeds, model_feeds
from .latency import (
    CompareOptions,
    Latency,
    LatencyComparison,
    LatencyOptions,
    RatioEstimate,
    compare_latency,
    compare_models_latency,
    measure,
    pinned_options,
)
from .session import SessionOptions, SessionScope, open_session, ort_message, run_session

__all__ = ["benchmark_feeds", "feeds_samples", "fixed_batch", "iterate_feeds", "model_feeds", "CompareOptions",
           "Latency", "LatencyComparison", "LatencyOptions", "RatioEstimate", "compare_latency",
           "compare_models_latency", "measure", "pinned_options", "SessionOptions", "SessionScope", "open_session",
           "ort_message", "run_session"]
