"""quantize-dynamic: INT8 weights, activations quantized at run time (onnxruntime ``quantize_dynamic``).

Each constant weight of a MatMul is stored as int8, ``W ~ s_w (q_w - z_w)`` with one scale per tensor.
At run time ``DynamicQuantizeLinear`` computes a uint8 scale and zero point for each activation tensor
from its own min/max (``s_x = (max(x, 0) - min(x, 0)) / 255``), ``MatMulInteger`` multiplies the integers
and the product is rescaled by ``s_x s_w``; onnxruntime fuses the three into one kernel at session start.
No calibration data is needed: ranges come from each input as it arrives.

Gemm layers are first rewritten as ``MatMul`` (+ ``Add`` for the bias), exactly
(:func:`..rewrite.ort_quantize.gemm_to_matmul`), keeping their node names: onnxruntime's dynamic quantizer
has no Gemm kernel (it rewrites any Gemm left, excluded ones included, as ``<name>_MatMul`` + ``<name>_Add``
and leaves those float).
Conv (``ConvInteger``) is not quantized unless ``op_types`` asks for it: it measured 3-7x *slower* than
FP32 on small CNNs here, while a 2.8M-parameter MLP ran 2-3x faster. As for every onnxruntime-backed
quantizer, the result is timed against FP32 and the pass declines when it is measurably slower (unless
``keep_slower``); the data, when given, only feeds that timing.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from ..calibration.activations import CalibrationData
from ..errors import OptionError
from ..linear_layer import LinearLayer, match_linear_layer
from ..rewrite.ort_quantize import Workspace, export_float, gemm_to_matmul, ort_errors
from .base import PassContext, Plan, option
from .quantize_int8 import OrtQuantizeOptions, OrtQuantizePass, Quantized

logger = logging.getLogger(__name__)

DYNAMIC_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class QuantizeDynamicOptions(OrtQuantizeOptions):
    op_types: tuple[str, ...] | str = option(("MatMul", "Gemm"), "Op types to quantize (comma-separated): MatMul, "
                                                                 "Gemm (rewritten as MatMul+Add), Conv (ConvInteger: "
                                                                 "measured 3-7x slower than FP32 here).",
                                             flag="--op-types")

    def __post_init__(self):
        super().__post_init__()
        ops = self.op_types.split(",") if isinstance(self.op_types, str) else list(self.op_types)
        ops = tuple(dict.fromkeys(str(o).strip() for o in ops if str(o).strip()))
        bad = [o for o in ops if o not in DYNAMIC_OPS]
        if bad or not ops:
            raise OptionError(f"quantize-dynamic: op_types must be among {', '.join(DYNAMIC_OPS)}, got "
                              f"'{bad[0] if bad else ''}'")
        object.__setattr__(self, "op_types", ops)


class QuantizeDynamic(OrtQuantizePass):
    name = "quantize-dynamic"
    Options = QuantizeDynamicOptions
    summary = ("dynamic INT8 quantization of MatMul/Gemm weights (onnxruntime quantize_dynamic; activations quantized "
               "at run time, no calibration needed); declines when it runs slower than FP32")
    needs_data = False
    label = "dynamic INT8"
    options: QuantizeDynamicOptions

    def __init__(self, options: QuantizeDynamicOptions | None = None):
        super().__init__(options)
        self.layer_ops = frozenset(self.options.op_types)

    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        if "Conv" in self.layer_ops:
            logger.warning("quantize-dynamic: Conv (ConvInteger) measured 3-7x slower than FP32 on small CNNs here")
        return super().plan(graph, ctx)

    def layer_problem(self, graph: gs.Graph, node: gs.Node) -> str | None:
        return constant_weight_problem(graph, node)

    def quantize(self, graph: gs.Graph, data: CalibrationData | None, exclude: Sequence[str],
                 ws: Workspace) -> Quantized:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ctx = data.ctx if data is not None else None
        float_model = export_float(graph, ctx, 11)
        notes = []
        work = graph.copy()
        if "Gemm" in self.options.op_types:
            rewrite = gemm_to_matmul(work, frozenset(exclude))
            if rewrite.rewritten:
                notes.append(f"{rewrite.rewritten} Gemm rewritten as MatMul+Add (exact) for onnxruntime's dynamic "
                             "quantizer")
        src, out = ws.file("float.onnx"), ws.file("dynamic.onnx")
        onnx.save_model(export_float(work, ctx, 11), str(src))
        op_types = sorted({"MatMul" if o == "Gemm" else o for o in self.options.op_types})
        # onnxruntime's dynamic quantizer turns every remaining Gemm (excluded, or Gemm not asked for) into
        # '<name>_MatMul' + '<name>_Add' itself, before it reads the exclusions: exclude that MatMul too
        keep_float = list(exclude) + [f"{n.name}_MatMul" for n in work.nodes if n.op == "Gemm"]
        with ort_errors("onnxruntime quantize_dynamic"):
            quantize_dynamic(str(src), str(out), op_types_to_quantize=op_types, weight_type=QuantType.QInt8,
                             nodes_to_exclude=keep_float, extra_options={"MatMulConstBOnly": True})
        return Quantized(float_model, onnx.load(str(out)), tuple(notes))


def constant_weight_problem(graph: gs.Graph, node: gs.Node) -> str | None:
    """Why a MatMul/Gemm/Conv cannot have its weight quantized ahead of time (None: it can)."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return f"{node.op} weight is not a constant (only constant weights are quantized ahead of time)"
    if node.op == "Gemm":
        layer = match_linear_layer(graph, node)
        if not isinstance(layer, LinearLayer):
            return f"Gemm not rewritable as MatMul: {getattr(layer, 'reason', 'not a linear layer')}"
    return None


__all__ = ["QuantizeDynamic", "QuantizeDynamicOptions", "constant_weight_problem"]
