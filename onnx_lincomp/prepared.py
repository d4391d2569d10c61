"""A model ready to optimise: loaded, canonical, its original kept, its data split into a calibration
part (statistics) and a held-out part (verification), and the evaluators that judge candidates on them.

Verification: the held-out (and ``all``) splits run with onnxruntime's graph optimisations, as the model
is deployed. The held-out reference is captured by the calibration pass itself (the canonical model's
outputs, in the same session as the statistics), so the original model is not run a second time; the
calibration part is checked float-exactly (optimisations off) against the *original* model on its first
8 samples: a bug check (canonicalisation and the rewrites are exact there by construction).

The split: the first ``1 - verify_split`` of the samples calibrate, the rest are held out. Random data
is verified on fresh random samples. ``gate_on="all"`` judges the accuracy budget on every sample
(calibration and held-out) while the statistics still come from the calibration part only: more
samples for the paired bound, at the price of judging partly on data the statistics saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import mapped_data
from .calibration import CollectOptions, StatsSet, input_specs, open_calibration
from .calibration.activations import CalibrationData, sample_shapes
from .calibration.collector import Capture, Progress, collect_with_capture
from .calibration.data_source import CalibrationSource
from .canonicalize import CanonicalizeReport, canonicalize
from .errors import InvalidModelError, OptionError
from .evaluate.evaluator import BATCH_SIZE as EVAL_BATCH_SIZE
from .evaluate.evaluator import Evaluator
from .model_io import LoadedModel, load_model, model_from_proto, to_model_proto
from .recipe import Recipe
from .runtime.feeds import batch_axis

GateOn = Literal["heldout", "all"]
CALIBRATION_CHECK_SAMPLES = 8  # the rewrite is exact on the calibration part by construction: a bug check


@dataclass
class Prepared:
    """A loaded model in canonical form, its original proto and the calibration split."""

    original: onnx.ModelProto
    loaded: LoadedModel
    canon: CanonicalizeReport
    source: CalibrationSource | None
    n_calib: int
    source_name: str = ""
    labels: str | None = None
    batch_size: int = EVAL_BATCH_SIZE  # samples per verification run (the user's --batch-size in optimize)
    _evaluators: dict = field(default_factory=dict, repr=False)
    _sample_shapes: dict | None = field(default=None, repr=False)  # one calibration sample's input shapes, read once

    @property
    def heldout_count(self) -> int:
        """Samples the held-out split will verify on (fresh random samples for random data)."""
        if self.source is None:
            return 0
        return len(self.source) if self.source.is_random else len(self.source) - self.n_calib

    def figure_shapes(self, given: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The input shapes to count MACs at: ``given`` (``--input-shape``), and, for the inputs it leaves out that
        have a dynamic side, their shape at one calibration sample (a model with dynamic sides has MACs only at some
        size)."""
        if self.source is None or not any(t.name not in given and _dynamic_side(t.shape)
                                          for t in self.loaded.graph.inputs):
            return dict(given)
        if self._sample_shapes is None:  # every caller (before, after, candidates) counts at the same size
            self._sample_shapes = sample_shapes(self.loaded.graph, self.source)
        return {**self._sample_shapes, **given}

    def gate_count(self, gate_on: GateOn) -> int:
        if self.source is None or self.source.is_random:
            return self.heldout_count
        return len(self.source) if gate_on == "all" else self.heldout_count

    def evaluator(self, split: Literal["calibration", "calibration-check", "heldout", "all"],
                  threads: int = 0) -> Evaluator | None:
        """The evaluator of one split (built once: the original runs once per split)."""
        if split not in self._evaluators:
            self._evaluators[split] = self._make_evaluator(split, threads)
        return self._evaluators[split]

    def _make_evaluator(self, split: str, threads: int) -> Evaluator | None:
        g, s = self.loaded.graph, self.source
        if s is None:
            return None
        labels = None if s.is_random else self.labels
        if split in ("calibration", "calibration-check"):  # graph optimisations off: float-exact comparisons
            stop = self.n_calib if split == "calibration" else min(self.n_calib, CALIBRATION_CHECK_SAMPLES)
            return Evaluator(self.original, g, s, 0, stop, labels, self.batch_size, threads)
        # the splits that gate run with onnxruntime's graph optimisations, as deployed (and about twice as fast)
        if split == "all" and not s.is_random:
            return Evaluator(self.original, g, s, 0, None, labels, self.batch_size, threads, optimize=True)
        held = self.heldout_split()
        if held is None:
            return None
        return Evaluator(self.original, g, held.source, held.start, held.stop, held.labels, held.batch_size,
                         threads, optimize=True)

    def heldout_split(self) -> Capture | None:
        """The held-out samples (fresh random samples for random data) in the evaluator's batches."""
        s = self.source
        if s is None:
            return None
        if s.is_random:
            fresh = CalibrationSource(s.specs, random_samples=2 * len(s), shape_overrides=s.shape_overrides,
                                      seed=s.seed, description=s.description)
            return Capture(fresh, len(s), 2 * len(s), self.batch_size)
        if self.n_calib >= len(s):
            return None
        return Capture(s, self.n_calib, None, self.batch_size, self.labels)


