"""Bundled examples: small ReLU networks trained on scikit-learn's digits, with labelled calibration data.

Made by ``benchmarks/make_examples.py``. Each example is a model file and an ``.npz`` holding the model
input (key = input name) and integer labels ``y`` of the held-out digits split.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import LincompError

EXAMPLES = {
    "digits-mlp": ("digits_mlp.onnx", "digits_mlp_calib.npz"),
    "digits-cnn": ("digits_cnn.onnx", "digits_cnn_calib.npz"),
}


def example_paths(name: str) -> tuple[Path, Path]:
    """(model path, calibration path) of a bundled example."""
    if name not in EXAMPLES:
        raise LincompError(f"unknown example '{name}' (available: {', '.join(EXAMPLES)})")
    base = resources.files(__name__)
    model, calib = (Path(str(base / f)) for f in EXAMPLES[name])
    if not model.is_file():
        raise LincompError(f"example '{name}' is missing from the installation ({model})")
    return model, calib
