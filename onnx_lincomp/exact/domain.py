"""Input domains for exact mode: a box per model input.

``--input-range 0,1`` (every float input), ``NAME=lo,hi`` (one input; repeatable), a ``.npz`` with
per-feature ``lower``/``upper`` arrays (or ``NAME_lower``/``NAME_upper``), or ``from-calib`` (the
per-feature min and max of the calibration data, said so in the report).
"""
from __future__ import annotations

import zipfile
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
    """The box of the model's single float input from ``--input-range`` arguments; a box that is a single
    point is refused (every unit is trivially stable there: the result would be a constant model)."""
    domain = _parse_domain(ranges, specs, calib, overrides)
    if np.all(domain.lower == domain.upper):
        raise CalibrationDataError(f"--input-range: the box ({domain.description}) is a single point; every unit is "
                                   "trivially stable on it. Give LO < HI for at least one feature")
    return domain


def _parse_domain(ranges: tuple[str, ...] | list[str], specs: list[InputSpec], calib: CalibrationSource | None,
                  overrides: dict | None) -> Domain:
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
    if text.endswith(".npz") or Path(text).is_file():
        lo, hi = _read_bounds(Path(text), spec.name, size)
        return Domain(spec.name, shape, lo, hi, f"per-feature box from {text}")
    name, sep, pair = text.partition("=")
    if sep and name != spec.name:
        raise CalibrationDataError(f"--input-range names input '{name}', the model's input is '{spec.name}'")
    lo, hi = _parse_pair(pair if sep else text, text)
    return Domain(spec.name, shape, np.full(size, lo), np.full(size, hi), f"box [{lo:g}, {hi:g}]^{size}")


def _read_bounds(path: Path, name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``lower``/``upper`` (or ``NAME_lower``/``NAME_upper``) of a bounds ``.npz``, flattened; one-line errors."""
    if not path.is_file():
        raise CalibrationDataError(f"--input-range {path}: no such bounds file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"--input-range {path}: not a .npz file of bounds (arrays 'lower' and 'upper'); "
                                   f"numpy cannot read it ({type(exc).__name__})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CalibrationDataError(f"--input-range {path}: a single .npy array; expected a .npz with arrays 'lower' "
                                   "and 'upper'")
    with data:
        keys = (f"{name}_lower", f"{name}_upper") if f"{name}_lower" in data.files else ("lower", "upper")
        if keys[0] not in data.files or keys[1] not in data.files:
            raise CalibrationDataError(f"--input-range {path}: expected arrays 'lower' and 'upper' (found "
                                       f"{', '.join(data.files) or 'no arrays'})")
        try:
            lo, hi = (np.asarray(data[k], np.float64).reshape(-1) for k in keys)
        except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise CalibrationDataError(f"--input-range {path}: cannot read '{keys[0]}'/'{keys[1]}' as numbers "
                                       f"({type(exc).__name__})") from exc
    if lo.size != size or hi.size != size:
        raise CalibrationDataError(f"--input-range {path}: bounds have {lo.size} and {hi.size} values, input '{name}' "
                                   f"has {size} features per sample")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise CalibrationDataError(f"--input-range {path}: bounds must be finite numbers (found NaN or Inf)")
    if np.any(lo > hi):
        raise CalibrationDataError(f"--input-range {path}: some lower bounds are above their upper bounds")
    return lo, hi
