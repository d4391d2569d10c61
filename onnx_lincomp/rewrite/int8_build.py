"""Static INT8 models built repeatedly from one pre-processing and one calibration, and the automatic exclusion
of the layers most sensitive to INT8.

:class:`Int8Builder` holds what every build shares: onnxruntime's pre-processed float model, the activation
ranges (a calibration cache, so ``quantize_static`` does not calibrate again) and, with bias correction, each
layer's float weight and input mean. :meth:`Int8Builder.build` quantizes the model with some nodes kept float
(or only some nodes quantized) and folds the bias correction in.

**Sensitivity and exclusion.** Each weighted layer is quantized alone (its input, weight and output; the rest
float) and scored against the float model on the calibration split, with labels: the accuracy drop ``d_i`` in
points (the one-layer-at-a-time scan of :func:`~onnx_lincomp.evaluate.layer_scan.scan_layers`). Drops are
taken as additive:
the predicted drop of quantizing a set ``S`` is ``sum_{i in S} max(d_i, 0)``. With a budget ``B`` the layers
are kept float in decreasing order of ``d_i`` (ties: larger output error first) until the predicted drop is at
most ``B``; the combined model is then built and scored on the same split, and while its measured drop exceeds
``B`` the next most sensitive layer is kept float too. With a count ``N`` the ``N`` most sensitive layers are
kept float, whatever the drop. The held-out split is never read: the pipeline's gate judges the result there.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from ..calibration.activations import CalibrationData
from ..errors import OptionError
from ..evaluate.layer_scan import scan_layers
from ..graph_edit import subgraph_reads
from ..linear_layer import LinearLayer, match_linear_layer
from ..model_io import graph_from_proto
from .ort_quantize import Workspace, export_context, ort_errors, ort_method
from .quant_bias_correction import Correction, LayerMeans, correct_qdq_biases, layer_means

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Settings:
    """The quantize_static arguments every build shares."""

    per_channel: bool
    qoperator: bool
    calib_method: str
    op_types: tuple[str, ...]


def weighted_layers(graph: gs.Graph, op_types: Sequence[str]) -> list[LinearLayer]:
    """The weighted layers (Conv / Gemm / MatMul with a constant weight) among the quantizable ops, one per head."""
    out = []
    for node in graph.nodes:
        if node.op in op_types:
            layer = match_linear_layer(graph, node)
            if isinstance(layer, LinearLayer) and layer.nodes[0] is node:
                out.append(layer)
    return out


def float_regions(graph: gs.Graph, exclude: Sequence[str], op_types: Sequence[str]) -> list[str]:
    """The quantizable nodes that are not linear layers (Add, Mul, pooling, activations, ...) whose nearest linear
    layers, upstream and downstream, are all kept float: excluding only the layers would leave their activations
    in Q/DQ, so a model with every layer excluded would still be quantized."""
    kept = set(exclude)
    if not kept:
        return []
    heads = {layer.nodes[0].name for layer in weighted_layers(graph, op_types)}

    def linear(node: gs.Node) -> bool:
        return node.name in heads

    def neighbours(node: gs.Node, up: bool) -> set[str] | None:
        """The nearest linear layers in one direction (None where a path reaches a graph input or output)."""
        found, seen, todo = set(), {id(node)}, [node]
        while todo:
            n = todo.pop()
            tensors = n.inputs if up else n.outputs
            for t in tensors:
                if isinstance(t, gs.Constant):
                    continue
                nxt = list(t.inputs) if up else list(t.outputs)
                if not nxt or (not up and t in graph.outputs):
                    return None
                for m in nxt:
                    if id(m) in seen:
                        continue
                    seen.add(id(m))
                    if linear(m):
                        found.add(m.name)
                    else:
                        todo.append(m)
        return found

    out = []
    for node in graph.nodes:
        if node.op not in op_types or node.name in kept or linear(node):
            continue
        around = [neighbours(node, up) for up in (True, False)]
        names = set().union(*(a for a in around if a is not None))
        if names and names <= kept:
            out.append(node.name)
    return out


class Int8Builder:
    """Builds INT8 models of one pre-processed float model from one set of activation ranges."""

    def __init__(self, pre: Path, cache: Path, settings: Int8Settings, ws: Workspace):
        self.pre, self.cache, self.settings, self.ws = pre, cache, settings, ws
        self.pre_model = onnx.load(str(pre))
        self.graph = graph_from_proto(self.pre_model)
        self.means: LayerMeans | None = None
        self._count = 0
        # nodes writing a tensor an If/Loop/Scan body reads stay float: onnxruntime's quantizer does not see that
        # reader, and folds a Relu it thinks only quantized nodes read into the range of the layer before it
        reads = subgraph_reads(self.graph)
        self.body_feeders = [n.name for n in self.graph.nodes if any(t.name in reads for t in n.outputs)]

    def collect_means(self, data: CalibrationData) -> LayerMeans:
        """Each layer's float weight and input mean on the calibration part (once; every build reuses them)."""
        if self.means is None:
            view = dataclasses.replace(data, ctx=export_context(data.ctx, self.graph))
            self.means = layer_means(self.graph, view)
        return self.means

    def layers(self, exclude: Sequence[str]) -> list[LinearLayer]:
        """The weighted layers of the pre-processed model that a build quantizes (not in ``exclude``, none that
        writes a tensor a body reads)."""
        return [layer for layer in weighted_layers(self.graph, self.settings.op_types)
                if layer.nodes[0].name not in exclude and not any(n.name in self.body_feeders for n in layer.nodes)]

    def build(self, exclude: Sequence[str], only: Sequence[str] | None = None) -> tuple[onnx.ModelProto,
                                                                                         Correction | None]:
        """The model with ``exclude`` kept float (``only``: just these nodes quantized), bias-corrected when
        :meth:`collect_means` ran."""
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        s = self.settings
        self._count += 1
        out = self.ws.file(f"int8-{self._count}.onnx")
        fmt = QuantFormat.QOperator if s.qoperator else QuantFormat.QDQ
        with ort_errors("onnxruntime quantize_static"):
            quantize_static(str(self.pre), str(out), None, quant_format=fmt, op_types_to_quantize=list(s.op_types),
                            per_channel=s.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude) + float_regions(self.graph, exclude, s.op_types)
                            + self.body_feeders,
                            nodes_to_quantize=list(only) if only else None,
                            calibrate_method=ort_method(s.calib_method), calibration_cache_path=str(self.cache))
        model = onnx.load(str(out))
        out.unlink()
        if self.means is None or s.qoperator:
            return model, None
        return model, correct_qdq_biases(model, self.means.weights, self.means.means)


