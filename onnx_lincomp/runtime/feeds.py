"""Batches of a :class:`CalibrationSource` as onnxruntime feeds.

A model with a static leading input dimension is fed exactly that many samples a run; inputs whose
arrays hold one whole model input per sample (``source.per_sample``) are fed one sample a run; labels
travel with each batch but are never fed. ``graph`` is a graphsurgeon graph or any sequence of objects
with ``name`` and ``shape`` (for example :class:`~onnx_lincomp.calibration.data_source.InputSpec`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence, Set
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import CalibrationDataError

logger = logging.getLogger(__name__)
Feeds = dict[str, np.ndarray]


class BatchSource(Protocol):
    """What feeding needs of a data source (:class:`~onnx_lincomp.calibration.data_source.CalibrationSource`)."""

    per_sample: Set[str]

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]: ...


class InputLike(Protocol):
    name: str
    shape: Sequence | None


def graph_inputs(graph: gs.Graph | Sequence[InputLike]) -> Sequence[InputLike]:
    """The model inputs of a graph, or the given input descriptions as they are."""
    return graph.inputs if isinstance(graph, gs.Graph) else graph


def batch_axis(shape: Sequence | None) -> int | None:
    """The axis of a model input that carries samples: its first dynamic dimension (a recurrent state
    ``[2, batch, 128]`` has it on axis 1); None when every dimension is static (the model takes a fixed
    batch on axis 0). Data arrays always hold samples on axis 0 and are moved there when fed."""
    if shape is None:
        return 0
    return next((i for i, d in enumerate(shape) if not (isinstance(d, (int, np.integer)) and d > 0)), None)


def fixed_batch(graph: gs.Graph | Sequence[InputLike], per_sample: Set[str] = frozenset()) -> int | None:
    """The batch size a model whose inputs are all static accepts (their leading dimension), if any."""
    fixed = None
    for t in graph_inputs(graph):
        if t.name in per_sample or t.shape is None or len(t.shape) == 0:
            continue
        if batch_axis(t.shape) is not None:
            return None  # a dynamic batch axis: any batch size
        fixed = fixed if fixed is not None else int(t.shape[0])
    return fixed


def model_feeds(graph: gs.Graph | Sequence[InputLike], batch: dict[str, np.ndarray],
                per_sample: Set[str] = frozenset()) -> Feeds:
    """Inputs of one batch as onnxruntime wants them (labels dropped, per-sample inputs unwrapped)."""
    feeds = {}
    for t in graph_inputs(graph):
        value = batch[t.name]
        if t.name in per_sample:
            rank = len(t.shape) if t.shape is not None else 0
            value = np.asarray(value[0]) if value.ndim > rank else value.reshape(t.shape or ())
        elif batch_axis(t.shape) not in (None, 0):
            value = np.ascontiguousarray(np.moveaxis(value, 0, batch_axis(t.shape)))
        feeds[t.name] = value
    return feeds


def iterate_feeds(graph: gs.Graph | Sequence[InputLike], source: BatchSource, batch_size: int, start: int = 0,
                  stop: int | None = None) -> Iterator[tuple[Feeds, dict[str, np.ndarray]]]:
    """(feeds, batch) pairs; models with a fixed batch dimension are fed exactly that many samples,
    and inputs that hold one whole model input per sample are fed one sample a run."""
    per_sample = source.per_sample
    fixed = fixed_batch(graph, per_sample)
    step = fixed if fixed is not None else batch_size
    if per_sample:
        step = 1
    dropped = used = 0
    for batch in source.batches(step, start, stop):
        n = len(next(iter(batch.values())))
        if fixed is not None and n != fixed:
            dropped += n
            continue
        used += n
        yield model_feeds(graph, batch, per_sample), batch
    if dropped and not used:
        raise CalibrationDataError(f"no usable samples: the model takes a fixed batch of {fixed} and the data "
                                   f"holds {dropped} (give at least {fixed} samples)")
    if dropped:
        logger.warning("dropped %d trailing samples that do not fill the model's fixed batch of %d", dropped, fixed)


def feeds_samples(feeds: Feeds) -> int:
    """Samples in one run's feeds (1 for models fed one whole input a run)."""
    return len(next(iter(feeds.values()))) if feeds else 1


def benchmark_feeds(graph: gs.Graph | Sequence[InputLike], source: BatchSource, batch_size: int,
                    start: int = 0, stop: int | None = None) -> tuple[Feeds, int]:
    """One run's feeds of ``batch_size`` samples for timing, and the batch actually used.

    Models with a fixed batch or per-sample inputs get the one batch they take; a split with fewer
    than ``batch_size`` samples is repeated to fill the batch.
    """
    if source.per_sample or fixed_batch(graph, source.per_sample) is not None:
        feeds, _ = next(iter(iterate_feeds(graph, source, batch_size, start, stop)))
        return feeds, 1 if source.per_sample else feeds_samples(feeds)
    end = start + batch_size if stop is None else min(stop, start + batch_size)
    feeds, batch = next(iter(iterate_feeds(graph, source, batch_size, start, end)))
    if feeds_samples(feeds) < batch_size:  # repeat samples (on axis 0 of the data) to fill the batch
        names = {t.name for t in graph_inputs(graph)}
        filled = {k: np.resize(v, (batch_size,) + v.shape[1:]) for k, v in batch.items() if k in names}
        feeds = model_feeds(graph, filled, source.per_sample)
    return feeds, batch_size
