"""The per-layer quantization scan: each layer quantized alone (the rest float) at each bit width, scored
against the original by an :class:`~.evaluator.Evaluator`. ``bits`` scans weight sharing and integer
rounding with it, and ``quantize-int8``'s automatic exclusion its one-layer INT8 models; it knows nothing of
either, only the :class:`LayerQuantizer` it is given.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import onnx

from ..errors import OptionError
from ..linear_layer import LinearLayer
from .evaluator import Evaluator, Verification

Progress = Callable[[int, int], None]
COLUMNS = ("layer", "kind", "weights", "bits", "float_bytes", "shared_bytes", "accuracy", "drop_points",
           "drop_low", "drop_high", "agreement", "max_abs", "rel_max", "mean_abs")


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    weights: int
    float_bytes: int


@dataclass(frozen=True)
class BitsRow:
    layer: str
    kind: str
    weights: int
    bits: int
    float_bytes: int
    shared_bytes: int
    accuracy: float | None
    drop_points: float | None
    drop_low: float | None
    drop_high: float | None
    agreement: float | None
    max_abs: float
    rel_max: float
    mean_abs: float = 0.0  # mean absolute output error (the largest over outputs)

    def as_dict(self) -> dict:
        return {c: getattr(self, c) for c in COLUMNS}


@dataclass(frozen=True)
class BitsScan:
    model: str
    samples: int
    accuracy: float | None  # the original's on the held-out split
    layers: tuple[LayerInfo, ...]
    rows: tuple[BitsRow, ...]
    skipped: Mapping[str, str]  # layer -> why it is not scanned
    seconds: float
    method: str = "kmeans"

    def curve(self, layer: str) -> list[BitsRow]:
        return sorted((r for r in self.rows if r.layer == layer), key=lambda r: -r.bits)

    def as_dict(self) -> dict:
        return {"model": self.model, "heldout_samples": self.samples, "accuracy": self.accuracy,
                "layers": [info.__dict__ for info in self.layers], "rows": [r.as_dict() for r in self.rows],
                "skipped": dict(self.skipped), "seconds": self.seconds, "method": self.method}


class LayerQuantizer(Protocol):
    """What :func:`scan_layers` needs from a way of quantizing layers: the candidate layers, why a layer cannot
    take a width, its stored bytes at a width, and a model with the given layers quantized (the rest float)."""

    layers: list[LinearLayer]

    def problem(self, layer: LinearLayer, bits: int) -> str | None: ...

    def stored_bytes(self, layer: LinearLayer, bits: int) -> int: ...

    def build(self, bits: Mapping[str, int]) -> onnx.ModelProto: ...


def _row(layer: LinearLayer, bits: int, stored: int, v: Verification) -> BitsRow:
    p = v.paired
    agree = next((o.top1_agreement for o in v.outputs if o.top1_agreement is not None), None)
    return BitsRow(layer.name, layer.kind, int(layer.size), bits,
                   int(layer.nodes[0].inputs[1].values.nbytes), stored,
                   v.accuracy_after, p.drop_points if p else None, p.lower_points if p else None,
                   p.upper_points if p else None, agree, v.max_abs, v.rel_max, v.mean_abs)


def scan_layers(evaluator: Evaluator, quantizer: LayerQuantizer, widths: tuple[int, ...], model: str,
                progress: Progress | None = None, method: str = "kmeans") -> BitsScan:
    """Each layer of ``quantizer`` alone at each width (the rest float), scored by ``evaluator``."""
    start = time.perf_counter()
    layers, skipped = [], {}
    for layer in quantizer.layers:
        problem = quantizer.problem(layer, min(widths))
        if problem:
            skipped[layer.name] = problem
        else:
            layers.append(layer)
    if not layers:
        raise OptionError("no layer can be quantized: " + ("; ".join(f"{k}: {v}" for k, v in skipped.items())
                                                           or "the model has no Gemm/MatMul/Conv weights"))
    tasks = [(layer, b) for layer in layers for b in widths if not quantizer.problem(layer, b)]
    rows, base = [], evaluator.accuracy
    for i, (layer, b) in enumerate(tasks):
        v = evaluator.score(quantizer.build({layer.name: b}))
        base = v.accuracy_before
        rows.append(_row(layer, b, quantizer.stored_bytes(layer, b), v))
        if progress is not None:
            progress(i + 1, len(tasks))
    info = tuple(LayerInfo(layer.name, layer.kind, int(layer.size),
                           int(layer.nodes[0].inputs[1].values.nbytes)) for layer in layers)
    return BitsScan(model, evaluator.samples, base, info, tuple(rows), skipped, time.perf_counter() - start,
                    method)
