"""Calibration: streaming input data and mergeable per-channel ReLU statistics."""
from .data_source import CalibrationSource, InputSpec, open_calibration, input_specs
from .relu_stats import ReluStats, StatsSet
from .collector import CollectOptions, collect_relu_stats

__all__ = ["CalibrationSource", "InputSpec", "open_calibration", "input_specs", "ReluStats", "StatsSet",
           "CollectOptions", "collect_relu_stats"]
