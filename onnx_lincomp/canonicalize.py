"""Canonical form before analysis: constants lifted and folded, initializer inputs dropped, Conv bias
adds fused, BatchNorm folded.

Constant folding: weights that a graph computes from constants (``ConstantOfShape``/``Expand``-built
weights in the onnx model-zoo test graphs, ``Transpose``/``Cast``/``Reshape`` of a stored weight in
exporter output) are evaluated once by onnx-graphsurgeon's ``Graph.fold_constants`` (which runs them in
onnxruntime) and become constants the linear-layer view can read. Folding is exact: the values are what
onnxruntime computed at run time. It is bounded and conservative:

* only top-level nodes whose inputs are all constants are folded (``fold_shapes=False``): nothing that
  reads a graph input is touched, not even ``Shape`` of an input with a static shape; subgraphs and
  functions are left alone; random ops, ops outside the default domain and nodes writing a graph output
  stay;
* a result above ``FoldOptions.size_limit_bytes`` (64 MiB) stays computed, reported with the reason;
* the folder runs once on the whole graph; if onnxruntime fails on it, it runs again part by part
  (graphsurgeon's recursive partitioning) and the first error is reported; nothing raises.

graphsurgeon never folds ``QuantizeLinear``/``DequantizeLinear`` (TensorRT wants them kept). With
``FoldOptions.dequantize`` those whose inputs are constants are evaluated in onnxruntime as well, so an int8
weight behind a ``DequantizeLinear`` becomes a float weight (4x its stored bytes, counted in the report).

Conv bias adds: ``Add(Conv(x, W), c)`` where ``c`` (shape ``[1, C, 1, 1]``, ``[C, 1, 1]`` or a scalar, as
Paddle and CNTK export a bias) varies along the channel axis only is ``Conv(x, W, b + c)``: exact.

BatchNorm folding: ``BN(z) = gamma * (z - mean) / sqrt(var + eps) + beta`` is affine per channel, so with
``s = gamma / sqrt(var + eps)`` a preceding linear layer ``z = W x + b`` becomes
``W' = s[:, None] * W`` and ``b' = s * (b - mean) + beta``. It is exact when the BN reads only that
layer's output and normalises the layer's output-channel axis (axis 1 of a Conv output or of a 2-D
Gemm/MatMul output). A BN anywhere else (after a Relu, after a 3-D MatMul) is left in place with a
reason: folding it backwards across a Relu would change the function.

Skip reasons are grouped: the quoted tensor and node names are taken out of the reason text and the first
few names of each reason are kept as examples.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from .errors import OptionError
from .fuse_activations import fuse_hard_activations
from .graph_edit import NameSource, is_graph_output, only_consumer
from .linear_layer import LinearLayer, Skip, match_linear_layer, producer_layer, write_linear_layer
from .model_io import ModelContext

logger = logging.getLogger(__name__)

FOLD_LIMIT_BYTES = 64 * 2**20
EXAMPLES_PER_REASON = 3
_DEFAULT_DOMAINS = (None, "", "ai.onnx")
_QUANTIZE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli"})
_QUOTED_NAME = re.compile(r"\s*'[^']*'")


def reason_kind(reason: str) -> str:
    """``reason`` without its quoted tensor/node names, so that like reasons group together."""
    return _QUOTED_NAME.sub("", reason)


class ReasonTally:
    """Skip reasons (names taken out) with counts and the first few names each."""

    def __init__(self, examples: int = EXAMPLES_PER_REASON):
        self.counts: Counter = Counter()
        self.names: dict[str, list[str]] = {}
        self._examples = examples

    def add(self, reason: str, name: str) -> None:
        kind = reason_kind(reason)
        self.counts[kind] += 1
        names = self.names.setdefault(kind, [])
        if len(names) < self._examples and name not in names:
            names.append(name)

    def merge(self, skipped: dict[str, int], examples: dict[str, tuple[str, ...]], prefix: str = "") -> None:
        """Add grouped reasons (another tally's ``skipped`` and ``examples``), each prefixed."""
        for kind, n in skipped.items():
            self.counts[prefix + kind] += n
            names = self.names.setdefault(prefix + kind, [])
            names.extend(x for x in examples.get(kind, ()) if x not in names)
            del names[self._examples:]

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.counts)

    @property
    def examples(self) -> dict[str, tuple[str, ...]]:
        return {k: tuple(v) for k, v in self.names.items()}


