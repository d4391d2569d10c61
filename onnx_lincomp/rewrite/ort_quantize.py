"""onnxruntime's quantization tool behind our graph, our calibration stream and our errors.

The quantization passes do not quantize by hand: they export the working graph, hand it to
``onnxruntime.quantization`` (``quant_pre_process``, ``quantize_static``, ``quantize_dynamic``,
``MatMulNBitsQuantizer``) in a temporary folder, and put the quantized graph back into the same
``gs.Graph`` object. This module holds what the three passes share:

* :func:`export_float` / :func:`pre_process`: the graph as a ``ModelProto`` (opset raised where the
  quantizer needs it), then onnxruntime's pre-processing (symbolic and ONNX shape inference, basic graph
  optimisation);
* :class:`FeedReader`: a ``CalibrationDataReader`` that streams the calibration part of our data source
  batch by batch (``__len__`` and ``set_range`` count batches, as onnxruntime's strided calibration
  expects);
* :func:`calibrate_ranges`: activation ranges by MinMax, Entropy or Percentile, collected **one batch at a
  time** into onnxruntime's own mergeable statistics (``MinMaxCalibrater`` merges min/max,
  ``HistogramCollector`` merges histograms), then written as a calibration cache that ``quantize_static``
  reads. onnxruntime's own loop keeps every full activation of every sample in memory for the histogram
  methods (0.9 GB at 64 samples on a small CNN) and does not pass histogram sizes to the Entropy
  calibrator (with its 128 bins the KL search has a single candidate, so its Entropy equals MinMax); here
  memory holds one batch's activations plus the histograms, whatever the number of samples, and Entropy
  searches 2,048 bins with :func:`kl_threshold` (onnxruntime's arithmetic without its per-bin Python loops);
* :func:`gptq_codes` / :func:`gptq_matmul_nbits`: data-aware 4-bit weights (GPTQ) written as onnxruntime's
  ``MatMulNBits``; onnxruntime's own GPTQ needs PyTorch, and its numpy core returns round-to-nearest codes;
* :func:`replace_graph`: the quantized model's graph copied into the caller's ``gs.Graph`` in place;
* :func:`gemm_to_matmul`: ``Gemm`` as ``MatMul`` (+ ``Add``), the form the dynamic and 4-bit quantizers
  take (exact: ``alpha * A B^T + beta C`` with the normalised weight and bias of the linear-layer view);
* :func:`already_quantized`: the nodes that show a model is quantized already (it must not be quantized
  again);
* :func:`latency_check`: the quantized model against the float one in interleaved rounds;
* :func:`export_context`: the model context with the opset and IR version the quantized graph needs.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibration.activations import CalibrationData
from ..canonicalize import QUANTIZED_OPS as CANONICAL_QUANTIZED_OPS
from ..canonicalize import quantized_ops as canonical_quantized_ops
from ..errors import LincompError, UnsupportedModelError
from ..graph_edit import NameSource
from ..linear_layer import LinearLayer, match_linear_layer
from ..model_io import ModelContext, graph_from_proto, to_model_proto, with_inferred_shapes
from ..runtime.feeds import BatchSource, Feeds, InputLike, benchmark_feeds, fixed_batch, iterate_feeds
from ..runtime.latency import CompareOptions, RatioEstimate, compare_models_latency

logger = logging.getLogger(__name__)

CalibMethod = Literal["minmax", "entropy", "percentile"]
ENTROPY_BINS = 2048  # TensorRT's histogram size; onnxruntime's quantize_static uses 128 (= no search at all)
ENTROPY_QUANTIZED_BINS = 128
PERCENTILE = 99.999
PERCENTILE_BINS = 2048

# Ops that only a quantized model holds (DequantizeLinear counts here: after our own quantizers it is one).
QUANTIZED_OPS = CANONICAL_QUANTIZED_OPS | frozenset({"DequantizeLinear"})


class QuantizationError(UnsupportedModelError):
    """onnxruntime's quantizer refused or failed on the model (exit 3: the model is the problem, not the flags)."""


