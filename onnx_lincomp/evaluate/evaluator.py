"""Score candidate models against one original on one data split, running the original only once.

An :class:`Evaluator` is built per (original model, split ``[start, stop)`` of a source, labels). It runs
the original over the split once and keeps, per batch, every output array and, with labels, the
original's per-sample correctness. Memory: the original's outputs for the whole split, e.g. 50,000
samples x 1,000 float32 logits = 200 MB, 10,000 x 10 = 0.4 MB; inputs are re-read from the source for
each candidate, never kept.

``score(candidate)`` runs the candidate over the same batches and returns a :class:`Verification`
(alias :data:`Score`). Per output: max and mean absolute error, the max error relative to the output
scale (max |original|), top-1 agreement for classifier-shaped outputs ``(N, K)``, and ``non_finite``,
the count of values where the candidate is NaN/Inf and the original is not the same non-finite value;
such an output reports ``max_abs = rel_max = inf`` (never a silent 0) and fails every tolerance. With
labels: accuracy before and after and the paired drop interval of :mod:`.paired` (gate on its upper end).

``latency(candidate, batch_sizes)`` compares the candidate with the original in interleaved rounds
(:func:`onnx_lincomp.runtime.latency.compare_latency`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibration.data_source import CalibrationSource
from ..runtime.feeds import InputLike, benchmark_feeds, feeds_samples, iterate_feeds
from ..runtime.latency import CompareOptions, LatencyComparison, compare_latency, pinned_options
from ..runtime.session import SessionOptions, SessionScope, run_session
from .paired import PairedDrop

logger = logging.getLogger(__name__)
Outputs = dict[str, np.ndarray]
BATCH_SIZE = 64  # samples per run when scoring (a captured reference is captured in the same batches)


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    mean_abs: float
    rel_max: float
    top1_agreement: float | None
    scale: float = 0.0
    non_finite: int = 0  # candidate values that are NaN/Inf where the original's are not the same

    def within(self, tol: float) -> bool:
        """Max error at most ``tol`` relative to the output scale (floored at 1 for near-zero outputs)."""
        return self.non_finite == 0 and self.max_abs <= tol * max(self.scale, 1.0)


@dataclass(frozen=True)
class Verification:
    samples: int
    outputs: tuple[OutputError, ...]
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    paired: PairedDrop | None = None  # paired accuracy drop with its interval (labels only); gate on upper_points

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def rel_max(self) -> float:
        return max((o.rel_max for o in self.outputs), default=0.0)

    @property
    def mean_abs(self) -> float:
        """Mean absolute error over every value of an output (the largest over outputs): what a dense output
        (a detection or segmentation map) loses, where one flipped pixel sets the max."""
        return max((o.mean_abs for o in self.outputs), default=0.0)

    @property
    def non_finite(self) -> int:
        return sum(o.non_finite for o in self.outputs)

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement of the classifier-shaped outputs (the lowest when several), None without one."""
        found = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(found) if found else None

    def within(self, tol: float) -> bool:
        return all(o.within(tol) for o in self.outputs)

    def as_dict(self) -> dict:
        return {"samples": self.samples, "max_abs": self.max_abs, "rel_max": self.rel_max,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "non_finite": self.non_finite, "accuracy_drop": self.paired.as_dict() if self.paired else None,
                "outputs": [o.__dict__ for o in self.outputs]}


Score = Verification


def classifier_output(names: Sequence[str], values: Outputs) -> str | None:
    """The first output shaped like class scores ``(N, K>1)``, else the first 1-D integer output."""
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


def labels_as_classes(labels: np.ndarray) -> np.ndarray:
    return labels.argmax(axis=1) if labels.ndim == 2 else labels.reshape(-1)


