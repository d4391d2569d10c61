"""quantize-int8: static INT8 quantization through onnxruntime's ``quantize_static``, fed by our calibration data.

Every quantized tensor ``x`` is stored or computed as ``q = clamp(round(x / s) + z, qmin, qmax)`` and read back
as ``x' = s (q - z)``. Weights are int8, symmetric (``z = 0``), with one scale per output channel
(``s_c = max|W_c| / 127``; ``per_tensor`` uses one scale for the whole tensor). Activations are uint8,
asymmetric: ``s = (r_max - r_min) / 255`` and ``z = round(-r_min / s)`` over a range ``[r_min, r_max]``
(always containing 0) taken from the calibration data:

* ``minmax``: the smallest and largest value seen;
* ``entropy``: the threshold whose 128-level quantized histogram has the smallest KL divergence from the
  2,048-bin histogram of the data (TensorRT's method; it clips outliers, and measured up to 0.85 points less
  accurate than MinMax on small classifiers here: measure before choosing it);
* ``percentile``: the 0.0005 % and 99.9995 % quantiles (2,048-bin histogram).

Ranges are collected one batch at a time (:func:`..rewrite.ort_quantize.calibrate_ranges`): memory does not
grow with the number of calibration samples. onnxruntime's pre-processing (shape inference, basic graph
optimisation) runs first. The default format is QDQ (QuantizeLinear/DequantizeLinear pairs around float ops,
which onnxruntime fuses into integer kernels at session start); QOperator (QLinearConv, ...) is allowed but
was several times slower on x86 here.

INT8 is not always faster: on small CNNs it measured *slower* than FP32 on this machine class (mnist-8 1.6x
slower at batch 1). So the pass times the quantized graph against the float one (interleaved rounds, batch
``latency_batch``) and, when INT8 is measurably slower, declines: the graph stays float and the reason is in
the result, unless ``keep_slower`` is set. Nodes named in ``exclude`` stay float.

**Bias correction** (``bias_correction``, on by default; QDQ only): after onnxruntime rounds the weights, each
layer's expected output shift from the weight rounding, ``(W - W_q) E[x]`` with ``E[x]`` the layer's input
mean on the calibration data, is folded into its (int32) bias (:mod:`..rewrite.quant_bias_correction`). The
shift the activation quantization adds is not corrected.

**Automatic exclusion** (``exclude_sensitive``; 'auto' needs labels, a count ranks by the mean output error
without them): each layer is quantized
alone and scored on the calibration split; the most sensitive are kept float, a fixed number of them, or
(``auto``) as many as it takes for the predicted and then the measured drop on the calibration split to fit
``max_drop`` points (:mod:`..rewrite.int8_build`). The layers kept float and their one-layer drops are in the
result's notes.

This module also holds the base shared by the three onnxruntime-backed quantizers (``quantize-int8``,
``quantize-dynamic``, ``quantize-weights-4bit``): options, the plan (skip an already quantized model, check
``exclude``), and the apply step (quantize in a temporary folder, time, keep or decline, replace the graph).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs

from ..calibration.activations import CalibrationData
from ..calibration.data_source import input_specs, open_calibration
from ..errors import CalibrationDataError, OptionError
from ..evaluate.evaluator import Evaluator
from ..rewrite.int8_build import Int8Builder, Int8Settings, exclude_sensitive
from ..rewrite.ort_quantize import (
    FeedReader,
    LatencyCheck,
    Workspace,
    already_quantized,
    calibrate_ranges,
    export_float,
    latency_check,
    map_excluded,
    pre_process,
    quantized_layers,
    replace_graph,
)
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan, SkipTally, option

logger = logging.getLogger(__name__)

CALIB_METHODS = ("minmax", "entropy", "percentile")
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


# ---- the base of the onnxruntime-backed quantizers ------------------------------------------------------------
@dataclass(frozen=True)
class OrtQuantizeOptions(PassOptions):
    """Options every onnxruntime-backed quantizer has."""

    exclude: tuple[str, ...] | str = option((), "Node names kept in float (comma-separated on the command line).",
                                            flag="--exclude")
    keep_slower: bool = option(False, "Keep the quantized graph even when it runs measurably slower than FP32 "
                                      "(else the pass declines and reports the measured ratio).",
                               flag="--keep-slower")
    latency_batch: int = option(1, "Batch size of the latency check against FP32.")

    def __post_init__(self):
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", tuple(n.strip() for n in self.exclude.split(",") if n.strip()))
        elif not all(isinstance(n, str) for n in self.exclude):
            raise OptionError(f"exclude: expected node names, got {self.exclude!r}")
        else:
            object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.latency_batch < 1:
            raise OptionError(f"latency_batch must be at least 1, got {self.latency_batch}")


def _half_precision(graph: gs.Graph, layer_ops: frozenset[str]) -> str | None:
    """Why a float16 / bfloat16 model is left alone (None for float32): onnxruntime's quantizers read float32
    weights; on float16 ones they kept the weights and quantized them at run time, so the file grew."""
    for node in graph.nodes:
        if node.op in layer_ops and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) \
                and node.inputs[1].values.dtype.kind in "fV" and node.inputs[1].values.dtype.itemsize == 2:
            return (f"{node.inputs[1].values.dtype} weights: onnxruntime's quantizers take float32 models (export "
                    "the model in float32 to quantize it)")
    return None


@dataclass(frozen=True)
class Quantized:
    """What a quantizer produced: the float model it started from, the quantized one, notes."""

    float_model: onnx.ModelProto
    model: onnx.ModelProto
    notes: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()  # layers the pass itself chose to keep float (sensitivity)


class OrtQuantizePass(Pass):
    """Plan: refuse an already quantized graph (skip with the reason), check ``exclude``, list the layers.
    Apply: :meth:`quantize` in a workspace, time against FP32, keep or decline, put the result in the graph."""

    repeatable = False
    runs_last = True
    lossy = True
    needs_data: ClassVar[bool] = True
    layer_ops: ClassVar[frozenset[str]] = WEIGHTED_OPS
    label: ClassVar[str] = "quantized"
    options: OrtQuantizeOptions

    # ---- plan -------------------------------------------------------------------------------------------
    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        tally = SkipTally()
        if self.needs_data and ctx.data is None:
            raise OptionError(f"{self.name} needs calibration data (--calib DATA)")
        reason = already_quantized(graph) or _half_precision(graph, self.layer_ops)
        if reason is not None:
            tally.add(reason, "model")
            return tally.plan(self.name, [])
        check_exclude(self.name, graph, self.options.exclude)
        excluded = set(layers_to_exclude(graph, self.options))
        matches = []
        for node in graph.nodes:
            if node.op not in self.layer_ops:
                continue
            why = "kept in float by exclude" if node.name in excluded else self.layer_problem(graph, node)
            if why is not None:
                tally.add(why, node.name)
                continue
            matches.append(Match(node.name, self.name, detail=f"{node.op}: {self.label}",
                                 data={"data": ctx.data, "exclude": tuple(sorted(excluded))}))
        if not matches:
            tally.add(f"no {'/'.join(sorted(self.layer_ops))} layer to quantize", "model")
        return tally.plan(self.name, matches, approximate=bool(matches))

    def layer_problem(self, graph: gs.Graph, node: gs.Node) -> str | None:
        """Why ``node`` (of a type in ``layer_ops``) will not be quantized (None: it will)."""
        return None

    # ---- apply ------------------------------------------------------------------------------------------
    def quantize(self, graph: gs.Graph, data: CalibrationData | None, exclude: Sequence[str],
                 ws: Workspace) -> Quantized:
        raise NotImplementedError

    def apply(self, graph: gs.Graph, plan: Plan) -> PassResult:
        skipped = dict(plan.skipped)
        if not plan.matches:
            return PassResult(self.name, changed=False, skipped=skipped)
        data: CalibrationData | None = plan.matches[0].data["data"]
        exclude: tuple[str, ...] = plan.matches[0].data["exclude"]
        with Workspace() as ws:
            done = self.quantize(graph, data, exclude, ws)
        notes = list(done.notes)
        check = self._latency(done, data, graph)
        if check is None:
            notes.append("latency against FP32 not checked (no calibration data, and random inputs need static "
                         "shapes)")
        else:
            notes.append(check.describe(self.label))
            if check.slower and not self.options.keep_slower:
                why = (f"{self.label} is {check.ratio.verdict} than FP32 at batch {check.batch}: graph kept in float "
                       "(keep_slower / --keep-slower keeps it)")
                skipped[why] = skipped.get(why, 0) + 1
                return PassResult(self.name, changed=False, matched=len(plan.matches), skipped=skipped,
                                  notes=tuple(notes), counts={"declined": 1})
        layers = quantized_layers(done.model)
        replace_graph(graph, done.model)
        return PassResult(self.name, changed=True, matched=len(plan.matches), rewritten=layers, approximate=True,
                          skipped=skipped, notes=tuple(notes),
                          counts={"layers_quantized": layers, "layers_excluded": len(exclude) + len(done.excluded),
                                  "layers_excluded_sensitive": len(done.excluded),
                                  "calibration_samples": data.samples if data is not None and self.needs_data else 0})

    def _latency(self, done: Quantized, data: CalibrationData | None, graph: gs.Graph) -> LatencyCheck | None:
        """Time on calibration samples, or on random inputs when the pass ran without data (None when the
        inputs' shapes leave random data nothing to go on)."""
        batch = self.options.latency_batch
        if data is not None:
            return latency_check(done.float_model, done.model, data.source, graph.inputs, batch, data.threads,
                                 data.stop)
        try:
            source = open_calibration(f"random:{batch}", input_specs(graph))
            return latency_check(done.float_model, done.model, source, graph.inputs, batch)
        except CalibrationDataError as exc:
            logger.info("%s: latency not checked: %s", self.name, exc)
            return None


def check_exclude(pass_name: str, graph: gs.Graph, names: Sequence[str]) -> None:
    """Every name in ``exclude`` must be a node of the graph (a usage error naming the first that is not)."""
    present = {n.name for n in graph.nodes}
    missing = [n for n in names if n not in present]
    if missing:
        close = sorted(n.name for n in graph.nodes if n.op in WEIGHTED_OPS)[:8]
        raise OptionError(f"{pass_name}: exclude names no node '{missing[0]}' (after the earlier passes; layer nodes: "
                          f"{', '.join(close) or 'none'})")


def layers_to_exclude(graph: gs.Graph, options: OrtQuantizeOptions) -> tuple[str, ...]:
    """The nodes kept in float before quantizing: the user's ``exclude`` list. The layers ``quantize-int8``'s
    ``exclude_sensitive`` keeps float are chosen in apply (they need INT8 builds to be scored) and reported in
    the result's notes and ``layers_excluded_sensitive``."""
    return tuple(options.exclude)


# ---- quantize-int8 --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizeInt8Options(OrtQuantizeOptions):
    calib_method: str = option("minmax", "Activation ranges: minmax, entropy (KL threshold, 2048 bins) or percentile "
                                         "(99.999 %).", flag="--calib-method")
    per_tensor: bool = option(False, "One weight scale per tensor instead of one per output channel.",
                              flag="--per-tensor")
    quant_format: str = option("qdq", "qdq (QuantizeLinear/DequantizeLinear pairs; fast on CPU) or qoperator "
                                      "(QLinearConv, ...; measured several times slower here).",
                               flag="--quant-format")
    bias_correction: bool = option(True, "Fold each layer's expected output shift from the weight rounding, "
                                         "(W - W_q) E[x] on the calibration data, into its bias (QDQ).",
                                   flag="--bias-correction")
    exclude_sensitive: int | str = option(0, "Keep float the layers most sensitive to INT8 (each scored alone on "
                                             "the calibration split: accuracy drop with labels, else mean output "
                                             "error): a count, or 'auto' for as many as --exclude-budget needs "
                                             "(labels; 0: off).", flag="--exclude-sensitive")
    max_drop: float | None = option(None, "Accuracy budget in points on the calibration split for "
                                          "--exclude-sensitive auto.", flag="--exclude-budget")

    def __post_init__(self):
        super().__post_init__()
        method = str(self.calib_method).lower()
        if method not in CALIB_METHODS:
            raise OptionError(f"quantize-int8: unknown calibration method '{self.calib_method}' (choose "
                              f"{', '.join(CALIB_METHODS)})")
        fmt = str(self.quant_format).lower()
        if fmt not in ("qdq", "qoperator"):
            raise OptionError(f"quantize-int8: unknown quant_format '{self.quant_format}' (choose qdq or qoperator)")
        object.__setattr__(self, "calib_method", method)
        object.__setattr__(self, "quant_format", fmt)
        count = self.exclude_sensitive
        if isinstance(count, bool) or not (count == "auto" or (isinstance(count, int) and count >= 0)):
            raise OptionError(f"quantize-int8: exclude_sensitive must be a count >= 0 or 'auto', got {count!r}")
        if self.max_drop is not None and count != "auto":
            raise OptionError("quantize-int8: --exclude-budget (max_drop) is spent by exclude_sensitive 'auto'; give "
                              "--exclude-sensitive auto, or drop the budget")
        if count == "auto" and self.max_drop is None:
            raise OptionError("quantize-int8: exclude_sensitive 'auto' needs the budget max_drop (--exclude-budget P)")
        if self.max_drop is not None and (isinstance(self.max_drop, bool) or self.max_drop < 0):
            raise OptionError(f"quantize-int8: max_drop must be >= 0 points, got {self.max_drop!r}")


class QuantizeInt8(OrtQuantizePass):
    name = "quantize-int8"
    Options = QuantizeInt8Options
    summary = ("static INT8 quantization (onnxruntime quantize_static: uint8 activations calibrated on the data, int8 "
               "per-channel weights, QDQ); declines when INT8 runs slower than FP32")
    label = "INT8"
    options: QuantizeInt8Options

    def layer_problem(self, graph: gs.Graph, node: gs.Node) -> str | None:
        if node.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in node.inputs[:2]):
            return "MatMul of two computed tensors (activations quantized, no weight)"
        return None

    def quantize(self, graph: gs.Graph, data: CalibrationData | None, exclude: Sequence[str],
                 ws: Workspace) -> Quantized:
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        assert data is not None  # plan refused to run without data
        o = self.options
        notes = [f"calibration: {o.calib_method} on {data.samples} samples, one batch at a time"]
        if o.quant_format == "qoperator":
            logger.warning("quantize-int8: QOperator format measured several times slower than QDQ on x86 here; "
                           "QDQ is the default")
            notes.append("QOperator format: measured several times slower than QDQ on x86 (QDQ is the default)")
        float_model = export_float(graph, data.ctx, 11 if o.per_tensor else 13)
        pre = pre_process(float_model, ws)
        op_types = tuple(sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))
        cache = calibrate_ranges(pre, FeedReader(data, graph.inputs), o.calib_method, ws, op_types)
        builder = Int8Builder(pre, cache, Int8Settings(not o.per_tensor, o.quant_format == "qoperator",
                                                       o.calib_method, op_types), ws)
        names, lost = map_excluded(exclude, builder.pre_model)
        if lost:
            notes.append(f"excluded node(s) {', '.join(lost)} merged away by onnxruntime's pre-processing")
        if o.bias_correction and o.quant_format == "qdq":
            means = builder.collect_means(data)
            notes.extend(f"bias correction: {n} layer(s) skipped: {why}" for why, n in means.skipped.items())
        elif o.bias_correction:
            notes.append("no bias correction: the QOperator format folds its biases into integer kernels")
        if o.exclude_sensitive:
            evaluator = Evaluator(float_model, graph.inputs, data.source, 0, data.samples, data.source.labels,
                                  threads=data.threads, optimize=True)
            chosen = exclude_sensitive(builder, evaluator, names, o.exclude_sensitive, o.max_drop)
            notes.extend(chosen.notes())
            model, correction, auto = chosen.model, chosen.correction, chosen.excluded
        else:
            (model, correction), auto = builder.build(names), ()
        if correction is not None:
            notes.append(correction.note("weights"))
        return Quantized(float_model, model, tuple(notes), auto)


__all__ = ["OrtQuantizeOptions", "OrtQuantizePass", "QuantizeInt8", "QuantizeInt8Options", "Quantized",
           "check_exclude", "layers_to_exclude"]
