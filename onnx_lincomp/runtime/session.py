"""The one place that creates onnxruntime sessions and turns onnxruntime's errors into ours.

``open_session`` takes a ``ModelProto`` or a path. Models whose tensors approach protobuf's 2 GiB limit
are written to a work folder with external data and handed over by path
(:func:`onnx_lincomp.model_io.session_source`); that folder must outlive the session, which
:class:`SessionScope` (a context manager owning a temporary folder, one subfolder per session)
guarantees. Without a work folder a temporary one is created and tied to the session object.

Every onnxruntime exception becomes an :mod:`onnx_lincomp.errors` type with a one-line message: the
first line of onnxruntime's text without its ``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :`` prefix,
plus any later detail line such as ``index: 1 Got: 5 Expected: 4``.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import CalibrationDataError, InvalidModelError, LincompError, OptionError, UnsupportedModelError
from ..model_io import session_source

_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_DETAIL = re.compile(r"\b(Got|Expected|index|Actual|expected)\b")


@dataclass(frozen=True)
class SessionOptions:
    """How a session is built.

    ``threads``: intra-op threads (0: onnxruntime's default, one per core). ``inter_threads``: inter-op
    threads (0: default). ``spinning``: whether idle pool threads spin (off frees the core for other work
    on a loaded machine). ``optimize``: onnxruntime graph optimisations (off for faithful numerics).
    ``log_level``: onnxruntime severity (0 verbose ... 4 fatal). ``prepack``: let kernels keep a packed
    copy of their weights (faster runs; off halves the session's memory for float-exact checks).
    """

    threads: int = 0
    inter_threads: int = 0
    spinning: bool = True
    optimize: bool = True
    log_level: int = 3
    prepack: bool = True

    def __post_init__(self):
        if self.threads < 0 or self.inter_threads < 0:
            raise OptionError(f"thread counts must be non-negative, got {self.threads}, {self.inter_threads}")
        if not 0 <= self.log_level <= 4:
            raise OptionError(f"log_level must be in 0..4, got {self.log_level}")

    def to_ort(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.log_severity_level = self.log_level
        if self.threads:
            so.intra_op_num_threads = self.threads
        if self.inter_threads:
            so.inter_op_num_threads = self.inter_threads
        if not self.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if not self.optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if not self.prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        return so


def ort_message(exc: BaseException) -> str:
    """onnxruntime's message on one line: first line (prefix dropped) plus 'Got/Expected' detail lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    first = _PREFIX.sub("", lines[0])
    details = [line for line in lines[1:] if _DETAIL.search(line)]
    return "; ".join([first] + details)


def load_error(exc: BaseException) -> LincompError:
    """The error type for a model onnxruntime refuses to load."""
    text = ort_message(exc)
    kind = type(exc).__name__
    if kind == "NotImplemented" or "not a registered function/op" in text or "not implemented" in text.lower():
        return UnsupportedModelError(f"onnxruntime cannot run the model: {text}")
    return InvalidModelError(f"onnxruntime cannot load the model: {text}")


def open_session(model: onnx.ModelProto | str | Path, workdir: str | Path | None = None,
                 options: SessionOptions = SessionOptions()) -> ort.InferenceSession:
    """A CPU session for ``model``; big protos go through a file in ``workdir`` (kept alive by the caller)."""
    holder = None
    so = options.to_ort()
    if isinstance(model, onnx.ModelProto):
        if workdir is None:
            holder = tempfile.TemporaryDirectory(prefix="lincomp-session-")
            workdir = holder.name
        source: str | bytes
        source, folder = session_source(model, str(workdir))
        if folder is not None:  # weights referenced in the input's data files: onnxruntime maps them from there
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    else:
        source = str(model)
    try:
        session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (pybind) exception types
        raise load_error(exc) from exc
    if holder is not None and not isinstance(source, bytes):
        session._lincomp_workdir = holder  # the external-data file lives as long as the session
    elif holder is not None:
        holder.cleanup()
    return session


def run_session(session: ort.InferenceSession, names: list[str] | None, feeds: dict[str, np.ndarray],
                what: str = "onnxruntime") -> list[np.ndarray]:
    """``session.run`` with onnxruntime's errors as ours: bad feeds are data errors, the rest model errors."""
    try:
        return session.run(names, feeds)
    except Exception as exc:  # onnxruntime raises its own (pybind) exception types
        text = ort_message(exc)
        if type(exc).__name__ == "InvalidArgument" or isinstance(exc, ValueError):
            raise CalibrationDataError(f"{what}: onnxruntime rejected the inputs: {text}") from exc
        raise InvalidModelError(f"{what}: onnxruntime failed while running the model: {text}") from exc


class SessionScope:
    """Context manager owning a temporary folder; each :meth:`open` gets its own subfolder in it."""

    def __init__(self, prefix: str = "lincomp-"):
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self._count = 0

    @property
    def path(self) -> Path:
        return Path(self._dir.name)

    def open(self, model: onnx.ModelProto | str | Path,
             options: SessionOptions = SessionOptions()) -> ort.InferenceSession:
        folder = self.path / f"s{self._count}"
        self._count += 1
        folder.mkdir()
        return open_session(model, folder, options)

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> SessionScope:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
