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


def fixed_batch(graph: gs.Graph | Sequence[InputLike], per_sample: Set[str] = frozenset()) -> int | None:
    """The batch size a model with a static leading input dimension accepts, if any."""
    for t in graph_inputs(graph):
        if t.name in per_sample:
            continue
        if t.shape is not None and len(t.shape) > 0 and isinstance(t.shape[0], int) and t.shape[0] > 0:
            return int(t.shape[0])
    return None


def model_feeds(graph: gs.Graph | Sequence[InputLike], batch: dict[str, np.ndarray],
                per_sample: Set[str] = frozenset()) -> Feeds:
    """Inputs of one batch as onnxruntime wants them (labels dropped, per-sample inputs unwrapped)."""
    feeds = {}
    for t in graph_inputs(graph):
        value = batch[t.name]
        if t.name in per_sample:
            rank = len(t.shape) if t.shape is not None else 0
            value = np.asarray(value[0]) if value.ndim > rank else value.reshape(t.shape or ())
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
    dropped = 0
    for batch in source.batches(step, start, stop):
        n = len(next(iter(batch.values())))
        if fixed is not None and n != fixed:
            dropped += n
            continue
        yield model_feeds(graph, batch, per_sample), batch
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
    feeds, _ = next(iter(iterate_feeds(graph, source, batch_size, start, end)))
    have = feeds_samples(feeds)
    if have < batch_size:
        feeds = {k: np.resize(v, (batch_size,) + v.shape[1:]) for k, v in feeds.items()}
    return feeds, batch_size
