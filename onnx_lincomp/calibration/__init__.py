"""Calibration: streaming input data and mergeable per-channel ReLU statistics."""
from .collector import CollectOptions, collect_relu_stats
from .data_source import CalibrationSource, InputSpec, input_specs, open_calibration
from .relu_stats import ReluStats, StatsSet

__all__ = ["CalibrationSource", "InputSpec", "open_calibration", "input_specs", "ReluStats", "StatsSet",
           "CollectOptions", "collect_relu_stats"]
