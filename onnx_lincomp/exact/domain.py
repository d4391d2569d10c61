"""Input domains for exact mode: a box per model input.

Every ``--input-range`` value is ``[NAME=]SPEC``; ``SPEC`` is ``LO,HI`` (every feature), a ``.npz`` with
per-feature ``lower``/``upper`` arrays (or ``NAME_lower``/``NAME_upper``), or ``from-calib`` (the per-feature
min and max of the calibration data, said so in the report). Without ``NAME=`` a value applies to every
input, with it to that input only; values are read in order and a later one replaces an earlier one for
the inputs it names, so ``0,1 mask=-1,1`` boxes every input in ``[0, 1]`` except ``mask``. Every input must
end with a box, and every input must be a float tensor.

The exact stages see one flat vector: the inputs in graph order, each flattened (row-major) and
concatenated. :meth:`Domain.feeds` splits such vectors back into per-input arrays for onnxruntime and
:meth:`Domain.flatten` joins a batch of model inputs into them.
"""
from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..calibration.data_source import CalibrationSource, InputSpec
from ..errors import CalibrationDataError


@dataclass(frozen=True, eq=False)
class InputBox:
    """Lower and upper bounds of one sample of one input, flattened."""

    input: str
    shape: tuple[int, ...]  # one sample, no batch axis
    lower: np.ndarray
    upper: np.ndarray
    description: str

    @property
    def size(self) -> int:
        return int(self.lower.size)

    def as_dict(self) -> dict:
        """The box as the certificate states it: scalars for a uniform box, else ranges and a digest of the
        exact bounds (float64 lower then upper bytes)."""
        uniform = self.lower.min() == self.lower.max() and self.upper.min() == self.upper.max()
        out = {"input": self.input, "shape": list(self.shape), "description": self.description,
               "lower": float(self.lower[0]) if uniform else "per-feature",
               "upper": float(self.upper[0]) if uniform else "per-feature"}
        if not uniform:
            digest = hashlib.sha256(np.ascontiguousarray(self.lower, np.float64).tobytes()
                                    + np.ascontiguousarray(self.upper, np.float64).tobytes()).hexdigest()
            out.update({"lower_range": [float(self.lower.min()), float(self.lower.max())],
                        "upper_range": [float(self.upper.min()), float(self.upper.max())],
                        "bounds_sha256": digest})
        return out