class OneLayerInt8:
    """:class:`~onnx_lincomp.evaluate.layer_scan.LayerQuantizer` of single INT8 layers (for the sensitivity scan)."""

    def __init__(self, builder: Int8Builder, exclude: Sequence[str]):
        self.builder = builder
        self.layers = builder.layers(exclude)

    def problem(self, layer: LinearLayer, bits: int) -> str | None:
        return None if bits == 8 else "INT8 only"

    def stored_bytes(self, layer: LinearLayer, bits: int) -> int:
        return int(layer.size) + 4 * (layer.out_features if self.builder.settings.per_channel else 1)

    def build(self, bits: Mapping[str, int]) -> onnx.ModelProto:
        return self.builder.build((), only=[name for name, b in bits.items() if b])[0]


@dataclass(frozen=True)
class Exclusion:
    """The layers the sensitivity scan kept float, the evidence, and the model built without them."""

    excluded: tuple[str, ...]
    drops: Mapping[str, float]  # layer -> accuracy drop (points) with that layer alone in INT8
    predicted: float  # summed drops of the layers still quantized
    measured: float | None  # drop of the combined model on the calibration split (points)
    budget: float | None
    samples: int
    model: onnx.ModelProto = dataclasses.field(repr=False)
    correction: Correction | None = None
    errors: Mapping[str, float] = dataclasses.field(default_factory=dict)  # no labels: layer -> mean abs error

    def notes(self) -> tuple[str, ...]:
        why = (f"kept float as the most sensitive: {', '.join(self.excluded)}" if self.excluded
               else "no layer kept float")
        if self.errors:  # no labels: ranked by the output error each layer alone in INT8 causes
            ranked = ", ".join(f"{n} {e:.3g}" for n, e in sorted(self.errors.items(), key=lambda kv: -kv[1]))
            return (f"INT8 sensitivity on {self.samples} calibration samples (mean abs output error with one layer "
                    f"alone in INT8): {ranked}", why)
        ranked = ", ".join(f"{n} {d:+.2f}" for n, d in sorted(self.drops.items(), key=lambda kv: -kv[1]))
        goal = f" within the budget {self.budget:g}" if self.budget is not None else ""
        measured = f", measured {self.measured:.2f}" if self.measured is not None else ""
        return (f"INT8 sensitivity on {self.samples} calibration samples (accuracy drop in points with one layer "
                f"alone in INT8): {ranked}",
                f"{why}; predicted drop {self.predicted:.2f}{measured} points{goal} (calibration split)")


