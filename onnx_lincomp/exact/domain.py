"""Input domains for exact mode: a box per model input.

``--input-range 0,1`` (every float input), ``NAME=lo,hi`` (one input; repeatable), a ``.npz`` with
per-feature ``lower``/``upper`` arrays (or ``NAME_lower``/``NAME_upper``), or ``from-calib`` (the
per-feature min and max of the calibration data, said so in the report).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..calibration.data_source import CalibrationSource, InputSpec
from ..errors import CalibrationDataError


@dataclass(frozen=True, eq=False)
class Domain:
    """Lower and upper bounds of one sample of the (single) float input, flattened."""

    input: str
    shape: tuple[int, ...]  # one sample, no batch axis
    lower: np.ndarray
    upper: np.ndarray
    description: str

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        u = rng.random((n, self.lower.size))
        return (self.lower + u * (self.upper - self.lower)).reshape((n,) + self.shape)

    def as_dict(self) -> dict:
        same = self.lower.min() == self.lower.max() and self.upper.min() == self.upper.max()
        return {"input": self.input, "shape": list(self.shape), "description": self.description,
                "lower": float(self.lower[0]) if same else "per-feature",
                "upper": float(self.upper[0]) if same else "per-feature"}


def _sample_shape(spec: InputSpec, overrides: dict) -> tuple[int, ...]:
    if spec.name in overrides:
        return tuple(overrides[spec.name][1:])
    if spec.shape is None or any(not isinstance(d, int) for d in spec.shape[1:]):
        raise CalibrationDataError(f"input '{spec.name}' has dynamic dimensions; give --input-shape {spec.name}=1,...")
    return tuple(spec.shape[1:])


def _parse_pair(text: str, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise CalibrationDataError(f"--input-range '{what}': expected LO,HI numbers") from exc
    if not lo <= hi:
        raise CalibrationDataError(f"--input-range '{what}': lower bound {lo} is above upper bound {hi}")
    return lo, hi


def parse_domain(ranges: tuple[str, ...] | list[str], specs: list[InputSpec], *,
                 calib: CalibrationSource | None = None, overrides: dict | None = None) -> Domain:
    """The box of the model's single float input from ``--input-range`` arguments."""
    floats = [s for s in specs if s.dtype.kind == "f"]
    if len(floats) != 1 or len(specs) != 1:
        raise CalibrationDataError("exact mode needs a model with one float input (found: "
                                   f"{', '.join(s.name + ' ' + s.describe() for s in specs)})")
    spec = floats[0]
    shape = _sample_shape(spec, overrides or {})
    size = int(np.prod(shape))
    if not ranges:
        raise CalibrationDataError("exact mode needs --input-range (LO,HI, NAME=LO,HI, a .npz of bounds, or "
                                   "from-calib)")
    text = ranges[-1]
    if text == "from-calib":
        if calib is None:
            raise CalibrationDataError("--input-range from-calib needs --calib DATA")
        lo, hi = np.full(size, np.inf), np.full(size, -np.inf)
        for batch in calib.batches(256):
            x = batch[spec.name].reshape(len(batch[spec.name]), -1).astype(np.float64)
            lo, hi = np.minimum(lo, x.min(axis=0)), np.maximum(hi, x.max(axis=0))
        return Domain(spec.name, shape, lo, hi, f"per-feature min/max of the calibration data ({calib.description})")
    if text.endswith(".npz"):
        path = Path(text)
        if not path.is_file():
            raise CalibrationDataError(f"{path}: no such bounds file")
        with np.load(path) as data:
            keys = (f"{spec.name}_lower", f"{spec.name}_upper") if f"{spec.name}_lower" in data else ("lower", "upper")
            if keys[0] not in data or keys[1] not in data:
                raise CalibrationDataError(f"{path}: expected arrays 'lower' and 'upper' (found "
                                           f"{', '.join(data.files)})")
            lo, hi = (np.asarray(data[k], np.float64).reshape(-1) for k in keys)
        if lo.size != size or hi.size != size:
            raise CalibrationDataError(f"{path}: bounds have {lo.size} values, input '{spec.name}' has {size} features "
                                       "per sample")
        if np.any(lo > hi):
            raise CalibrationDataError(f"{path}: some lower bounds are above their upper bounds")
        return Domain(spec.name, shape, lo, hi, f"per-feature box from {path}")
    name, sep, pair = text.partition("=")
    if sep and name != spec.name:
        raise CalibrationDataError(f"--input-range names input '{name}', the model's input is '{spec.name}'")
    lo, hi = _parse_pair(pair if sep else text, text)
    return Domain(spec.name, shape, np.full(size, lo), np.full(size, hi), f"box [{lo:g}, {hi:g}]^{size}")
