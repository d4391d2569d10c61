"""Compare an optimised model with the original in onnxruntime on the same inputs.

A thin front over :class:`onnx_lincomp.evaluate.Evaluator`, which owns the implementation: per output
the max and mean absolute error, the max error relative to the output scale (max |original|), top-1
agreement for classifier-shaped outputs ``(N, K)``, non-finite candidate values, and with labels the
accuracy before and after with the paired drop interval.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .calibration.data_source import CalibrationSource
from .evaluate.evaluator import (
    Evaluator,
    OutputError,
    Score,
    Verification,
    classifier_output,
    labels_as_classes,
    model_accuracy,
    predictions,
)

__all__ = ["OutputError", "Score", "Verification", "classifier_output", "compare_models", "labels_as_classes",
           "model_accuracy", "predictions"]


def compare_models(original: onnx.ModelProto, optimized: onnx.ModelProto, graph: gs.Graph, source: CalibrationSource,
                   start: int = 0, stop: int | None = None, batch_size: int = 64, labels: str | None = None,
                   threads: int = 0) -> Verification:
    """Run samples ``[start, stop)`` through both models; ``graph`` gives the input signature."""
    return Evaluator(original, graph, source, start, stop, labels, batch_size, threads).score(optimized)