@dataclass(frozen=True)
class FoldOptions:
    """How constant subgraphs are folded: on or off, the largest result folded, and whether
    (De)QuantizeLinear of constants is evaluated too (an int8 weight then becomes a float one)."""

    enabled: bool = True
    size_limit_bytes: int = FOLD_LIMIT_BYTES
    dequantize: bool = True

    def __post_init__(self):
        if self.size_limit_bytes < 0:
            raise OptionError(f"constant folding: size_limit_bytes must be non-negative, got {self.size_limit_bytes}")


@dataclass(frozen=True)
class FoldReport:
    """What constant folding did: nodes evaluated away, tensors that became constants and their bytes,
    what stayed computed (grouped reasons, example node names), and the folder's first error if any."""

    nodes_folded: int = 0
    tensors_folded: int = 0
    bytes_folded: int = 0
    size_limit_bytes: int = FOLD_LIMIT_BYTES
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""

    def as_dict(self) -> dict:
        return {"nodes_folded": self.nodes_folded, "tensors_folded": self.tensors_folded,
                "bytes_folded": self.bytes_folded, "size_limit_bytes": self.size_limit_bytes,
                "skipped": dict(self.skipped), "examples": {k: list(v) for k, v in self.examples.items()},
                "error": self.error}


@dataclass(frozen=True)
class CanonicalizeReport:
    """What canonicalisation did. ``skipped``/``examples`` group every skip reason (constant folding's
    prefixed ``constant folding:``) with the first few node names each."""

    constants_lifted: int = 0
    initializer_inputs_dropped: int = 0
    batchnorms_folded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, tuple[str, ...]] = field(default_factory=dict)
    conv_bias_adds_fused: int = 0
    conv_pads_made_explicit: int = 0
    folding: FoldReport = field(default_factory=FoldReport)
    quantized: dict[str, int] = field(default_factory=dict)  # integer ops found: the model is quantized already
    activations_fused: int = 0  # hard-sigmoid / hard-swish chains made one op (fuse_activations)

    @property
    def rewrote(self) -> bool:
        """Whether the canonical graph computes differently from the input (not just stores it differently;
        constant folding is left out: onnxruntime folds those constants itself when it opens a session)."""
        return bool(self.batchnorms_folded or self.conv_bias_adds_fused or self.activations_fused)

    def as_dict(self) -> dict:
        return {"constants_lifted": self.constants_lifted,
                "initializer_inputs_dropped": self.initializer_inputs_dropped,
                "constant_folding": self.folding.as_dict(), "conv_bias_adds_fused": self.conv_bias_adds_fused,
                "conv_pads_made_explicit": self.conv_pads_made_explicit,
                "batchnorms_folded": self.batchnorms_folded, "skipped": dict(self.skipped),
                "examples": {k: list(v) for k, v in self.examples.items()}, "quantized": dict(self.quantized),
                "activations_fused": self.activations_fused}


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return np.asarray(attrs["value"].values)
    if "value" in attrs and isinstance(attrs["value"], onnx.TensorProto):
        return onnx.numpy_helper.to_array(attrs["value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None


def lift_constant_nodes(graph: gs.Graph) -> int:
    """Turn top-level ``Constant`` nodes into initializers (Paddle and others store weights so)."""
    lifted = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if is_graph_output(graph, out):
            continue
        value = _constant_node_value(node)
        if value is None:
            continue
        const = gs.Constant(out.name, np.array(value))
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        node.outputs.clear()
        lifted += 1
    if lifted:  # drop the emptied nodes directly (graphsurgeon's cleanup formats every node it logs: 0.2 s)
        graph.nodes = [n for n in graph.nodes if n.op != "Constant" or n.outputs]
    return lifted


def drop_initializer_inputs(graph: gs.Graph) -> int:
    """Initializers also listed as graph inputs (IR < 4 style) become plain constants."""
    before = len(graph.inputs)
    graph.inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    return before - len(graph.inputs)


def _bn_params(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    if len(node.outputs) != 1 or int(node.attrs.get("training_mode", 0)):
        return "BatchNormalization in training mode"
    params = node.inputs[1:5]
    if len(params) != 4 or not all(isinstance(p, gs.Constant) for p in params):
        return "BatchNormalization parameters are not constants"
    gamma, beta, mean, var = (np.asarray(p.values).astype(np.float64).reshape(-1) for p in params)
    scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return scale, beta - scale * mean


def _fold_one_batchnorm(graph: gs.Graph, names: NameSource, bn: gs.Node) -> str | None:
    """Fold ``bn`` into its producer layer; returns a skip reason or None when folded."""
    x = bn.inputs[0]
    layer = producer_layer(graph, x)
    if layer is None:
        producer = x.inputs[0].op if x.inputs else "graph input"
        return f"BatchNormalization after {producer} (not a linear layer)"
    if isinstance(layer, Skip):
        return f"BatchNormalization after a layer that cannot be rewritten: {layer.reason}"
    if only_consumer(graph, x) is not bn:
        return "BatchNormalization input has other readers"
    if layer.kind != "conv" and (x.shape is None or len(x.shape) != 2):
        return "BatchNormalization after MatMul/Gemm with output rank other than 2"
    params = _bn_params(bn)
    if isinstance(params, str):
        return params
    scale, shift = params
    if scale.size != layer.out_features:
        return "BatchNormalization width differs from the layer's output channels"
    expand = (slice(None),) + (None,) * (layer.ndim - 1)
    new_layer = write_linear_layer(graph, names, layer, layer.weight * scale[expand],
                                   layer.bias * scale + shift, keep_bias=True)
    y = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    new_layer.nodes[-1].outputs[0] = y
    return None


def fold_batchnorms(graph: gs.Graph) -> tuple[int, ReasonTally]:
    names = NameSource(graph)
    folded, tally = 0, ReasonTally()
    for node in list(graph.nodes):
        if node.op != "BatchNormalization" or not node.inputs:
            continue
        reason = _fold_one_batchnorm(graph, names, node)
        if reason is None:
            folded += 1
        else:
            tally.add(reason, node.name)
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return folded, tally


def _inputs_constant(node: gs.Node) -> bool:
    return all(isinstance(t, gs.Constant) for t in node.inputs if not t.is_empty())


def _fold_candidates(graph: gs.Graph, output_names: _Kept, quantize: bool) -> list[gs.Node]:
    """Top-level nodes whose inputs are all constants and that the folder may evaluate."""
    return [n for n in graph.nodes
            if n.op != "Constant" and _inputs_constant(n) and _excluded(n, output_names) is None
            and (n.op in _QUANTIZE_OPS) == quantize]


@dataclass(frozen=True)
class _Kept:
    """What folding must leave alone: graph outputs, and the codebook lookups of shared weights."""

    outputs: frozenset[str]
    codebook: frozenset[str]  # node names


CODEBOOK_MAX_ENTRIES = 256


def codebook_nodes(graph: gs.Graph) -> frozenset[str]:
    """Nodes of shared-weight lookups ``Gather(codebook, indices)`` (a 1-D float codebook of at most 256
    entries) and the constant-only nodes computing their indices: folding them would store float weights
    (or int64 indices) in place of the packed indices, a larger file."""
    out: set[str] = set()
    for node in graph.nodes:
        data = node.inputs[0] if node.op == "Gather" and node.inputs else None
        if not (isinstance(data, gs.Constant) and data.values.ndim == 1 and data.values.dtype.kind == "f"
                and data.values.size <= CODEBOOK_MAX_ENTRIES):
            continue
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            out.add(n.name)
            stack += [t.inputs[0] for t in n.inputs if isinstance(t, gs.Variable) and t.inputs]
    return frozenset(out)


def _excluded(node: gs.Node, output_names: _Kept) -> str | None:
    """Why ``node`` must not be folded whatever its inputs (None: it may be)."""
    if node.domain not in _DEFAULT_DOMAINS:
        return "op outside the default ONNX domain"
    if node.op in _RANDOM_OPS:
        return "random op (folding would freeze one draw)"
    if any(t.name in output_names.outputs for t in node.outputs):
        return "result is a graph output"
    if node.name in output_names.codebook:
        return "codebook lookup of shared weights (folding would store float weights)"
    return None


@contextlib.contextmanager
def _quiet_onnxruntime():
    """onnxruntime's default log level at ERROR while graphsurgeon's own sessions run (they would warn on
    stderr about every Unsqueeze their optimiser keeps); WARNING, onnxruntime's default, afterwards."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _run_graphsurgeon(graph: gs.Graph, options: FoldOptions, output_names: _Kept) -> str:
    """graphsurgeon's folder on ``graph``; returns the first error ('' when it ran in one piece)."""
    kwargs = {"fold_shapes": False, "recurse_subgraphs": False, "flatten_subgraphs": False,
              "recurse_functions": False, "size_threshold": options.size_limit_bytes,
              "should_exclude_node": lambda node: _excluded(node, output_names) is not None}
    graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    with G_LOGGER.suppress(), _quiet_onnxruntime():  # graphsurgeon logs to stdout, which --json - keeps clean
        try:
            graph.fold_constants(partitioning=None, error_ok=False, **kwargs)
            return ""
        except Exception as exc:  # graphsurgeon and onnxruntime raise plain exceptions
            error = _one_line(exc)
        logger.warning("constant folding in one piece failed (%s); folding part by part", error)
        try:
            graph.fold_constants(partitioning="recursive", error_ok=True, **kwargs)
        except Exception as exc:  # folding is a refinement: canonicalisation goes on without it
            logger.warning("constant folding failed: %s", _one_line(exc))
    return error


def _quantize_result_bytes(node: gs.Node) -> int:
    count = int(np.asarray(node.inputs[0].values).size)
    if node.op == "DequantizeLinear":
        return count * np.asarray(node.inputs[1].values).dtype.itemsize
    zero_point = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    return count * (np.asarray(zero_point.values).dtype.itemsize if zero_point is not None else 1)


def _evaluate_quantize_ops(graph: gs.Graph, nodes: list[gs.Node]) -> list[np.ndarray]:
    """Run ``nodes`` (constant inputs only) in one onnxruntime session; their outputs in order."""
    from .runtime.session import SessionOptions, open_session, run_session

    consts: dict[str, gs.Tensor] = {}
    copies, outputs = [], []
    for node in nodes:
        inputs = [t if t.is_empty() else consts.setdefault(t.name, gs.Constant(t.name, np.asarray(t.values)))
                  for t in node.inputs]
        out = gs.Variable(node.outputs[0].name, dtype=node.outputs[0].dtype)
        copies.append(gs.Node(node.op, node.name, dict(node.attrs), inputs=inputs, outputs=[out]))
        outputs.append(out)
    model = gs.export_onnx(gs.Graph(nodes=copies, outputs=outputs, opset=graph.opset), do_type_check=False)
    session = open_session(model, options=SessionOptions(optimize=False))
    return run_session(session, [o.name for o in outputs], {}, what="constant folding")


def _fold_quantize_ops(graph: gs.Graph, options: FoldOptions, output_names: _Kept) -> tuple[int, str]:
    """Evaluate (De)QuantizeLinear nodes with constant inputs; (how many, the error if onnxruntime failed)."""
    nodes = [n for n in _fold_candidates(graph, output_names, quantize=True)
             if len(n.outputs) == 1 and _quantize_result_bytes(n) <= options.size_limit_bytes]
    if not nodes:
        return 0, ""
    try:
        values = _evaluate_quantize_ops(graph, nodes)
    except Exception as exc:  # export or onnxruntime: folding is a refinement, canonicalisation goes on
        logger.warning("constant folding of %d (De)QuantizeLinear nodes failed: %s", len(nodes), exc)
        return 0, _one_line(exc)
    for node, value in zip(nodes, values, strict=True):
        out = node.outputs[0]
        out.to_constant(np.asarray(value))
        out.inputs.clear()
    return len(nodes), ""


def _result_bytes(node: gs.Node) -> int | None:
    """Bytes of ``node``'s outputs when their shapes and types are known."""
    if node.op in _QUANTIZE_OPS and node.inputs and isinstance(node.inputs[0], gs.Constant):
        return _quantize_result_bytes(node) if len(node.inputs) > 1 else None
    total = 0
    for t in node.outputs:
        shape, dtype = getattr(t, "shape", None), getattr(t, "dtype", None)
        if shape is None or dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        try:
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype) if isinstance(dtype, int) else dtype
            itemsize = np.dtype(np_dtype).itemsize
        except (TypeError, KeyError, ValueError):
            return None
        total += int(np.prod(shape, dtype=np.int64)) * itemsize
    return total


def _describe_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n:,} bytes"


def _why_still_computed(node: gs.Node, options: FoldOptions, output_names: _Kept, error: str) -> str:
    excluded = _excluded(node, output_names)
    if excluded is not None:
        return excluded
    if node.op in _QUANTIZE_OPS and not options.dequantize:
        return f"{node.op} kept (dequantize folding is off)"
    size = _result_bytes(node)
    if size is not None and size > options.size_limit_bytes:
        return f"result larger than the size limit of {_describe_bytes(options.size_limit_bytes)} (stays computed)"
    if error:
        return "onnxruntime could not evaluate it (see the folding error)"
    return "not folded (result size unknown: over the size limit or not evaluable)"


def fold_constants(graph: gs.Graph, options: FoldOptions = FoldOptions()) -> FoldReport:
    """Fold top-level constant subgraphs of ``graph`` in place (see the module docstring); never raises
    for a failure inside the folder: what stayed computed is reported with the reason."""
    if not options.enabled:
        return FoldReport(size_limit_bytes=options.size_limit_bytes)
    output_names = _Kept(frozenset(t.name for t in graph.outputs), codebook_nodes(graph))
    nodes_folded, folded, errors = 0, [], []
    if _fold_candidates(graph, output_names, quantize=False) or (
            options.dequantize and _fold_candidates(graph, output_names, quantize=True)):
        graph.cleanup(remove_unused_graph_inputs=False)
        computed = {name for name, t in graph.tensors().items() if isinstance(t, gs.Variable) and t.inputs}
        nodes_before = len(graph.nodes)
        for _ in range(3):  # (De)QuantizeLinear results can feed more foldable nodes, and the other way round
            if _fold_candidates(graph, output_names, quantize=False):
                errors.append(_run_graphsurgeon(graph, options, output_names))
            folded_quantize, error = (_fold_quantize_ops(graph, options, output_names) if options.dequantize
                                      else (0, ""))
            errors.append(error)
            if not folded_quantize:
                break
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        nodes_folded = nodes_before - len(graph.nodes)
        folded = [t for name, t in graph.tensors().items() if isinstance(t, gs.Constant) and name in computed]
    error = next((e for e in errors if e), "")
    tally = ReasonTally()
    for node in graph.nodes:
        if node.op != "Constant" and _inputs_constant(node):
            tally.add(_why_still_computed(node, options, output_names, error), node.name or node.outputs[0].name)
    return FoldReport(nodes_folded, len(folded), sum(int(t.values.nbytes) for t in folded), options.size_limit_bytes,
                      tally.skipped, tally.examples, error)


def _channel_vector(values: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``values`` as a per-channel ``(channels,)`` vector when, added to a ``[N, C, ...]`` tensor of rank
    ``rank``, it varies along the channel axis only."""
    v = np.asarray(values)
    if v.ndim > rank:
        return None
    shape = (1,) * (rank - v.ndim) + v.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1).astype(np.float64), (channels,)).copy()


def _fuse_one_bias_add(graph: gs.Graph, names: NameSource, add: gs.Node) -> str | None:
    """Fold ``add`` into the bias of the Conv it reads; a reason when it is a near miss, '' when not a
    Conv bias add at all, None when fused."""
    if len(add.inputs) != 2 or len(add.outputs) != 1:
        return ""
    conv_out, const = add.inputs
    if isinstance(conv_out, gs.Constant):
        conv_out, const = const, conv_out
    if not isinstance(const, gs.Constant) or not conv_out.inputs or conv_out.inputs[0].op != "Conv":
        return ""
    layer = match_linear_layer(graph, conv_out.inputs[0])
    if not isinstance(layer, LinearLayer):
        return ""
    if only_consumer(graph, conv_out) is not add:
        return f"Conv output '{conv_out.name}' is read by more than its bias Add"
    values = np.asarray(const.values)
    vec = _channel_vector(values, layer.ndim, layer.out_features)
    if vec is None or values.dtype != np.asarray(layer.nodes[0].inputs[1].values).dtype:
        return f"constant of shape {list(values.shape)} added to a Conv output is not a per-channel bias"
    new_layer = write_linear_layer(graph, names, layer, layer.weight, layer.bias + vec, keep_bias=True)
    y = add.outputs[0]
    add.outputs.clear()
    add.inputs.clear()
    new_layer.nodes[-1].outputs[0] = y
    return None


def fuse_conv_bias_adds(graph: gs.Graph) -> tuple[int, ReasonTally]:
    """``Add(Conv(x, W, b), c)`` with a per-channel constant ``c`` becomes ``Conv(x, W, b + c)``."""
    names = NameSource(graph)
    fused, tally = 0, ReasonTally()
    for node in list(graph.nodes):
        if node.op != "Add" or node.domain not in _DEFAULT_DOMAINS or not node.inputs:
            continue
        reason = _fuse_one_bias_add(graph, names, node)
        if reason is None:
            fused += 1
        elif reason:
            tally.add(reason, node.name)
    if fused:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return fused, tally


def _same_pads(auto_pad: str, kernel: list[int], strides: list[int], dilations: list[int],
               spatial: list | None) -> list[int] | None:
    """Explicit ``pads`` for ``auto_pad=SAME_UPPER/SAME_LOWER`` (None when they depend on an unknown size).

    The output has ``ceil(in / s)`` positions, so the total padding of an axis is
    ``max(0, (ceil(in / s) - 1) * s + d * (k - 1) + 1 - in)``: ``d * (k - 1)`` whatever ``in`` when ``s = 1``.
    The odd unit goes at the end for SAME_UPPER and at the beginning for SAME_LOWER.
    """
    begins, ends = [], []
    for i, (k, s, d) in enumerate(zip(kernel, strides, dilations, strict=True)):
        if s == 1:
            total = d * (k - 1)
        elif spatial is not None and isinstance(spatial[i], int) and spatial[i] > 0:
            size = spatial[i]
            total = max(0, (math.ceil(size / s) - 1) * s + d * (k - 1) + 1 - size)
        else:
            return None
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def explicit_conv_pads(graph: gs.Graph) -> int:
    """``Conv`` with ``auto_pad=SAME_UPPER/SAME_LOWER`` (CNTK, TensorFlow exports) gets the equivalent explicit
    ``pads`` when they do not depend on an unknown input size (always for stride 1); exact."""
    changed = 0
    for node in graph.nodes:
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if node.op != "Conv" or node.domain not in _DEFAULT_DOMAINS or auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        w = node.inputs[1] if len(node.inputs) > 1 else None
        kernel = node.attrs.get("kernel_shape") or (list(w.values.shape[2:]) if isinstance(w, gs.Constant) else None)
        if not kernel:
            continue
        nd = len(kernel)
        x_shape = node.inputs[0].shape
        spatial = list(x_shape[2:]) if x_shape is not None and len(x_shape) == nd + 2 else None
        pads = _same_pads(auto_pad, [int(k) for k in kernel], [int(v) for v in node.attrs.get("strides", [1] * nd)],
                          [int(v) for v in node.attrs.get("dilations", [1] * nd)], spatial)
        if pads is None:
            continue
        node.attrs["auto_pad"] = "NOTSET"
        node.attrs["pads"] = pads
        changed += 1
    return changed


def name_nodes(graph: gs.Graph) -> None:
    """Give every unnamed or duplicate-named node a unique name (reports and statistics key on it)."""
    names = NameSource(graph)
    seen: set[str] = set()
    for node in graph.nodes:
        if not node.name or node.name in seen:
            node.name = names.fresh(f"{node.op}_{node.outputs[0].name if node.outputs else 'node'}")
        seen.add(node.name)


# Ops that only a quantized model holds. DequantizeLinear alone is not one of them: exporters store weights as
# int8 + DequantizeLinear in float models too, and folding those is what lets the passes see the weights.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
    "ConvInteger", "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "QAttention",
})


def quantized_ops(graph: gs.Graph, ops: frozenset[str] = QUANTIZED_OPS) -> dict[str, int]:
    """Op type -> count of the nodes among ``ops`` (by default those that show ``graph`` is quantized already)."""
    found: dict[str, int] = {}
    for n in graph.nodes:
        if n.op in ops:
            found[n.op] = found.get(n.op, 0) + 1
    return found


def canonicalize(graph: gs.Graph, fold_bn: bool = True, ctx: ModelContext | None = None,
                 fold: FoldOptions = FoldOptions()) -> CanonicalizeReport:
    """Bring ``graph`` (mutated in place) into the canonical form the analyses and passes expect.

    ``ctx`` (when given) reports initializers that the source listed as graph inputs; the importer
    already dropped them from the graph's inputs. ``fold`` bounds constant folding.
    """
    name_nodes(graph)
    lifted = lift_constant_nodes(graph)
    dropped = drop_initializer_inputs(graph) + (ctx.initializer_inputs if ctx is not None else 0)
    quantized = quantized_ops(graph)
    if quantized and fold.dequantize:  # keep a quantized model's integer weights integer
        fold = FoldOptions(fold.enabled, fold.size_limit_bytes, dequantize=False)
    folding = fold_constants(graph, fold)
    explicit = explicit_conv_pads(graph)
    activations = fuse_hard_activations(graph)
    fused, tally = fuse_conv_bias_adds(graph)
    folded, bn_tally = fold_batchnorms(graph) if fold_bn else (0, ReasonTally())
    tally.merge(bn_tally.skipped, bn_tally.examples)
    tally.merge(folding.skipped, folding.examples, prefix="constant folding: ")
    return CanonicalizeReport(lifted, dropped, folded, tally.skipped, tally.examples, fused, explicit, folding,
                              quantized, activations)
