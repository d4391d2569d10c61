"""One streaming onnxruntime pass that collects :class:`ReluStats` for every top-level Relu.

How each Relu is observed (chosen per site, cheapest exact form first):

* ``pooled`` (float32 tensors of rank >= 3 with channels on axis 1, i.e. Conv outputs): reduce the Relu
  *output* ``y`` in the graph with ``GlobalMaxPool(y)``, ``GlobalAveragePool(y)`` and
  ``GlobalAveragePool(Clip(DepthwiseConv(y, 2**127), 0, 1))`` (the last is 1 exactly where ``y`` is a
  positive normal float, so its mean times the spatial size is the positive count). These ops stay in
  onnxruntime's blocked NCHWc layout and leave the Conv+Relu fusion intact, which is what keeps the pass
  near plain inference speed; only ``(batch, channels)`` values cross into Python.
* ``direct`` (everything else: Gemm/MatMul outputs, float16, unknown shapes): the pre-activation is a
  graph output and is reduced in numpy; for 2-D outputs that is already ``(batch, channels)``.

Batches stream through; only per-channel accumulators are kept, so memory does not grow with samples.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from ..errors import CalibrationDataError, OptionError
from ..graph_edit import node_bodies
from ..model_io import ModelContext, refresh_value_info, to_model_proto
from ..runtime.feeds import feeds_samples, fixed_batch, iterate_feeds, model_feeds
from ..runtime.session import SessionOptions, SessionScope, ort_message, run_session
from .data_source import CalibrationSource
from .relu_stats import ReluStats, StatsSet

# fixed_batch, iterate_feeds, model_feeds moved to runtime.feeds; re-exported here for older imports
__all__ = ["Capture", "CollectOptions", "Progress", "collect_relu_stats", "collect_with_capture", "fixed_batch",
           "iterate_feeds", "model_feeds"]
logger = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
_BIG = float(2.0**127)
_CHANNEL_FIRST_OPS = {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "MaxPool",
                      "AveragePool", "Resize", "Upsample", "Concat"}
_PASS_THROUGH_OPS = {"Add", "Sub", "Mul", "Div", "Identity", "Dropout", "Clip", "Relu", "LeakyRelu", "Neg",
                     "HardSigmoid", "HardSwish"}


@dataclass(frozen=True)
class CollectOptions:
    batch_size: int = 16
    threads: int = 0  # 0: onnxruntime's default
    mode: Literal["auto", "pre"] = "auto"  # "pre": always observe the pre-activation (exact min/max, slower)

    def __post_init__(self):
        if self.batch_size <= 0:
            raise OptionError(f"batch_size must be positive, got {self.batch_size}")
        if self.mode not in ("auto", "pre"):
            raise OptionError(f"mode must be 'auto' or 'pre', got {self.mode!r}")


@dataclass(frozen=True)
class Capture:
    """Samples ``[start, stop)`` of ``source`` that the statistics session also runs, keeping the model's
    outputs: the reference that verification compares candidates with, so the model need not run again.
    Captured batches are ``batch_size`` samples (the evaluator scores candidates in the same batches)."""

    source: CalibrationSource
    start: int
    stop: int | None
    batch_size: int
    labels: str | None = None


Run = tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]  # (outputs, labels of the batch, samples)


@dataclass(frozen=True)
class _Site:
    relu: str
    pre: str
    post: str
    kind: Literal["pooled", "direct"]
    channel_axis: int
    outputs: tuple[str, ...]
    spatial: int | None = None  # positions per channel when static (else read from a Shape output)


def subgraph_relus(graph: gs.Graph) -> list[tuple[str, str]]:
    """Relus inside If/Loop/Scan bodies: reported as not analysed, never touched."""
    found = []
    for node in graph.nodes:
        for sub in node_bodies(node):
            for inner in sub.nodes:
                if inner.op == "Relu":
                    found.append((inner.name or f"Relu -> {inner.outputs[0].name}",
                                  f"inside the subgraph of {node.op} '{node.name or node.outputs[0].name}'"))
            found.extend(subgraph_relus(sub))
    return found


def channel_axis_of(tensor: gs.Tensor, rank: int | None) -> int:
    """Channel axis of a pre-activation: 1 for Conv-like producers, last for Gemm/MatMul."""
    seen = 0
    t = tensor
    while t.inputs and seen < 16:
        op = t.inputs[0].op
        if op in _CHANNEL_FIRST_OPS:
            return 1
        if op in ("MatMul", "Gemm", "Einsum"):
            return -1 if rank is None else rank - 1
        if op == "Transpose":
            perm = t.inputs[0].attrs.get("perm")
            if perm is not None and rank is not None and list(perm) == [0] + list(range(2, rank)) + [1]:
                return rank - 1
            break
        if op not in _PASS_THROUGH_OPS:
            break
        nxt = [i for i in t.inputs[0].inputs if isinstance(i, gs.Variable)]
        if not nxt:
            break
        t = nxt[0]
        seen += 1
    return 1


def _value_infos(model: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    infos = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            infos[vi.name] = (tt.elem_type, None)
            continue
        infos[vi.name] = (tt.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim])
    return infos


def _relu_shapes_missing(graph: gs.Graph, model: onnx.ModelProto) -> bool:
    infos = _value_infos(model)
    for node in graph.nodes:
        if node.op == "Relu" and node.inputs:
            shape = infos.get(node.inputs[0].name, (None, None))[1]
            if shape is None or (len(shape) > 1 and shape[1] is None):  # rank or channels unknown
                return True
    return False


def plan_sites(graph: gs.Graph, model: onnx.ModelProto, mode: str) -> list[_Site]:
    infos = _value_infos(model)
    sites = []
    for node in graph.nodes:
        if node.op != "Relu" or node.domain not in (None, "", "ai.onnx"):
            continue
        pre, post = node.inputs[0].name, node.outputs[0].name
        elem, shape = infos.get(pre, (None, None))
        rank = None if shape is None else len(shape)
        axis = channel_axis_of(node.inputs[0], rank)
        pooled = (mode == "auto" and elem == TensorProto.FLOAT and rank is not None and rank >= 3 and axis == 1
                  and shape[1] is not None)
        if pooled:
            base = f"__lincomp_{len(sites)}"
            spatial = shape[2:]
            static = all(isinstance(d, int) for d in spatial)
            outputs = (f"{base}_pooled",) if static else (f"{base}_pooled", f"{base}_shape")
            sites.append(_Site(node.name, pre, post, "pooled", 1, outputs,
                               int(np.prod(spatial)) if static else None))
        else:
            sites.append(_Site(node.name, pre, post, "direct", axis, (pre,)))
    return sites


def augment(model: onnx.ModelProto, sites: list[_Site], opset: int) -> onnx.ModelProto:
    """``model`` itself (changed in place: it is the collector's own export, and a copy would double the
    memory of big models) with extra outputs that carry what each site needs."""
    aug = model
    g = aug.graph
    infos = _value_infos(model)
    existing = {o.name for o in g.output}
    for site in sites:
        if site.kind == "direct":
            if site.pre not in existing:
                g.output.append(helper.make_empty_tensor_value_info(site.pre))
                existing.add(site.pre)
            continue
        shape = infos[site.pre][1]
        channels, rank = shape[1], len(shape)
        big = f"{site.outputs[0]}_big"
        g.initializer.append(helper.make_tensor(big, TensorProto.FLOAT, [channels, 1] + [1] * (rank - 2),
                                                np.full(channels, _BIG, np.float32)))
        pooled = site.outputs[0]
        mx, mean, rate = f"{pooled}_max", f"{pooled}_mean", f"{pooled}_rate"
        scaled, clipped = f"{rate}_scaled", f"{rate}_clipped"
        g.node.extend([
            helper.make_node("GlobalMaxPool", [site.post], [mx]),
            helper.make_node("GlobalAveragePool", [site.post], [mean]),
            helper.make_node("Conv", [site.post, big], [scaled], group=channels, kernel_shape=[1] * (rank - 2)),
        ])
        if opset >= 11:
            lo, hi = f"{rate}_lo", f"{rate}_hi"
            g.initializer.extend([helper.make_tensor(lo, TensorProto.FLOAT, [], [0.0]),
                                  helper.make_tensor(hi, TensorProto.FLOAT, [], [1.0])])
            g.node.append(helper.make_node("Clip", [scaled, lo, hi], [clipped]))
        else:
            g.node.append(helper.make_node("Clip", [scaled], [clipped], min=0.0, max=1.0))
        # one Concat: a single small output per site leaves onnxruntime's blocked layout once
        g.node.extend([helper.make_node("GlobalAveragePool", [clipped], [rate]),
                       helper.make_node("Concat", [mx, mean, rate], [pooled], axis=1)])
        if site.spatial is None:  # dynamic spatial size: read it at run time
            g.node.append(helper.make_node("Shape", [site.post], [site.outputs[1]]))
        g.output.extend(helper.make_empty_tensor_value_info(n) for n in site.outputs)
    return aug


def _batch_stats(site: _Site, values: list[np.ndarray]) -> ReluStats:
    if site.kind == "direct":
        z = values[0]
        if z.ndim < 2:
            z = z.reshape(1, -1)
        axis = site.channel_axis if site.channel_axis >= 0 else z.ndim + site.channel_axis
        return ReluStats.from_pre_activation(site.relu, site.pre, z, axis)
    pooled = values[0].reshape(values[0].shape[0], 3, -1)
    spatial = site.spatial if site.spatial is not None else int(np.prod(values[1][2:]))
    return ReluStats.from_pooled(site.relu, site.pre, pooled[:, 0], pooled[:, 1], pooled[:, 2], spatial)


def collect_relu_stats(graph: gs.Graph, ctx: ModelContext, source: CalibrationSource,
                       options: CollectOptions = CollectOptions(), progress: Progress | None = None,
                       stop: int | None = None) -> StatsSet:
    """Run ``source`` through the model once and return statistics of every top-level Relu."""
    return collect_with_capture(graph, ctx, source, options, progress, stop)[0]


def collect_with_capture(graph: gs.Graph, ctx: ModelContext, source: CalibrationSource,
                         options: CollectOptions = CollectOptions(), progress: Progress | None = None,
                         stop: int | None = None, capture: Capture | None = None) -> tuple[StatsSet, list[Run]]:
    """Statistics of samples ``[0, stop)`` and, in the same session, the model's outputs on ``capture``."""
    # the graph's own shapes (inferred on load) choose each site's form; inference runs again only when a
    # Relu input's shape is unknown there (it costs half a second on a ResNet-50)
    model = to_model_proto(graph, ctx, infer_shapes=False, keep_mapped=True)
    if _relu_shapes_missing(graph, model):
        model = refresh_value_info(model)
    sites = plan_sites(graph, model, options.mode)
    not_analysed = tuple(subgraph_relus(graph))
    if not sites:  # nothing to observe; verification runs the original itself
        return StatsSet((), source.description, source.is_random, not_analysed), []
    aug = augment(model, sites, ctx.default_opset)
    names = [n for s in sites for n in s.outputs]
    totals: dict[str, ReluStats] = {}
    done = 0
    total = _span(source, 0, stop) + (_span(capture.source, capture.start, capture.stop) if capture else 0)
    with SessionScope(prefix="lincomp-calib-") as scope:
        sess = scope.open(aug, SessionOptions(threads=options.threads))
        del aug, model  # onnxruntime holds its own copy of the weights
        for feeds, _ in iterate_feeds(graph, source, options.batch_size, 0, stop):
            try:
                values = dict(zip(names, sess.run(names, feeds), strict=True))
            except Exception as exc:  # onnxruntime's own errors: bad shapes or values in the data
                raise CalibrationDataError(f"{source.description}: onnxruntime rejected a calibration batch: "
                                           f"{ort_message(exc)}") from exc
            for site in sites:
                stats = _batch_stats(site, [values[n] for n in site.outputs])
                totals[site.relu] = totals[site.relu].merge(stats) if site.relu in totals else stats
            done += feeds_samples(feeds)
            if progress is not None:
                progress(done, total)
        if not totals:
            raise CalibrationDataError(f"{source.description}: no calibration batch could be run")
        runs = [] if capture is None else list(_captured(sess, graph, capture, done, total, progress))
    stats = StatsSet(tuple(totals[s.relu] for s in sites), source.description, source.is_random, not_analysed)
    return stats, runs


def _span(source: CalibrationSource, start: int, stop: int | None) -> int:
    """Samples in ``[start, stop)`` of ``source``."""
    end = len(source) if stop is None else min(stop, len(source))
    return max(end - start, 0)


def _captured(sess, graph: gs.Graph, capture: Capture, done: int, total: int, progress: Progress | None):
    """(outputs, labels, samples) of every captured batch: the graph's own outputs only."""
    outputs = [t.name for t in graph.outputs]
    seen = done
    for feeds, batch in iterate_feeds(graph, capture.source, capture.batch_size, capture.start, capture.stop):
        values = run_session(sess, outputs, feeds, capture.source.description or "verification")
        labels = {capture.labels: batch[capture.labels]} if capture.labels in batch else {}
        n = feeds_samples(feeds)
        seen += n
        if progress is not None:
            progress(seen, total)
        yield dict(zip(outputs, values, strict=True)), labels, n