class _OutputStats:
    """Running error figures of one output over batches."""

    def __init__(self, name: str):
        self.name = name
        self.max_abs = self.sum_abs = self.scale = 0.0
        self.count = self.agree = self.rows = self.non_finite = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind in "fc":
            self._add_float(x.astype(np.float64), y.astype(np.float64))
        else:
            mismatch = float(np.mean(x != y)) if x.size else 0.0
            self.max_abs = max(self.max_abs, mismatch)
        if x.ndim == 2 and x.shape[1] > 1 and x.dtype.kind == "f":
            self.agree += int((x.argmax(1) == y.argmax(1)).sum())
            self.rows += x.shape[0]

    def _add_float(self, x: np.ndarray, y: np.ndarray) -> None:
        same = (x == y) | (np.isnan(x) & np.isnan(y))  # equal infinities and NaN against NaN count as equal
        diff = np.where(same, 0.0, np.abs(x - y))
        bad = ~np.isfinite(diff)
        self.non_finite += int(bad.sum())
        good = diff[~bad]
        self.max_abs = max(self.max_abs, float(good.max(initial=0.0)))
        self.sum_abs += float(good.sum())
        self.count += good.size
        self.scale = max(self.scale, float(np.abs(x[np.isfinite(x)]).max(initial=0.0)))

    def result(self) -> OutputError:
        if self.non_finite:
            return OutputError(self.name, float("inf"), self.sum_abs / max(self.count, 1), float("inf"),
                               self.agree / self.rows if self.rows else None, self.scale, self.non_finite)
        rel = self.max_abs / self.scale if self.scale > 0 else self.max_abs
        return OutputError(self.name, self.max_abs, self.sum_abs / max(self.count, 1), rel,
                           self.agree / self.rows if self.rows else None, self.scale)


def run_split(session, names: list[str], inputs: gs.Graph | Sequence[InputLike], source: CalibrationSource,
              batch_size: int, start: int, stop: int | None) -> Iterator[tuple[Outputs, dict, int]]:
    """(outputs, batch, samples) for every run of ``session`` over samples ``[start, stop)``."""
    for feeds, batch in iterate_feeds(inputs, source, batch_size, start, stop):
        values = run_session(session, names, feeds, source.description or "evaluation")
        yield dict(zip(names, values, strict=True)), batch, feeds_samples(feeds)


@dataclass(frozen=True)
class _Reference:
    """What one run of the original over the split leaves behind."""

    outputs: tuple[Outputs, ...]  # one dict per batch
    samples: int
    classifier: str | None
    truth: tuple[np.ndarray, ...] | None  # class ids per batch (labels and a classifier output only)
    correct: np.ndarray | None  # the original's per-sample correctness, concatenated