def quantized_ops(graph: gs.Graph) -> dict[str, int]:
    """Op type -> count of the nodes that only a quantized model holds (DequantizeLinear included)."""
    return canonical_quantized_ops(graph, QUANTIZED_OPS)


def quantized_layers(model: onnx.ModelProto) -> int:
    """Layers of ``model`` that compute with quantized weights: integer ops, and float Conv/Gemm/MatMul whose
    weight is the output of a DequantizeLinear (QDQ)."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    integer = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "MatMulNBits",
               "DynamicQuantizeMatMul", "MatMulBnb4"}
    return sum(1 for n in model.graph.node if n.op_type in integer or (
        n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in dequantized))


def already_quantized(graph: gs.Graph) -> str | None:
    """Why the graph must not be quantized again (None when it is a float graph)."""
    found = quantized_ops(graph)
    if not found:
        return None
    ops = ", ".join(f"{n} {op}" for op, n in sorted(found.items()))
    return f"the model is quantized already ({ops}): quantizing it again would stack a second rounding"


# ---- the working folder and onnxruntime's chatter ------------------------------------------------------------
class Workspace:
    """A temporary folder for the files onnxruntime's quantizer reads and writes (removed on exit)."""

    def __init__(self, prefix: str = "lincomp-quant-"):
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.path = Path(self._dir.name)

    def file(self, name: str) -> Path:
        return self.path / name

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()


class _OrtRecords(logging.Filter):
    """Moves the root-logger warnings onnxruntime's quantizer emits (``logging.warning(...)``) to our debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname.replace("\\", "/"):
            logger.debug("onnxruntime: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's quantizer prints progress to stdout (it would corrupt ``--json -``) and logs warnings on the
    root logger; both go to this module's debug log while it runs."""
    out = io.StringIO()
    root = logging.getLogger()
    filt = _OrtRecords()
    root.addFilter(filt)
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        root.removeFilter(filt)
        if out.getvalue().strip():
            logger.debug("onnxruntime printed: %s", out.getvalue().strip().replace("\n", " | "))


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


@contextlib.contextmanager
def ort_errors(what: str) -> Iterator[None]:
    """onnxruntime's quantizer raises plain exceptions (ValueError, RuntimeError, AssertionError, its pybind
    errors): as one-line :class:`QuantizationError` naming the step."""
    try:
        with quiet_onnxruntime():
            yield
    except LincompError:
        raise
    except Exception as exc:  # onnxruntime.quantization raises anything
        raise QuantizationError(f"{what} failed: {_one_line(exc)}") from exc


# ---- graph <-> proto ----------------------------------------------------------------------------------------
def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def export_float(graph: gs.Graph, ctx: ModelContext | None, min_opset: int = 0) -> onnx.ModelProto:
    """The graph as a model with inferred shapes (model fields from ``ctx`` when given), its default opset
    raised to ``min_opset`` when lower (per-channel QDQ needs 13; onnxruntime's quantizer needs 11)."""
    if ctx is not None:
        model = to_model_proto(graph, ctx, infer_shapes=True)
    else:
        model = with_inferred_shapes(gs.export_onnx(graph, do_type_check=False))
    if default_opset(model) < min_opset:
        with ort_errors(f"converting the model from opset {default_opset(model)} to {min_opset}"):
            model = onnx.version_converter.convert_version(model, min_opset)
            model.ir_version = max(model.ir_version, _ir_for_opset(min_opset))
    return model


def _ir_for_opset(opset: int) -> int:
    """The smallest IR version that allows ``opset`` (onnx's own table)."""
    table = onnx.helper.VERSION_TABLE  # (release, ir, opset, ml opset, ...)
    return min((row[1] for row in table if row[2] >= opset), default=onnx.IR_VERSION)