def exclude_sensitive(builder: Int8Builder, evaluator, exclude: Sequence[str], count: int | str,
                      budget: float | None) -> Exclusion:
    """Scan the layers one at a time and keep float the most sensitive ``count`` ("auto": as many as ``budget``
    needs, checked on the combined model), as the module docstring says."""

    labelled = evaluator.accuracy is not None
    if count == "auto" and not labelled:
        raise OptionError("quantize-int8: exclude_sensitive 'auto' spends an accuracy budget, which needs labels in "
                          "the calibration data (--labels KEY) and a classifier output; without labels give a count "
                          "(the layers whose INT8 moves the outputs most are kept float)")
    scan = scan_layers(evaluator, OneLayerInt8(builder, exclude), (8,), "quantize-int8", method="int8")
    drops = {r.layer: float(r.drop_points or 0.0) for r in scan.rows}
    # with labels: the largest one-layer accuracy drop first; without: the largest mean output error (a dense
    # map's max error is one flipped pixel for almost every layer)
    order = [r.layer for r in sorted(scan.rows, key=lambda r: (-(r.drop_points or 0.0), -r.rel_max) if labelled
                                     else (-r.mean_abs, -r.rel_max))]
    errors = {} if labelled else {r.layer: float(r.mean_abs) for r in scan.rows}
    if count != "auto":
        chosen = order[:int(count)]
        model, corr = builder.build(list(exclude) + chosen)
        return Exclusion(tuple(chosen), drops, _predicted(drops, chosen), None, budget, scan.samples, model, corr,
                         errors)
    assert budget is not None  # the options require it with "auto"
    chosen = []
    while _predicted(drops, chosen) > budget and len(chosen) < len(order):
        chosen.append(order[len(chosen)])
    while True:
        model, corr = builder.build(list(exclude) + chosen)
        v = evaluator.score(model)
        measured = v.paired.drop_points if v.paired is not None else None
        logger.info("quantize-int8: %d layer(s) kept float, measured drop %s", len(chosen), measured)
        if measured is None or measured <= budget or len(chosen) == len(order):
            return Exclusion(tuple(chosen), drops, _predicted(drops, chosen), measured, budget, scan.samples,
                             model, corr)
        chosen.append(order[len(chosen)])


def _predicted(drops: Mapping[str, float], excluded: Sequence[str]) -> float:
    return float(sum(max(d, 0.0) for n, d in drops.items() if n not in excluded))


__all__ = ["Exclusion", "Int8Builder", "Int8Settings", "OneLayerInt8", "exclude_sensitive"]
