"""Errors of intermediate tensors: a reference and a candidate model run on the same samples with the named
tensors exposed as outputs; per tensor, the relative Frobenius error ``||c - r|| / ||r||`` over all samples.

A lossy pass names the layer outputs it changed by design (``PassResult.changed_outputs``); ``optimize``
measures them on the held-out split, which no pass saw, so the report states each layer's error on data the
choice never used (the cumulative error at that layer: upstream changes included).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibration.data_source import CalibrationSource
from ..runtime.feeds import iterate_feeds
from ..runtime.session import SessionOptions, SessionScope, run_session


def _exposed(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    return out


def tensor_errors(reference: onnx.ModelProto, candidate: onnx.ModelProto, names: Sequence[str],
                  inputs: gs.Graph, source: CalibrationSource, start: int, stop: int | None, batch_size: int,
                  threads: int = 0) -> dict[str, float]:
    """Relative error of each of ``names`` (tensors both models compute) on samples ``[start, stop)``; a tensor
    whose shape differs between the two (a pass changed its width) has no error and is left out."""
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    diff, norm, apart = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), set()
    options = SessionOptions(threads=threads)
    with SessionScope(prefix="lincomp-tensors-") as scope:
        ref, cand = (scope.open(_exposed(m, names), options) for m in (reference, candidate))
        for feeds, _ in iterate_feeds(inputs, source, batch_size, start, stop):
            r = run_session(ref, names, feeds, "layer errors")
            c = run_session(cand, names, feeds, "layer errors")
            for n, a, b in zip(names, r, c, strict=True):
                if np.shape(a) != np.shape(b):  # the candidate changed the tensor's width (pruned channels)
                    apart.add(n)
                    continue
                a64 = np.asarray(a, dtype=np.float64)
                diff[n] += float(np.sum((np.asarray(b, dtype=np.float64) - a64) ** 2))
                norm[n] += float(np.sum(a64 ** 2))
    return {n: float(np.sqrt(diff[n] / norm[n])) if norm[n] > 0 else float(np.sqrt(diff[n]))
            for n in names if n not in apart}
