"""Compare an optimised model with the original in onnxruntime on the same inputs.

Per output: max and mean absolute error, the max error relative to the output scale (max |original|),
top-1 agreement for classifier-shaped outputs ``(N, K)``, and accuracy against labels when given.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .calibration.collector import iterate_feeds
from .calibration.data_source import CalibrationSource
from .latency import make_session


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    mean_abs: float
    rel_max: float
    top1_agreement: float | None
    scale: float = 0.0

    def within(self, tol: float) -> bool:
        """Max error at most ``tol`` relative to the output scale (floored at 1 for near-zero outputs)."""
        return self.max_abs <= tol * max(self.scale, 1.0)


@dataclass(frozen=True)
class Verification:
    samples: int
    outputs: tuple[OutputError, ...]
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def rel_max(self) -> float:
        return max((o.rel_max for o in self.outputs), default=0.0)

    def within(self, tol: float) -> bool:
        return all(o.within(tol) for o in self.outputs)

    def as_dict(self) -> dict:
        return {"samples": self.samples, "max_abs": self.max_abs, "rel_max": self.rel_max,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "outputs": [o.__dict__ for o in self.outputs]}


def _classifier_output(names: list[str], values: dict[str, np.ndarray]) -> str | None:
    for n in names:
        v = values[n]
        if v.dtype.kind == "f" and v.ndim == 2 and v.shape[1] > 1:
            return n
    for n in names:
        v = values[n]
        if v.dtype.kind in "iu" and v.ndim == 1:
            return n
    return None


def predictions(values: np.ndarray) -> np.ndarray:
    return values if values.ndim == 1 else values.argmax(axis=1)


def _labels_as_classes(labels: np.ndarray) -> np.ndarray:
    return labels.argmax(axis=1) if labels.ndim == 2 else labels.reshape(-1)


class _Accumulator:
    def __init__(self, names):
        self.names = names
        self.max_abs = dict.fromkeys(names, 0.0)
        self.sum_abs = dict.fromkeys(names, 0.0)
        self.count = dict.fromkeys(names, 0)
        self.scale = dict.fromkeys(names, 0.0)
        self.agree = dict.fromkeys(names, 0)
        self.rows = dict.fromkeys(names, 0)
        self.correct = [0, 0]
        self.labelled = 0
        self.samples = 0

    def add(self, a: dict, b: dict, labels: np.ndarray | None, cls: str | None) -> None:
        for n in self.names:
            x, y = np.asarray(a[n]), np.asarray(b[n])
            if x.dtype.kind in "fc":
                diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
                self.max_abs[n] = max(self.max_abs[n], float(diff.max(initial=0.0)))
                self.sum_abs[n] += float(diff.sum())
                self.count[n] += diff.size
                self.scale[n] = max(self.scale[n], float(np.abs(x).max(initial=0.0)))
            else:
                mismatch = float(np.mean(x != y)) if x.size else 0.0
                self.max_abs[n] = max(self.max_abs[n], mismatch)
            if x.ndim == 2 and x.shape[1] > 1 and x.dtype.kind == "f":
                self.agree[n] += int((x.argmax(1) == y.argmax(1)).sum())
                self.rows[n] += x.shape[0]
        if labels is not None and cls is not None:
            truth = _labels_as_classes(labels)
            self.correct[0] += int((predictions(a[cls]) == truth).sum())
            self.correct[1] += int((predictions(b[cls]) == truth).sum())
            self.labelled += len(truth)

    def result(self) -> Verification:
        outs = tuple(OutputError(n, self.max_abs[n], self.sum_abs[n] / max(self.count[n], 1),
                                 self.max_abs[n] / self.scale[n] if self.scale[n] > 0 else self.max_abs[n],
                                 self.agree[n] / self.rows[n] if self.rows[n] else None, self.scale[n]) for n in self.names)
        acc = (self.correct[0] / self.labelled, self.correct[1] / self.labelled) if self.labelled else (None, None)
        return Verification(self.samples, outs, *acc)


def compare_models(original: onnx.ModelProto, optimized: onnx.ModelProto, graph: gs.Graph, source: CalibrationSource,
                   start: int = 0, stop: int | None = None, batch_size: int = 64, labels: str | None = None,
                   threads: int = 0) -> Verification:
    """Run samples ``[start, stop)`` through both models; ``graph`` gives the input signature."""
    names = [o.name for o in original.graph.output]
    acc = _Accumulator(names)
    with tempfile.TemporaryDirectory(prefix="lincomp-verify-") as workdir:
        Path(workdir, "a").mkdir()
        Path(workdir, "b").mkdir()  # big models are handed over as files: one folder each
        s1 = make_session(original, str(Path(workdir, "a")), threads, optimize=False)
        s2 = make_session(optimized, str(Path(workdir, "b")), threads, optimize=False)
        cls = None
        for feeds, batch in iterate_feeds(graph, source, batch_size, start, stop):
            a = dict(zip(names, s1.run(names, feeds)))
            b = dict(zip(names, s2.run(names, feeds)))
            cls = cls or _classifier_output(names, a)
            acc.add(a, b, batch.get(labels) if labels else None, cls)
            acc.samples += len(next(iter(feeds.values()))) if feeds else 1
    return acc.result()


def model_accuracy(model: onnx.ModelProto, graph: gs.Graph, source: CalibrationSource, labels: str,
                   start: int = 0, stop: int | None = None, batch_size: int = 64) -> float | None:
    names = [o.name for o in model.graph.output]
    correct = total = 0
    with tempfile.TemporaryDirectory(prefix="lincomp-acc-") as workdir:
        sess = make_session(model, workdir)
        cls = None
        for feeds, batch in iterate_feeds(graph, source, batch_size, start, stop):
            out = dict(zip(names, sess.run(names, feeds)))
            cls = cls or _classifier_output(names, out)
            if cls is None:
                return None
            truth = _labels_as_classes(batch[labels])
            correct += int((predictions(out[cls]) == truth).sum())
            total += len(truth)
    return correct / total if total else None
