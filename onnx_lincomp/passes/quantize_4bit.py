"""quantize-weights-4bit: block-wise 4-bit weight-only quantization of MatMul weights (onnxruntime
``MatMulNBitsQuantizer``, output ``com.microsoft.MatMulNBits``).

The weight ``W`` (``in x out``) is cut along the input axis into blocks of ``block_size`` values per output
column; each block stores 4-bit codes ``q`` in 0..15 with its own scale ``s`` and (asymmetric) zero point
``z``: ``W ~ s (q - z)``. Storage is about ``4 + 32 (or 36) / block_size`` bits per weight instead of 32.
Activations stay float: only the file and the weight memory shrink (the kernel dequantizes blocks on the
fly; ``accuracy_level`` 4 lets it compute in int8).

Algorithms (``algorithm``):

* ``rtn``: round to nearest per block, ``s = (max - min) / 15``, ``z = round(-min / s)`` (onnxruntime's
  own blockwise quantizer; no data);
* ``hqq``: half-quadratic optimisation of the scale and zero point of each block against the rounding
  error (no data);
* ``gptq``: data-aware: the weight's input rows are rounded one at a time and the rounding error of each is
  spread over the rows not yet rounded through the inverse of the layer's input Hessian ``H = E[x x^T]``
  (``W_rest -= H^-1[rest, i] (w_i - q_i) / H^-1[i, i]``, Cholesky form), which minimises the layer's output
  error ``||(W - Q)^T x||^2`` on the calibration data rather than the weight error. The rounding is
  onnxruntime's vendored Intel Neural Compressor GPTQ core; the Hessians are streamed from our calibration
  data (onnxruntime's own GPTQ entry point needs PyTorch and keeps every input in memory).

**Bias correction** (``bias_correction``, on by default; needs calibration data, so rtn and hqq run without it
when none is given): each layer's expected output shift from the rounding, ``(W - W_q) E[x]`` with ``E[x]`` its
input mean on the calibration data (streamed with the layer moments; gptq reuses the moments of its Hessians),
is folded into the bias: the constant of the layer's bias ``Add``, else ``MatMulNBits``' own ``bias`` input
(:mod:`..rewrite.quant_bias_correction`; ``W_q`` is read by running the node on the identity).

Gemm layers are first rewritten as ``MatMul`` (+ ``Add``), exactly. As for every onnxruntime-backed
quantizer, the result is timed against FP32 and the pass declines when it is measurably slower (unless
``keep_slower``): 4-bit weights are a storage win first.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from ..calibration.activations import CalibrationData
from ..calibration.moments import Moments, collect_layer_moments
from ..errors import OptionError
from ..linear_layer import LinearLayer, match_linear_layer
from ..rewrite.ort_quantize import (
    Workspace,
    export_float,
    gemm_to_matmul,
    gptq_matmul_nbits,
    nbits_quantizer_module,
    ort_errors,
    prune_unused_domains,
)
from ..rewrite.quant_bias_correction import LayerMeans, correct_nbits_biases
from .base import option
from .quantize_dynamic import constant_weight_problem
from .quantize_int8 import OrtQuantizeOptions, OrtQuantizePass, Quantized

ALGORITHMS = ("rtn", "hqq", "gptq")
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Quantize4BitOptions(OrtQuantizeOptions):
    algorithm: str = option("rtn", "rtn (round to nearest per block), hqq (optimised scales, no data) or gptq "
                                   "(data-aware rounding with the calibration Hessian).", flag="--quant-algorithm")
    block_size: int = option(32, "Weights per block sharing one scale and zero point (16, 32, 64, 128 or 256).",
                             flag="--block-size")
    symmetric: bool = option(False, "Symmetric blocks (no zero point; rtn and gptq).")
    accuracy_level: int = option(0, "MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute.")
    bias_correction: bool = option(True, "Fold each layer's expected output shift from the weight rounding, "
                                         "(W - W_q) E[x] on the calibration data, into its bias (needs data).",
                                   flag="--bias-correction")

    def __post_init__(self):
        super().__post_init__()
        algorithm = str(self.algorithm).lower()
        if algorithm not in ALGORITHMS:
            raise OptionError(f"quantize-weights-4bit: unknown algorithm '{self.algorithm}' (choose "
                              f"{', '.join(ALGORITHMS)})")
        object.__setattr__(self, "algorithm", algorithm)
        if self.block_size not in BLOCK_SIZES:
            raise OptionError(f"quantize-weights-4bit: block_size must be one of "
                              f"{', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if not 0 <= self.accuracy_level <= 4:
            raise OptionError(f"quantize-weights-4bit: accuracy_level must be in 0..4, got {self.accuracy_level}")


class Quantize4Bit(OrtQuantizePass):
    name = "quantize-weights-4bit"
    Options = Quantize4BitOptions
    summary = ("block-wise 4-bit weight-only quantization of MatMul/Gemm weights (onnxruntime MatMulNBits: rtn, hqq "
               "or data-aware gptq); declines when it runs slower than FP32")
    layer_ops = frozenset({"MatMul", "Gemm"})
    label = "4-bit weights"
    options: Quantize4BitOptions

    def __init__(self, options: Quantize4BitOptions | None = None):
        super().__init__(options)
        self.needs_data = self.options.algorithm == "gptq"

    def layer_problem(self, graph: gs.Graph, node: gs.Node) -> str | None:
        return constant_weight_problem(graph, node)

    def quantize(self, graph: gs.Graph, data: CalibrationData | None, exclude: Sequence[str],
                 ws: Workspace) -> Quantized:
        o = self.options
        _require_modules(o.algorithm)
        ctx = data.ctx if data is not None else None
        float_model = export_float(graph, ctx)
        work = graph.copy()
        rewrite = gemm_to_matmul(work, frozenset(exclude))
        notes = [f"{o.algorithm}, block {o.block_size}, {'symmetric' if o.symmetric else 'asymmetric'}"]
        if rewrite.rewritten:
            notes.append(f"{rewrite.rewritten} Gemm rewritten as MatMul+Add (exact) for the MatMulNBits quantizer")
        layers = self._layers(work, exclude)
        moments = (collect_layer_moments(work, data, layers) if data is not None and layers
                   and (o.algorithm == "gptq" or o.bias_correction) else {})
        if o.algorithm == "gptq":
            assert data is not None  # plan refused to run gptq without data
            model, gptq_notes = self._gptq(work, data, moments)
            notes += gptq_notes
        else:
            model = self._ort(work, ctx, exclude)
        if o.bias_correction and moments:
            means = LayerMeans({x.name: x.weight for x in layers}, {k: m.mean for k, m in moments.items()},
                               {x.name: x.nodes[0].outputs[0].name for x in layers}, {})
            notes.append(correct_nbits_biases(model, *means.by_output()).note("4-bit weights"))
        elif o.bias_correction:
            notes.append("no bias correction (needs calibration data)")
        return Quantized(float_model, model, tuple(notes))

    def _ort(self, work: gs.Graph, ctx, exclude: Sequence[str]) -> onnx.ModelProto:
        """onnxruntime's MatMulNBits quantizer (rtn or hqq)."""
        o = self.options
        MatMulNBitsQuantizer = nbits_quantizer_module().MatMulNBitsQuantizer  # noqa: N806

        with ort_errors(f"onnxruntime MatMulNBits quantizer ({o.algorithm})"):
            quantizer = MatMulNBitsQuantizer(export_float(work, ctx), bits=4, block_size=o.block_size,
                                             is_symmetric=o.symmetric, accuracy_level=o.accuracy_level or None,
                                             nodes_to_exclude=list(exclude), algo_config=self._config())
            quantizer.process()
        result = quantizer.model.model
        prune_unused_domains(result)
        return result

    @staticmethod
    def _layers(work: gs.Graph, exclude: Sequence[str]) -> list[LinearLayer]:
        """The MatMul layers to quantize, in the linear-layer view."""
        layers = []
        for node in work.nodes:
            layer = match_linear_layer(work, node) if node.op == "MatMul" and node.name not in exclude else None
            if isinstance(layer, LinearLayer):
                layers.append(layer)
        return layers

    def _gptq(self, work: gs.Graph, data: CalibrationData, moments: dict[str, Moments]) -> tuple[onnx.ModelProto,
                                                                                                  list]:
        """GPTQ with each layer's input Hessian streamed from the calibration data (second moments only: memory
        does not grow with the number of samples)."""
        o = self.options
        hessians = {k: m.gram[:-1, :-1] / max(m.rows, 1) for k, m in moments.items()}
        model = export_float(work, data.ctx)
        with ort_errors("GPTQ (onnxruntime's numpy core)"):
            done = gptq_matmul_nbits(model, hessians, o.block_size, o.symmetric, o.accuracy_level)
        notes = [f"gptq on {data.samples} calibration samples ({done} layers, input Hessians streamed)"]
        return model, notes

    def _config(self):
        nbits = nbits_quantizer_module()
        o = self.options
        if o.algorithm == "hqq":
            return nbits.HQQWeightOnlyQuantConfig(block_size=o.block_size, bits=4, op_types_to_quantize=("MatMul",))
        return nbits.DefaultWeightOnlyQuantConfig(block_size=o.block_size, is_symmetric=o.symmetric,
                                            accuracy_level=o.accuracy_level or None, op_types_to_quantize=("MatMul",),
                                            bits=4)


def _require_modules(algorithm: str) -> None:
    """onnxruntime's MatMulNBits quantizer imports onnx-ir, and its HQQ computes in PyTorch: a one-line error
    naming what is missing (gptq is ours and needs neither)."""
    needs = {"rtn": ("onnx_ir",), "hqq": ("onnx_ir", "torch"), "gptq": ()}[algorithm]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        what = {"onnx_ir": "onnx-ir (onnxruntime's MatMulNBits quantizer imports it: pip install onnx-ir)",
                "torch": "PyTorch (onnxruntime's HQQ quantizer computes with it; rtn and gptq do not need it)"}
        raise OptionError(f"quantize-weights-4bit ({algorithm}) needs {what[missing[0]]}")


__all__ = ["Quantize4Bit", "Quantize4BitOptions"]