def pre_process(model: onnx.ModelProto, ws: Workspace, name: str = "pre.onnx") -> Path:
    """onnxruntime's ``quant_pre_process`` (symbolic shape inference, basic optimisation, ONNX shape inference);
    when its optimisation step fails the model is pre-processed without it."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = ws.file(name)
    src = ws.file("float.onnx")
    onnx.save_model(model, str(src))
    # onnxruntime's symbolic shape inference saves 'sym_shape_infer_temp.onnx' into the working directory when it
    # gives up: run it inside the workspace so nothing lands in the user's folder
    try:
        with ort_errors("onnxruntime pre-processing"), contextlib.chdir(ws.path):
            quant_pre_process(str(src), str(out))
    except QuantizationError as exc:
        logger.warning("%s; pre-processing again without symbolic shape inference and optimisation", exc)
        with ort_errors("onnxruntime pre-processing (without optimisation)"), contextlib.chdir(ws.path):
            quant_pre_process(str(src), str(out), skip_optimization=True, skip_symbolic_shape=True)
    if not out.is_file():
        raise QuantizationError("onnxruntime pre-processing wrote no model")
    model = onnx.load(str(out))
    if squeeze_gemm_biases(model):
        onnx.save_model(model, str(out))
    return out


def squeeze_gemm_biases(model: onnx.ModelProto) -> int:
    """Give every Gemm bias that broadcasts along rows only (a scalar, ``(1,)``, ``(1, 1)``, ``(1, N)``) the shape
    ``(N,)``, with ``beta`` folded in (``beta * C`` then ``beta = 1``), in place; how many. The same function up to
    float rounding.

    onnxruntime's pre-processing fuses ``MatMul`` + ``Add(b[1, N])`` into such a Gemm, exporters write scalar
    biases, and its per-channel QDQ quantizer indexes the bias per output channel: it fails on anything but a
    vector of ``N``."""
    inits = {t.name: t for t in model.graph.initializer}
    readers = Counter(i for n in model.graph.node for i in n.input)
    done = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight, bias = inits[node.input[1]], inits[node.input[2]]
        n = int(weight.dims[0] if attrs.get("transB", 0) else weight.dims[1])
        beta = float(attrs.get("beta", 1.0))
        dims = list(bias.dims)
        if (dims == [n] and beta == 1.0) or len(dims) > 2 or (len(dims) == 2 and dims[0] != 1) \
                or int(np.prod(dims)) not in (1, n):
            continue
        value = onnx.numpy_helper.to_array(bias)
        flat = onnx.numpy_helper.from_array(np.broadcast_to(value.reshape(-1) * value.dtype.type(beta), (n,)).copy(),
                                            bias.name)
        if readers[bias.name] == 1:
            bias.CopyFrom(flat)
        else:
            flat.name = f"{bias.name}_{node.name or 'gemm'}_1d"
            model.graph.initializer.append(flat)
            node.input[2] = flat.name
        if beta != 1.0:
            kept = [a for a in node.attribute if a.name != "beta"]
            del node.attribute[:]
            node.attribute.extend(kept)
        done += 1
    return done


def replace_graph(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Make ``graph`` (the caller's object) hold ``model``'s graph: nodes, inputs, outputs, opsets, IR version."""
    prune_unused_domains(model)
    new = graph_from_proto(model)
    graph.nodes = new.nodes
    graph.inputs = new.inputs
    graph.outputs = new.outputs
    graph.opset = new.opset
    graph.import_domains = new.import_domains
    graph.ir_version = max(graph.ir_version or 0, model.ir_version)


def prune_unused_domains(model: onnx.ModelProto) -> None:
    """Drop the opset imports of domains no node uses (onnxruntime's optimiser writes a dozen)."""
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def export_context(ctx: ModelContext, graph: gs.Graph) -> ModelContext:
    """``ctx`` with its default opset and IR version raised to what the (quantized) graph needs.

    :func:`~onnx_lincomp.model_io.to_model_proto` keeps the context's opsets over the graph's; a model whose
    opset the quantizer raised (opset 8 -> 13 for per-channel QDQ) must be saved with the new one."""
    opsets = dict(ctx.opset_imports)
    key = "" if "" in opsets or "ai.onnx" not in opsets else "ai.onnx"
    if graph.opset and opsets.get(key, 0) < graph.opset:
        opsets[key] = int(graph.opset)
    ir = max(ctx.ir_version, graph.ir_version or 0, _ir_for_opset(opsets.get(key, 1)))
    fields = dict(ctx.__dict__, opset_imports=tuple(opsets.items()), ir_version=ir)
    return ModelContext(**fields)