def _dynamic_side(shape) -> bool:
    """Whether an input has a dynamic dimension besides its batch axis (:func:`~.runtime.feeds.batch_axis`)."""
    if shape is None:
        return True
    axis = batch_axis(shape)
    return any(i != axis and not (isinstance(d, (int, np.integer)) and d > 0) for i, d in enumerate(shape))


def prepare(model: str | Path | onnx.ModelProto, calib: str | Path | None, recipe: Recipe,
            labels: str | None = None, batch_size: int = EVAL_BATCH_SIZE) -> Prepared:
    """Load and canonicalise ``model`` and open ``calib`` split as the recipe's calibration settings say;
    ``batch_size``: samples per verification run."""
    if isinstance(model, onnx.ModelProto):
        loaded, name = model_from_proto(model), "<in-memory model>"
    else:
        loaded, name = load_model(model), str(model)
    check_finite_weights(loaded.graph, name)
    mapped_data.release(loaded.graph)  # the check read every mapped weight: let those pages go
    original = loaded.proto if loaded.proto is not None else to_model_proto(loaded.graph, loaded.ctx)
    canon = canonicalize(loaded.graph, ctx=loaded.ctx)
    cal = recipe.calibration
    if calib is None:
        return Prepared(original, loaded, canon, None, 0, name, labels, batch_size)
    source = open_calibration(calib, input_specs(loaded.graph), labels=labels, max_samples=cal.max_samples,
                              shape_overrides=dict(cal.input_shapes))
    n = len(source)
    split = 0.0 if recipe.exact is not None else cal.verify_split
    n_calib = n if source.is_random or split == 0 else max(1, int(round(n * (1 - split))))
    return Prepared(original, loaded, canon, source, n_calib, name, labels, batch_size)


def check_finite_weights(graph: gs.Graph, name: str) -> None:
    """NaN/Inf in a weight makes every comparison meaningless (a NaN error reads as 0): an invalid model."""
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and t.values.dtype.kind == "f" and not np.all(np.isfinite(t.values)):
            raise InvalidModelError(f"{name}: weight '{t.name}' holds NaN or Inf values")


def calibrate(prep: Prepared, batch_size: int = 16, threads: int = 0, progress: Progress | None = None,
              capture: bool = True) -> StatsSet:
    """Statistics of the calibration part (never the held-out part). With ``capture`` the same session
    also runs the held-out part and keeps the model's outputs there as the held-out evaluator's reference
    (one pass of the model over all samples instead of two)."""
    if prep.source is None:
        raise OptionError("give --calib DATA (or --stats FILE)")
    same_outputs = [o.name for o in prep.original.graph.output] == [t.name for t in prep.loaded.graph.outputs]
    held = prep.heldout_split() if capture and same_outputs and "heldout" not in prep._evaluators else None
    stats, runs = collect_with_capture(prep.loaded.graph, prep.loaded.ctx, prep.source,
                                       CollectOptions(batch_size=batch_size, threads=threads), progress=progress,
                                       stop=prep.n_calib, capture=held)
    if held is not None and runs:
        prep._evaluators["heldout"] = Evaluator(prep.original, prep.loaded.graph, held.source, held.start,
                                                held.stop, held.labels, held.batch_size, threads, optimize=True,
                                                reference=runs)
    return stats


def calibration_data(prep: Prepared, batch_size: int = 32, threads: int = 0) -> CalibrationData | None:
    """The calibration part as data-aware passes read it (never the held-out part)."""
    if prep.source is None:
        return None
    return CalibrationData(prep.source, prep.loaded.ctx, prep.n_calib, batch_size, threads,
                           description=prep.source.description)


def pass_check(prep: Prepared):
    """A pipeline check: the graph after a pass against the original on the first calibration samples (the
    calibration-check split, so the original runs there once for these checks and the final one)."""
    evaluator = prep.evaluator("calibration-check")

    def check(graph, name: str) -> str:
        v = evaluator.score(to_model_proto(graph, prep.loaded.ctx))
        return (f"after {name}: max abs error {v.max_abs:.3g} (relative {v.rel_max:.3g}) on {v.samples} "
                "calibration samples")
    return check
