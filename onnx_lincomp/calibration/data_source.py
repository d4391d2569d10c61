"""Calibration data sources: ``.npz`` / ``.npy`` files, folders of shards, or synthetic random data.

Arrays are never loaded whole: ``.npy`` files are memory-mapped, ``.npz`` members are memory-mapped
when stored uncompressed and read chunk by chunk from the zip stream otherwise, so memory does not
grow with the number of samples. Every batch is validated against the model's inputs (name, rank,
static dimensions, dtype kind, NaN/Inf) and errors name the file, input, expected and found.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import CalibrationDataError, OptionError
from ..runtime.feeds import batch_axis

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "x".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.dtype.name}[{dims}]"

    @property
    def batch_axis(self) -> int | None:
        return batch_axis(self.shape)

    def sample_first(self) -> tuple[Dim, ...] | None:
        """The shape with the batch axis moved to the front (how data arrays hold samples)."""
        ax = self.batch_axis
        if self.shape is None or ax in (None, 0):
            return self.shape
        return (self.shape[ax],) + self.shape[:ax] + self.shape[ax + 1:]


def input_specs(graph: gs.Graph) -> list[InputSpec]:
    specs = []
    for t in graph.inputs:
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        shape = None if t.shape is None else tuple(d if isinstance(d, int) and d >= 0
                                                   else (d if isinstance(d, str) else None) for d in t.shape)
        specs.append(InputSpec(t.name, dtype, shape))
    return specs


class _ArrayReader:
    """Reads rows ``[start, stop)`` of one array in a file without loading the rest."""

    def __init__(self, label: str, array: np.ndarray | None = None, zip_path: Path | None = None,
                 member: str | None = None):
        self.label = label
        self._array = array
        self._zip_path = zip_path
        self._member = member
        self._stream = None
        self._pos = 0
        if array is None:
            with zipfile.ZipFile(zip_path) as zf, zf.open(member) as fh:
                self.shape, self.fortran, self.dtype = self._header(fh)
        else:
            self.shape, self.dtype = array.shape, array.dtype

    @staticmethod
    def _header(fh):
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        return np.lib.format.read_array_header_2_0(fh)

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self._array is not None:
            return np.asarray(self._array[start:stop])
        # compressed npz member: a forward-only stream, reopened if asked to go back
        if self._stream is None or start < self._pos:
            self.close()
            self._zf = zipfile.ZipFile(self._zip_path)
            self._stream = self._zf.open(self._member)
            self._header(self._stream)
            self._pos = 0
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if start > self._pos:
            self._stream.read((start - self._pos) * row)
        data = self._stream.read((stop - start) * row)
        self._pos = stop
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start,) + tuple(self.shape[1:]))

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._zf.close()
            self._stream = None


def _open_npz_members(path: Path) -> dict[str, _ArrayReader]:
    readers: dict[str, _ArrayReader] = {}
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz file ({exc})") from exc
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            if info.compress_type == zipfile.ZIP_STORED:
                try:
                    with zf.open(info) as fh:
                        shape, fortran, dtype = _ArrayReader._header(fh)
                        header_len = fh.tell()
                    # data offset = local header + name + extra + npy header
                    with open(path, "rb") as raw:
                        raw.seek(info.header_offset + 26)
                        name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
                    offset = info.header_offset + 30 + int(name_len) + int(extra_len) + header_len
                    if dtype.hasobject or fortran:
                        raise ValueError("object or Fortran-ordered array")
                    arr = (np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape) if np.prod(shape)
                           else np.zeros(shape, dtype))
                    readers[key] = _ArrayReader(f"{path}:{key}", array=arr)
                    continue
                except ValueError as exc:
                    raise CalibrationDataError(f"{path}:{key}: unsupported array ({exc})") from exc
            readers[key] = _ArrayReader(f"{path}:{key}", zip_path=path, member=info.filename)
    if not readers:
        raise CalibrationDataError(f"{path}: the .npz file holds no arrays")
    return readers


def _open_file(path: Path) -> dict[str, _ArrayReader]:
    if path.suffix == ".npz":
        return _open_npz_members(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CalibrationDataError(f"{path}: not a readable .npy file ({exc})") from exc
        return {"": _ArrayReader(str(path), array=arr)}
    raise CalibrationDataError(f"{path}: calibration data must be .npz, .npy or a folder of them (found "
                               f"'{path.suffix or 'no suffix'}')")


class CalibrationSource:
    """Batches of model inputs from files or from a random generator.

    ``labels`` names an extra array (for example ``y``) that is passed through with each batch for
    accuracy reporting; it is not fed to the model.
    """

    def __init__(self, specs: list[InputSpec], *, files: list[Path] | None = None, random_samples: int = 0,
                 shape_overrides: dict[str, tuple[int, ...]] | None = None, labels: str | None = None,
                 seed: int = 0, max_samples: int | None = None, description: str = "",
                 arrays: dict[str, np.ndarray] | None = None):
        self.specs = specs
        self.arrays = arrays
        self.files = files or ([Path(description or "<arrays>")] if arrays is not None else [])
        self.random_samples = random_samples
        self.shape_overrides = shape_overrides or {}
        unknown = sorted(set(self.shape_overrides) - {sp.name for sp in specs})
        if unknown:
            raise OptionError(f"--input-shape names input '{unknown[0]}', which the model does not have (inputs: "
                              f"{', '.join(sp.name for sp in specs)})")
        self.labels = labels
        self.seed = seed
        self.max_samples = max_samples
        self.description = description
        self.is_random = not self.files
        self.casts: dict[str, tuple[str, str]] = {}  # input -> (dtype in the data, dtype fed): said in reports
        # inputs whose arrays carry one extra leading axis: each sample is a whole model input
        # (e.g. a recurrent state [2, batch, 128] or a scalar), so the model is fed one sample a run
        self.per_sample: set[str] = {s.name for s in specs if s.shape is not None and len(s.shape) == 0}
        if self.is_random and random_samples <= 0:
            raise CalibrationDataError("random calibration needs a positive sample count (random:N)")
        if not self.is_random:
            self._check_files()

    # ---- file sources -------------------------------------------------------------------------
    def _readers_for(self, path: Path) -> dict[str, _ArrayReader]:
        if self.arrays is not None:
            found = {k: _ArrayReader(f"{path}:{k}", array=np.asarray(v)) for k, v in self.arrays.items()}
        else:
            found = _open_file(path)
        names = [s.name for s in self.specs]
        if "" in found or (len(found) == 1 and len(names) == 1 and names[0] not in found):
            if len(names) != 1:
                raise CalibrationDataError(f"{path}: a single array can only feed a single-input model (inputs: "
                                           f"{', '.join(names)})")
            return {names[0]: next(iter(found.values()))}
        missing = [n for n in names if n not in found]
        if missing:
            raise CalibrationDataError(f"{path}: no array for input '{missing[0]}' (model inputs: {', '.join(names)}; "
                                       f"file keys: {', '.join(sorted(found))})")
        wanted = {n: found[n] for n in names}
        if self.labels is not None:
            if self.labels not in found:
                raise CalibrationDataError(f"{path}: no labels array '{self.labels}' (file keys: "
                                           f"{', '.join(sorted(found))})")
            wanted[self.labels] = found[self.labels]
        return wanted

    def _check_files(self) -> None:
        total = 0
        for path in self.files:
            readers = self._readers_for(path)
            lengths = {k: len(r) for k, r in readers.items()}
            if len(set(lengths.values())) > 1:
                raise CalibrationDataError(f"{path}: arrays have different sample counts: {lengths}")
            n = next(iter(lengths.values()))
            for spec in self.specs:
                if self._check_static(path, spec, readers[spec.name]):
                    self.per_sample.add(spec.name)
                if readers[spec.name].dtype != spec.dtype:
                    self.casts[spec.name] = (readers[spec.name].dtype.name, spec.dtype.name)
            if self.labels is not None:
                _check_labels(path, self.labels, readers[self.labels])
            total += n
        if total == 0:
            raise CalibrationDataError(f"{self.description or self.files[0]}: calibration data is empty (0 samples)")
        self.num_samples = min(total, self.max_samples) if self.max_samples else total

    @staticmethod
    def _check_static(path: Path, spec: InputSpec, reader: _ArrayReader) -> bool:
        """Validate an array against its input; True when it holds one whole input per sample."""
        found_kind, want_kind = reader.dtype.kind, spec.dtype.kind
        if (found_kind in "fc") != (want_kind in "fc") or (want_kind == "b") != (found_kind == "b"):
            raise CalibrationDataError(f"{path}: input '{spec.name}' expects {spec.dtype.name}, found "
                                       f"{reader.dtype.name}")
        if spec.shape is None:
            return False
        per_sample = len(reader.shape) == len(spec.shape) + 1
        if len(reader.shape) != len(spec.shape) and not per_sample:
            raise CalibrationDataError(f"{path}: input '{spec.name}' expects rank {len(spec.shape)} "
                                       f"({spec.describe()}), found shape {tuple(reader.shape)}")
        found = tuple(reader.shape[1:]) if per_sample else tuple(reader.shape)
        wanted = spec.shape if per_sample else spec.sample_first()
        for axis, (want, got) in enumerate(zip(wanted, found, strict=True)):
            if isinstance(want, int) and want != got and (per_sample or axis > 0):
                raise CalibrationDataError(f"{path}: input '{spec.name}' expects {spec.describe()}, found shape "
                                           f"{tuple(reader.shape)} (axis {axis + per_sample})")
        return per_sample

    # ---- random source -------------------------------------------------------------------------
    def random_shape(self, spec: InputSpec, batch: int) -> tuple[int, ...]:
        """Shape of ``batch`` random samples, samples first; dynamic dimensions other than the batch axis
        must come from ``--input-shape`` (a guessed 1x1 image would make the statistics meaningless)."""
        if spec.name in self.shape_overrides:
            shape = list(self.shape_overrides[spec.name])
        elif spec.shape is None:
            raise CalibrationDataError(f"input '{spec.name}' has no known shape; give --input-shape {spec.name}=...")
        else:
            shape = list(spec.shape)
        ax = spec.batch_axis
        for i, d in enumerate(shape):
            if i != ax and not (isinstance(d, int) and d > 0):
                example = ",".join(str(x) if isinstance(x, int) and x > 0 else "?" for x in shape)
                raise CalibrationDataError(
                    f"input '{spec.name}' has dynamic dimension {i} ('{d or '?'}'): random data cannot guess it; "
                    f"give --input-shape {spec.name}={example} with realistic sizes")
        if ax is None or not shape:
            return tuple(int(d) for d in shape)
        rest = [int(d) for i, d in enumerate(shape) if i != ax]
        return (batch, *rest)

    def _random_batch(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for spec in self.specs:
            shape = self.random_shape(spec, batch)
            if spec.dtype.kind == "f":
                feeds[spec.name] = rng.random(shape, dtype=np.float64).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feeds[spec.name] = rng.random(shape) < 0.5
            else:  # ids, sample rates, lengths: any guess (zeros included) gives meaningless statistics
                raise CalibrationDataError(f"input '{spec.name}' is {spec.dtype.name}: random data cannot choose its "
                                           "values; give real calibration data (--calib FILE.npz)")
        return feeds

    # ---- iteration -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.random_samples if self.is_random else self.num_samples

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield input dicts of at most ``batch_size`` samples from samples ``[start, stop)``.

        Labels are included when asked for. For a random source, ``start`` selects a different but
        reproducible stream (held-out random samples differ from calibration ones).
        """
        if batch_size <= 0:
            raise CalibrationDataError(f"batch size must be positive, got {batch_size}")
        stop = len(self) if stop is None else min(stop, len(self))
        if self.is_random:
            rng = np.random.default_rng([self.seed, start])
            done = start
            while done < stop:
                n = min(batch_size, stop - done)
                yield self._random_batch(rng, n)
                done += n
            return
        offset = 0  # global index of the current file's first sample
        for path in self.files:
            if offset >= stop:
                return
            readers = self._readers_for(path)
            n = len(next(iter(readers.values())))
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            for first in range(lo, hi, batch_size):
                last = min(first + batch_size, hi)
                yield {name: self._validated(path, name, r.rows(first, last), first) for name, r in readers.items()}
            for r in readers.values():
                r.close()
            offset += n

    def _validated(self, path: Path, name: str, rows: np.ndarray, start: int) -> np.ndarray:
        spec = next((s for s in self.specs if s.name == name), None)
        if spec is None:  # labels
            return np.asarray(rows)
        if rows.dtype.kind == "f" and not np.all(np.isfinite(rows)):
            bad = int(np.flatnonzero(~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1))[0])
            raise CalibrationDataError(f"{path}: input '{name}' has NaN or Inf values (sample {start + bad})")
        return np.ascontiguousarray(rows, dtype=spec.dtype)