def node_names(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node}


def map_excluded(names: Sequence[str], model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The pre-processed model's node names for ``names`` (a node onnxruntime fused keeps its name as a prefix,
    ``fc/MatMulAddFusion``), and the names no node carries any more."""
    present = node_names(model)
    mapped, lost = [], []
    for name in names:
        if name in present:
            mapped.append(name)
            continue
        heirs = [n for n in present if n.startswith(name + "/") or n.startswith(name + "_")]
        (mapped.extend(heirs) if heirs else lost.append(name))
    return mapped, lost


# ---- Gemm -> MatMul (+ Add) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmRewrite:
    rewritten: int
    skipped: dict[str, int]


def gemm_to_matmul(graph: gs.Graph, exclude: frozenset[str] = frozenset()) -> GemmRewrite:
    """Rewrite every Gemm with a constant, unshared weight as ``MatMul(x, W^T)`` (+ ``Add(b)``), in place.

    With the normalised view (``weight`` (out, in) with ``alpha`` folded, ``bias`` with ``beta`` applied),
    ``alpha * x B' + beta * C = x weight^T + bias``: exact. The MatMul keeps the Gemm's node name (so
    ``--exclude`` names still apply), the Add is named ``<name>_bias``."""
    names = NameSource(graph)
    done, skipped = 0, Counter()
    for node in list(graph.nodes):
        if node.op != "Gemm" or node.name in exclude:
            continue
        layer = match_linear_layer(graph, node)
        if not isinstance(layer, LinearLayer):
            skipped[getattr(layer, "reason", "not a linear layer")] += 1
            continue
        x_rank = len(layer.input.shape) if layer.input.shape is not None else 2
        if x_rank != 2:
            skipped["Gemm input is not 2-D"] += 1
            continue
        dtype = np.asarray(node.inputs[1].values).dtype
        w = gs.Constant(names.fresh(f"{node.name}_weight_t"), np.ascontiguousarray(layer.weight.T.astype(dtype)))
        out = node.outputs[0]
        if layer.has_bias:
            mid = gs.Variable(names.fresh(f"{out.name}_mm"), dtype=out.dtype, shape=out.shape)
            b = gs.Constant(names.fresh(f"{node.name}_bias"), np.ascontiguousarray(layer.bias.astype(dtype)))
            graph.nodes.append(gs.Node("Add", names.fresh(f"{node.name}_bias"), inputs=[mid, b], outputs=[out]))
        else:
            mid = out
        node.op, node.attrs = "MatMul", {}
        node.inputs = [layer.input, w]
        node.outputs = [mid]
        done += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return GemmRewrite(done, dict(skipped))


def nbits_quantizer_module():
    """``onnxruntime.quantization.matmul_nbits_quantizer``, imported without the side effect of its import
    (``logging.basicConfig(level=INFO)`` on the root logger, which would print every library's INFO records)."""
    import importlib
    import sys

    name = "onnxruntime.quantization.matmul_nbits_quantizer"
    if name in sys.modules:
        return sys.modules[name]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(name)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


# ---- data-aware 4-bit weights (GPTQ) --------------------------------------------------------------------------
GPTQ_CHUNK = 128  # rows rounded between two lazy updates of the rows after them (a multiple of the block size)
GPTQ_DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (keeps the inverse's Cholesky factor stable)


def _block_params(rows: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a block of weight rows: the 4-bit scale and zero point (GPTQ's convention: the range always
    holds 0; symmetric blocks have zero point 8)."""
    lo = np.minimum(rows.min(axis=0), 0.0)
    hi = np.maximum(rows.max(axis=0), 0.0)
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo[flat], hi[flat] = -1.0, 1.0
    scale = (hi - lo) / 15.0
    zero = np.full_like(scale, 8.0) if symmetric else np.round(-lo / scale)
    return scale, zero


def gptq_codes(weight: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool = False,
               damp: float = GPTQ_DAMP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022) for a MatMul weight ``W`` (``K x N``: input rows) and its input Hessian
    ``H = E[x x^T]`` (``K x K``): rows are rounded in order to 4-bit codes on per-block grids, and each row's
    rounding error is spread over the rows not yet rounded so that ``E||(W - Q)^T x||^2`` stays small:
    with ``U`` the upper Cholesky factor of ``H^-1``, ``e_i = (w_i - q_i) / U_ii`` and ``w_r -= U_ir e_i``
    for ``r > i`` (applied lazily per chunk of rows). A block's scale and zero point come from its rows as
    they stand when the block starts. Returns (codes ``Kp x N`` uint8 with ``Kp`` padded to whole blocks,
    scales ``blocks x N``, zero points ``blocks x N``)."""
    w = np.array(weight, dtype=np.float64)
    k, n = w.shape
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0  # an input that is always 0: its row does not matter
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    blocks = -(-k // block_size)
    codes = np.zeros((blocks * block_size, n), np.uint8)
    scales, zeros = np.zeros((blocks, n)), np.zeros((blocks, n))
    chunk = max(GPTQ_CHUNK, block_size)
    for c0 in range(0, k, chunk):
        c1 = min(c0 + chunk, k)
        w1, err = w[c0:c1].copy(), np.zeros((c1 - c0, n))
        for j in range(c1 - c0):
            i = c0 + j
            if i % block_size == 0:
                scales[i // block_size], zeros[i // block_size] = _block_params(w1[j:j + block_size], symmetric)
            s, z = scales[i // block_size], zeros[i // block_size]
            q = np.clip(np.round(w1[j] / s) + z, 0, 15)
            codes[i] = q
            err[j] = (w1[j] - s * (q - z)) / u[i, i]
            w1[j + 1:] -= np.outer(u[i, i + 1:c1], err[j])
        w[c1:] -= u[c0:c1, c1:].T @ err
    for b in range(blocks):  # padding rows decode to 0
        codes[max(k, b * block_size):(b + 1) * block_size] = zeros[b].astype(np.uint8)
    return codes, scales, zeros.astype(np.uint8)


def matmul_nbits(node: onnx.NodeProto, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, k: int,
                 block_size: int, dtype: np.dtype, accuracy_level: int = 0) -> tuple[onnx.NodeProto, list]:
    """A ``com.microsoft.MatMulNBits`` (4 bits) replacing MatMul ``node`` and its initializers, in onnxruntime's
    layout: ``B`` ``N x blocks x block/2`` (two codes a byte, low nibble first), ``scales`` ``N x blocks``,
    ``zero_points`` ``N x ceil(blocks/2)`` (absent: 8)."""
    n = codes.shape[1]
    blocks = codes.shape[0] // block_size
    c = codes.T.reshape(n, blocks, block_size)
    packed = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
    base = node.input[1]
    inits = [onnx.numpy_helper.from_array(packed, f"{base}_Q4"),
             onnx.numpy_helper.from_array(np.ascontiguousarray(scales.T.astype(dtype)), f"{base}_scales")]
    if zeros is not None:
        z = zeros.T
        if blocks % 2:
            z = np.concatenate([z, np.full((n, 1), 8, np.uint8)], axis=1)
        inits.append(onnx.numpy_helper.from_array((z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8),
                                                  f"{base}_zero_points"))
    attrs = {"K": k, "N": n, "bits": 4, "block_size": block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    new = onnx.helper.make_node("MatMulNBits", [node.input[0]] + [t.name for t in inits], list(node.output),
                                name=f"{node.name}_Q4", domain="com.microsoft", **attrs)
    return new, inits


def gptq_matmul_nbits(model: onnx.ModelProto, hessians: dict[str, np.ndarray], block_size: int,
                      symmetric: bool = False, accuracy_level: int = 0) -> int:
    """Replace each MatMul named in ``hessians`` (node name -> ``E[x x^T]`` of its input) by a GPTQ-rounded
    4-bit ``MatMulNBits``, in place; returns how many.

    Not onnxruntime's GPTQ: its entry point needs PyTorch and keeps every calibration input in memory, and its
    numpy core (``neural_compressor.weight_only.gptq``) propagates the rounding error through the wrong triangle
    of the Cholesky factor (entries that are all zero), so it returns plain round-to-nearest codes."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, added, done = [], [], 0
    for node in model.graph.node:
        h = hessians.get(node.name)
        if node.op_type != "MatMul" or h is None or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = onnx.numpy_helper.to_array(inits[node.input[1]])
        codes, scales, zeros = gptq_codes(weight, h, block_size, symmetric)
        new, new_inits = matmul_nbits(node, codes, scales, None if symmetric else zeros, weight.shape[0],
                                      block_size, weight.dtype, accuracy_level)
        nodes.append(new)
        added.extend(new_inits)
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(added)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return done


# ---- calibration ----------------------------------------------------------------------------------------------
class FeedReader:
    """An onnxruntime ``CalibrationDataReader`` over the calibration part of our data source.

    ``get_next`` returns one batch of feeds (None at the end); ``__len__`` is the number of batches and
    ``set_range(start, end)`` selects batches ``[start, end)`` (onnxruntime's strided calibration);
    ``rewind`` starts over. A deep copy (onnxruntime's GPTQ takes one) is a fresh reader over the same
    source, not a copy of the arrays."""

    def __init__(self, data: CalibrationData, inputs: Sequence[InputLike], start: int = 0, end: int | None = None):
        self.data = data
        self.inputs = list(inputs)
        per_sample = data.source.per_sample
        fixed = fixed_batch(self.inputs, per_sample)
        self.step = 1 if per_sample else (fixed if fixed is not None else data.batch_size)
        self.batches = max(1, -(-data.samples // self.step)) if data.samples else 0
        self.set_range(start, self.batches if end is None else end)

    def __len__(self) -> int:
        return self.batches

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = max(0, start_index), min(self.batches, end_index)
        self.rewind()

    def rewind(self) -> None:
        lo, hi = self.start * self.step, min(self.end * self.step, self.data.samples)
        self._it = (f for f, _ in iterate_feeds(self.inputs, self.data.source, self.step, lo, hi)) if hi > lo \
            else iter(())

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def __iter__(self) -> Iterator[Feeds]:
        return self

    def __next__(self) -> Feeds:
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds

    def __deepcopy__(self, memo) -> FeedReader:
        return FeedReader(self.data, self.inputs, self.start, self.end)

    def one_batch_readers(self) -> Iterator[_OneBatch]:
        """Each batch as a reader of its own (calibrators then reduce one batch at a time)."""
        self.rewind()
        while (feeds := self.get_next()) is not None:
            yield _OneBatch(feeds)


class _OneBatch:
    def __init__(self, feeds: Feeds):
        self._feeds: Feeds | None = feeds

    def get_next(self) -> Feeds | None:
        feeds, self._feeds = self._feeds, None
        return feeds


def ort_method(method: CalibMethod):
    """onnxruntime's CalibrationMethod for one of ours."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def kl_threshold(histogram: tuple, num_quantized_bins: int = ENTROPY_QUANTIZED_BINS) -> tuple:
    """onnxruntime's Entropy threshold (``HistogramCollector.get_entropy_threshold``: the symmetric range whose
    ``num_quantized_bins``-level requantisation of the histogram has the smallest KL divergence from it, clamped to
    the observed min/max), computed with numpy reductions instead of its Python loops over bins (which take seconds
    per tensor at 2,048 bins). Same arithmetic, same result."""
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, edges, lowest, highest = histogram[0], histogram[1], histogram[2], histogram[3]
    bins, half = hist.size, num_quantized_bins // 2
    zero = bins // 2
    cum = np.concatenate([[0], np.cumsum(hist)])
    best, best_range = np.inf, None
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, bins)
        sliced = np.asarray(hist[start:end], dtype=np.int64)
        p = sliced.copy()
        p[0] += cum[start]
        p[-1] += cum[bins] - cum[end]
        merged = sliced.size // num_quantized_bins
        cut = merged * num_quantized_bins
        quantized = sliced[:cut].reshape(num_quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[cut:].sum()
        norm = (p[:cut] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        filled = np.where(norm != 0, quantized / np.maximum(norm, 1), 0)
        q[:cut] = np.repeat(np.trunc(filled).astype(np.int64), merged)
        sp, sq = smooth_distribution(p), smooth_distribution(q)
        div = np.inf if sp is None or sq is None else float(entropy(sp, sq))
        if div < best or best_range is None:
            best, best_range = div, (edges[start], edges[end])
    lo, hi = best_range
    dtype = edges.dtype
    return (np.array(max(lo, lowest), dtype=dtype), np.array(min(hi, highest), dtype=dtype))


def _entropy_ranges(calibrator):
    """The Entropy calibrator's ranges from its merged histograms (:func:`kl_threshold` per tensor)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    histograms = calibrator.collector.histogram_dict
    return TensorsData(CalibrationMethod.Entropy,
                       {name: (*kl_threshold(h, calibrator.collector.num_quantized_bins), h[0], h[1])
                        for name, h in histograms.items()})


def calibrate_ranges(model_path: Path, reader: FeedReader, method: CalibMethod, ws: Workspace,
                     op_types: Sequence[str] | None = None) -> Path:
    """Activation ranges of the model at ``model_path`` on the reader's batches, one batch at a time, as an
    onnxruntime calibration cache file (``quantize_static(calibration_cache_path=...)`` reads it)."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    options = {"minmax": {}, "entropy": {"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
               "percentile": {"num_bins": PERCENTILE_BINS, "percentile": PERCENTILE, "symmetric": False}}[method]
    cache = ws.file(f"ranges-{method}.json")
    with ort_errors(f"calibration ({method})"):
        calibrator = create_calibrator(model_path, list(op_types) if op_types else None,
                                       augmented_model_path=str(ws.file("augmented.onnx")),
                                       calibrate_method=ort_method(method), extra_options=options)
        batches = 0
        for one in reader.one_batch_readers():
            calibrator.collect_data(one)
            batches += 1
        if not batches:
            raise QuantizationError("calibration: the data yielded no batch")
        ranges = _entropy_ranges(calibrator) if method == "entropy" else calibrator.compute_data()
        del calibrator
        save_tensors_data(ranges, cache)
    return cache


# ---- latency --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyCheck:
    ratio: RatioEstimate
    batch: int
    threads: int

    @property
    def slower(self) -> bool:
        return self.ratio.change == "slower"

    def describe(self, what: str) -> str:
        r = self.ratio
        return (f"{what} vs FP32 at batch {self.batch}, {self.threads} thread(s): {r.verdict} "
                f"(ratio {r.ratio:.2f}, 95% interval [{r.low:.2f}, {r.high:.2f}])")


def latency_check(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, source: BatchSource,
                  inputs: Sequence[InputLike], batch: int = 1, threads: int = 1,
                  stop: int | None = None) -> LatencyCheck:
    """The quantized model's latency against the float one on one batch of ``source`` (samples before
    ``stop``), in interleaved rounds with ``threads`` pinned intra-op threads."""
    threads = max(threads, 1)
    feeds, used = benchmark_feeds(list(inputs), source, batch, 0, stop)
    comparison = compare_models_latency([float_model, quant_model], feeds,
                                        CompareOptions(threads=threads, batch_size=used))
    return LatencyCheck(comparison.ratios[1], used, threads)


__all__ = ["QUANTIZED_OPS", "CalibMethod", "FeedReader", "GemmRewrite", "LatencyCheck", "QuantizationError",
           "Workspace", "already_quantized", "calibrate_ranges", "export_context", "export_float", "gemm_to_matmul",
           "gptq_codes", "kl_threshold", "gptq_matmul_nbits", "matmul_nbits", "nbits_quantizer_module",
           "latency_check", "map_excluded", "ort_errors", "ort_method", "pre_process", "quantized_layers",
           "quantized_ops", "quiet_onnxruntime", "replace_graph", "squeeze_gemm_biases"]
