"""Intermediate tensors on the calibration data, for the data-aware (lossy) passes.

A pass that refits weights or scores channels on data asks :class:`CalibrationData` for the values of
some tensors of a graph (the layer inputs it reads, the layer outputs it must match) and folds each
batch into small accumulators (:mod:`.moments`): only ``(features x features)`` second moments are
kept, so memory does not grow with the number of samples.

The graph is exported as it stands (a pass may have changed it already) with the requested tensors as
extra outputs, and run with onnxruntime's graph optimisations off, so that the values are those of the
graph's own tensors. Only the calibration part of the data is read (never the held-out part), at most
``max_samples`` of it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ..errors import CalibrationDataError
from ..model_io import ModelContext, to_model_proto
from ..runtime.feeds import BatchSource, feeds_samples, iterate_feeds, model_feeds
from ..runtime.session import SessionOptions, SessionScope, ort_message

Progress = Callable[[int, int], None]


def sample_shapes(graph: gs.Graph, source: BatchSource) -> dict[str, tuple[int, ...]]:
    """Each input of ``graph`` as it is fed one sample of ``source`` (batch axis where the model has it,
    per-sample inputs whole): the sizes a model with dynamic sides runs at, for counting its MACs."""
    batch = next(iter(source.batches(1, 0, 1)), None)
    if batch is None:
        return {}
    feeds = model_feeds(graph, batch, source.per_sample)
    return {name: tuple(int(d) for d in np.shape(a)) for name, a in feeds.items()}


@dataclass(frozen=True, eq=False)
class CalibrationData:
    """The calibration samples a data-aware pass may read, and how to run a graph over them."""

    source: BatchSource
    ctx: ModelContext
    stop: int  # samples [0, stop) are the calibration part
    batch_size: int = 32
    threads: int = 0
    max_samples: int = 2048  # cap on the samples a pass reads (second moments converge long before)
    description: str = "calibration data"

    @property
    def samples(self) -> int:
        return min(self.stop, self.max_samples, len(self.source))

    def input_shapes(self, graph: gs.Graph) -> dict[str, tuple[int, ...]]:
        """Each input of ``graph`` as it is fed one calibration sample: see :func:`sample_shapes`."""
        return sample_shapes(graph, self.source)

    def with_samples(self, n: int) -> CalibrationData:
        return CalibrationData(self.source, self.ctx, self.stop, self.batch_size, self.threads, max(1, n),
                               self.description)

    def stream(self, graph: gs.Graph | onnx.ModelProto, tensors: Sequence[str],
               progress: Progress | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Per batch, the values of ``tensors`` (tensor names of ``graph``) on the calibration samples."""
        model = graph if isinstance(graph, onnx.ModelProto) else to_model_proto(graph, self.ctx, infer_shapes=False)
        names = list(dict.fromkeys(tensors))
        model = with_outputs(model, names)
        inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        specs = [_InputView(i) for i in inputs]
        done, total = 0, self.samples
        with SessionScope(prefix="lincomp-act-") as scope:
            sess = scope.open(model, SessionOptions(threads=self.threads, optimize=False))
            del model
            for feeds, _ in iterate_feeds(specs, self.source, self.batch_size, 0, total):
                try:
                    values = sess.run(names, feeds)
                except Exception as exc:  # onnxruntime's own (pybind) errors
                    raise CalibrationDataError(f"{self.description}: onnxruntime rejected a calibration batch: "
                                               f"{ort_message(exc)}") from exc
                done += feeds_samples(feeds)
                if progress is not None:
                    progress(done, total)
                yield dict(zip(names, values, strict=True))


@dataclass(frozen=True)
class _InputView:
    """A graph input as :func:`~onnx_lincomp.runtime.feeds.iterate_feeds` reads it (name and shape)."""

    name: str
    shape: tuple | None

    def __init__(self, vi: onnx.ValueInfoProto):
        t = vi.type.tensor_type
        shape = None if not t.HasField("shape") else tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
        object.__setattr__(self, "name", vi.name)
        object.__setattr__(self, "shape", shape)


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` (changed in place: callers pass their own export) with ``names`` listed as outputs."""
    existing = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    for name in names:
        if name not in produced:
            raise CalibrationDataError(f"tensor '{name}' is not computed by the graph")
        if name not in existing:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
            existing.add(name)
    return model


__all__ = ["CalibrationData", "with_outputs"]