def _check_labels(path: Path, key: str, reader: _ArrayReader) -> None:
    """Labels must be class ids (integers, or integral floats) or one-hot rows, not a float input array."""
    sample = np.asarray(reader.rows(0, min(len(reader), 256)))
    reader.close()
    if sample.dtype.kind in "iub":
        return
    one_hot = sample.ndim == 2 and np.all((sample == 0) | (sample == 1)) and np.all(sample.sum(axis=1) == 1)
    if sample.dtype.kind != "f" or not (one_hot or (sample.ndim == 1 and np.all(sample == np.round(sample)))):
        raise CalibrationDataError(f"{path}: labels '{key}' are not class ids ({sample.dtype.name}, shape "
                                   f"{tuple(reader.shape)}): expected integers or one-hot rows; is it an input array?")


def parse_input_shapes(items: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """``NAME=1,3,224,224`` strings as a dict."""
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep:
                raise ValueError
            value = tuple(int(d) for d in dims.split(","))
        except ValueError as exc:
            raise OptionError(f"--input-shape '{item}': expected NAME=D1,D2,... with integers") from exc
        if name in shapes:
            raise OptionError(f"--input-shape names input '{name}' twice")
        shapes[name] = value
    return shapes


def open_calibration(spec: str | os.PathLike, specs: list[InputSpec], *, labels: str | None = None,
                     max_samples: int | None = None, shape_overrides: dict[str, tuple[int, ...]] | None = None,
                     seed: int = 0) -> CalibrationSource:
    """Open ``random``, ``random:N``, an ``.npz``/``.npy`` file or a folder of shards."""
    text = str(spec)
    if text == "random" or text.startswith("random:"):
        count = 64
        if ":" in text:
            try:
                count = int(text.split(":", 1)[1])
            except ValueError as exc:
                raise CalibrationDataError(f"--calib '{text}': expected random:N with an integer N") from exc
        if max_samples:
            count = min(count, max_samples)
        return CalibrationSource(specs, random_samples=count, shape_overrides=shape_overrides, seed=seed,
                                 description=f"random:{count}")
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not files:
            raise CalibrationDataError(f"{path}: folder holds no .npz or .npy shards")
    elif path.is_file():
        files = [path]
    else:
        raise CalibrationDataError(f"{path}: no such calibration file or folder")
    return CalibrationSource(specs, files=files, labels=labels, max_samples=max_samples,
                             shape_overrides=shape_overrides, description=str(path))