@dataclass(frozen=True, eq=False)
class Domain:
    """A box per float input of the model (graph order); the exact stages read their flat concatenation."""

    boxes: tuple[InputBox, ...]

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(b.input for b in self.boxes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """One sample's shape per input, in the order of the flat vector."""
        return {b.input: b.shape for b in self.boxes}

    @cached_property
    def lower(self) -> np.ndarray:
        return np.concatenate([b.lower for b in self.boxes])

    @cached_property
    def upper(self) -> np.ndarray:
        return np.concatenate([b.upper for b in self.boxes])

    @property
    def size(self) -> int:
        return int(sum(b.size for b in self.boxes))

    @property
    def description(self) -> str:
        if len(self.boxes) == 1:
            return self.boxes[0].description
        return "; ".join(f"{b.input}: {b.description}" for b in self.boxes)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` uniform points of the box, flat: (n, size)."""
        u = rng.random((n, self.size))
        return self.lower + u * (self.upper - self.lower)

    def feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Flat points (n, size) as float32 model inputs, one array of shape (n, *shape) per input."""
        x = np.asarray(x).reshape(len(x), self.size)
        out, offset = {}, 0
        for b in self.boxes:
            out[b.input] = x[:, offset:offset + b.size].astype(np.float32).reshape((len(x),) + b.shape)
            offset += b.size
        return out

    def flatten(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """A batch of model inputs as flat float64 points (n, size)."""
        return np.concatenate([np.asarray(batch[b.input], np.float64).reshape(len(batch[b.input]), -1)
                               for b in self.boxes], axis=1)

    def as_dict(self) -> dict:
        """Every input's box; with one input its keys are also at the top level (the single-input format)."""
        out = {"description": self.description, "inputs": [b.as_dict() for b in self.boxes]}
        return {**self.boxes[0].as_dict(), **out} if len(self.boxes) == 1 else out


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
    """A box per input of the model from ``--input-range`` arguments (see the module docstring); a domain that
    is a single point is refused (every unit is trivially stable there: the result would be a constant model)."""
    floats = [s for s in specs if s.dtype.kind == "f"]
    if not specs or len(floats) != len(specs):
        raise CalibrationDataError("exact mode needs a model whose inputs are all float tensors (found: "
                                   f"{', '.join(s.name + ' ' + s.describe() for s in specs) or 'no inputs'})")
    if not ranges:
        raise CalibrationDataError("exact mode needs --input-range (LO,HI, NAME=LO,HI, a .npz of bounds, or "
                                   "from-calib)")
    shapes = {s.name: _sample_shape(s, overrides or {}) for s in specs}
    chosen: dict[str, tuple[str, bool]] = {}  # input -> (spec, given by name)
    for text in ranges:
        name, spec = _split_name(text, list(shapes))
        for target in ([name] if name is not None else list(shapes)):
            chosen[target] = (spec, name is not None)
    missing = [n for n in shapes if n not in chosen]
    if missing:
        raise CalibrationDataError(f"--input-range gives no box for input '{missing[0]}' (inputs: "
                                   f"{', '.join(shapes)}); add {missing[0]}=LO,HI or an unnamed LO,HI for all")
    domain = Domain(tuple(_box(name, shapes[name], chosen[name][0], calib, plain=len(shapes) == 1 or chosen[name][1])
                          for name in shapes))
    if np.all(domain.lower == domain.upper):
        raise CalibrationDataError(f"--input-range: the box ({domain.description}) is a single point; every unit is "
                                   "trivially stable on it. Give LO < HI for at least one feature")
    return domain


def _split_name(text: str, names: list[str]) -> tuple[str | None, str]:
    """(input name or None for every input, the spec) of one ``--input-range`` value."""
    if text.endswith(".npz") and "=" not in text or Path(text).is_file():
        return None, text
    name, sep, spec = text.partition("=")
    if not sep:
        return None, text
    if name not in names:
        which = (f"the model's input is '{names[0]}'" if len(names) == 1
                 else f"the model's inputs are {', '.join(names)}")
        raise CalibrationDataError(f"--input-range names input '{name}', which the model does not have ({which})")
    return name, spec


def _box(name: str, shape: tuple[int, ...], text: str, calib: CalibrationSource | None, plain: bool) -> InputBox:
    """The box of one input; ``plain``: a bounds file may hold plain ``lower``/``upper`` for it."""
    size = int(np.prod(shape))
    if text == "from-calib":
        if calib is None:
            raise CalibrationDataError("--input-range from-calib needs --calib DATA")
        lo, hi = np.full(size, np.inf), np.full(size, -np.inf)
        for batch in calib.batches(256):
            x = batch[name].reshape(len(batch[name]), -1).astype(np.float64)
            lo, hi = np.minimum(lo, x.min(axis=0)), np.maximum(hi, x.max(axis=0))
        return InputBox(name, shape, lo, hi, f"per-feature min/max of the calibration data ({calib.description})")
    if text.endswith(".npz") or Path(text).is_file():
        lo, hi = _read_bounds(Path(text), name, size, plain)
        return InputBox(name, shape, lo, hi, f"per-feature box from {text}")
    lo, hi = _parse_pair(text, text)
    return InputBox(name, shape, np.full(size, lo), np.full(size, hi), f"box [{lo:g}, {hi:g}]^{size}")


def _read_bounds(path: Path, name: str, size: int, plain: bool) -> tuple[np.ndarray, np.ndarray]:
    """``NAME_lower``/``NAME_upper`` of a bounds ``.npz``, or ``lower``/``upper`` when ``plain`` (a model with one
    input, or a file given as ``NAME=bounds.npz``), flattened; one-line errors."""
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
        keys = (f"{name}_lower", f"{name}_upper") if f"{name}_lower" in data.files or not plain else ("lower", "upper")
        if keys[0] not in data.files or keys[1] not in data.files:
            want = "'lower' and 'upper'" if plain else f"'{name}_lower' and '{name}_upper' (or give {name}={path})"
            raise CalibrationDataError(f"--input-range {path}: expected arrays {want} (found "
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