class Evaluator:
    """The original's outputs on one split, cached; :meth:`score` and :meth:`latency` judge candidates."""

    def __init__(self, original: onnx.ModelProto, inputs: gs.Graph | Sequence[InputLike], source: CalibrationSource,
                 start: int = 0, stop: int | None = None, labels: str | None = None, batch_size: int = BATCH_SIZE,
                 threads: int = 0, confidence: float = 0.95, optimize: bool = False,
                 reference: Sequence[tuple[Outputs, dict, int]] | None = None):
        """``reference``: the original's (outputs, batch labels, samples) per batch of ``batch_size`` over the
        split, captured elsewhere (the calibration pass): then the original is not run again."""
        self.original = original
        self.inputs = inputs
        self.source = source
        self.start, self.stop = start, stop
        self.labels = labels
        self.batch_size = batch_size
        self.threads = threads
        self.confidence = confidence
        self.names = [o.name for o in original.graph.output]
        # float-exact checks (optimisations off) run few samples: no packed weight copies, half the memory
        self.session_options = SessionOptions(threads=threads, optimize=optimize, prepack=optimize)
        self._ref = self._run_original(reference)

    def _batches(self, model: onnx.ModelProto | str | Path, scope: SessionScope):
        session = scope.open(model, self.session_options)
        return run_split(session, self.names, self.inputs, self.source, self.batch_size, self.start, self.stop)

    def _run_original(self, reference: Sequence[tuple[Outputs, dict, int]] | None) -> _Reference:
        outputs, truth, samples, cls = [], [], 0, None
        with SessionScope(prefix="lincomp-eval-") as scope:
            for values, batch, n in (reference if reference is not None else self._batches(self.original, scope)):
                cls = cls or classifier_output(self.names, values)
                outputs.append(values)
                if self.labels is not None and cls is not None and self.labels in batch:
                    truth.append(labels_as_classes(np.asarray(batch[self.labels])))
                samples += n
        if not truth or len(truth) != len(outputs):
            return _Reference(tuple(outputs), samples, cls, None, None)
        correct = np.concatenate([predictions(o[cls]) == t for o, t in zip(outputs, truth, strict=True)])
        return _Reference(tuple(outputs), samples, cls, tuple(truth), correct)

    @property
    def samples(self) -> int:
        return self._ref.samples

    @property
    def accuracy(self) -> float | None:
        """The original's accuracy on the split (None without labels or a classifier output)."""
        c = self._ref.correct
        return float(c.mean()) if c is not None and c.size else None

    def score(self, candidate: onnx.ModelProto | str | Path) -> Verification:
        """Error figures, agreement and (with labels) the paired accuracy drop of ``candidate``."""
        stats = [_OutputStats(n) for n in self.names]
        ref, correct = self._ref, []
        with SessionScope(prefix="lincomp-score-") as scope:
            for k, (values, _, _) in enumerate(self._batches(candidate, scope)):
                if k >= len(ref.outputs):
                    break
                for s in stats:
                    s.add(ref.outputs[k][s.name], values[s.name])
                if ref.truth is not None:
                    correct.append(predictions(values[ref.classifier]) == ref.truth[k])
        outputs = tuple(s.result() for s in stats)
        if ref.correct is None or not correct:
            return Verification(ref.samples, outputs)
        paired = PairedDrop.of(ref.correct, np.concatenate(correct), self.confidence)
        before, after = paired.accuracy_before.estimate, paired.accuracy_after.estimate
        return Verification(ref.samples, outputs, before, after, paired)

    def latency(self, candidate: onnx.ModelProto | str | Path, batch_sizes: Sequence[int] = (1,),
                options: CompareOptions | None = None) -> tuple[LatencyComparison, ...]:
        """Interleaved latency comparison (original first, candidate second) at each batch size.

        A model with a fixed batch dimension or per-sample inputs is timed once, at the batch it takes.
        """
        options = options or CompareOptions(threads=max(self.threads, 1))
        results, seen = [], set()
        with SessionScope(prefix="lincomp-lat-") as scope:
            sessions = [scope.open(m, pinned_options(options.threads)) for m in (self.original, candidate)]
            for bs in batch_sizes:
                feeds, used = benchmark_feeds(self.inputs, self.source, bs, self.start, self.stop)
                if used in seen:
                    continue
                seen.add(used)
                results.append(compare_latency(sessions, feeds, replace(options, batch_size=used)))
        return tuple(results)


def model_correct(model: onnx.ModelProto, inputs: gs.Graph | Sequence[InputLike], source: CalibrationSource,
                  labels: str, start: int = 0, stop: int | None = None, batch_size: int = 64,
                  threads: int = 0) -> np.ndarray | None:
    """Per sample of ``[start, stop)``, whether ``model``'s top-1 is the label (None when it has no
    classifier-shaped output): what a paired comparison of two models needs."""
    names = [o.name for o in model.graph.output]
    correct = []
    with SessionScope(prefix="lincomp-acc-") as scope:
        session = scope.open(model, SessionOptions(threads=threads))
        cls = None
        for values, batch, _ in run_split(session, names, inputs, source, batch_size, start, stop):
            cls = cls or classifier_output(names, values)
            if cls is None:
                return None
            correct.append(predictions(values[cls]) == labels_as_classes(np.asarray(batch[labels])))
    return np.concatenate(correct) if correct else np.zeros(0, dtype=bool)


def model_accuracy(model: onnx.ModelProto, inputs: gs.Graph | Sequence[InputLike], source: CalibrationSource,
                   labels: str, start: int = 0, stop: int | None = None, batch_size: int = 64) -> float | None:
    """Accuracy of one model on ``[start, stop)`` (None when it has no classifier-shaped output)."""
    correct = model_correct(model, inputs, source, labels, start, stop, batch_size)
    return float(correct.mean()) if correct is not None and correct.size else None
