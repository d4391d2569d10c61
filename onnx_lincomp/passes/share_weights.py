"""share-weights: k-means weight sharing (Deep Compression) that really shrinks the file.

Each Gemm / MatMul / Conv weight ``W`` becomes ``C[I]``: a codebook ``C`` of ``2^b`` floats (1-D k-means,
linear or k-means++ initialisation, a centroid pinned at 0 when the weight holds exact zeros) and
``b``-bit indices ``I``, stored packed and expanded by ``Gather`` (+ a few integer ops) in front of the
layer (:mod:`..rewrite.codebook`). onnxruntime folds the expansion into a float initializer when the
session starts, so the model runs at float speed; with graph optimisations off it computes the same
weights at every run. The output equals the float model with the shared weights exactly.

**Data-aware rounding** (when calibration data is given, :mod:`..analysis.kmeans`): with the layer's
input moments ``H = E[x x^T]`` and ``mu = E[x]`` (Conv: im2col rows), the indices are chosen by GPTQ-style
sequential rounding to the codebook (``rounding="gptq"``), then the codebook values are re-solved by
least squares for that assignment (``refit_codebook``), both minimising ``tr((W - W_q) H' (W - W_q)^T)``;
with bias correction ``H' = H - mu mu^T`` (the error left once the mean is folded) and the bias absorbs
the expected output shift, ``b' = b + (W - W_q) mu``, which is exact in expectation on the calibration
distribution. Without data: k-means and nearest rounding only.

**Sequential** (default with data): the layers are shared in graph order, each on the inputs ``x_q``
that the layers shared before it produce (one data pass per layer). Its weights are first refit to the
float model's outputs ``y`` at the same rows, ``(W*, b*) = argmin ||y - W' x_q - b'||^2 + lam ||W' - W||^2``
(:func:`..calibration.moments.refit`; exact zeros stay zero), so upstream sharing errors are corrected,
and ``W*`` is then shared as above with ``H`` and ``mu`` of ``x_q``. A layer whose inputs are still float
gets ``W* = W``. With ``sequential`` off every layer is judged on the float model's activations (one
calibration pass for all layers).

The pass is lossy (``optimize`` reports the change; gate it with ``--max-accuracy-drop``) and runs
last: its weights are no longer plain initializers, so no float pass can read them afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..analysis.kmeans import huffman_bits, share_weight
from ..calibration.moments import Moments, collect_layer_moments, refit
from ..errors import OptionError
from ..graph_edit import NameSource
from ..linear_layer import LinearLayer, Skip, match_linear_layer, write_linear_layer
from ..model_io import to_model_proto
from ..rewrite.codebook import CodebookEmitter, index_storage_bytes, layout_for
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan, SkipTally, node_named, option

RoundingChoice = Literal["auto", "nearest", "gptq"]
GRAPH_OVERHEAD_BYTES = 256  # the expansion nodes and their names, per layer (first order)


@dataclass(frozen=True)
class ShareWeightsOptions(PassOptions):
    bits: int = option(4, "Index width of every layer's codebook (1..8 bits: 2^bits shared values per layer).",
                       flag="--bits")
    layers: dict[str, int] = option({}, "Per-layer index widths: node name of a Gemm/MatMul/Conv -> bits (1..8, "
                                        "0 keeps the layer in float); recipe only.")
    init: Literal["linear", "kmeans++"] = option("linear", "Centroid initialisation: linear between the smallest "
                                                           "and largest weight (Deep Compression), or kmeans++.",
                                                 flag="--init")
    rounding: RoundingChoice = option("auto", "Index choice: nearest centroid, or gptq (sequential rounding with the "
                                              "calibration Hessian); auto: gptq when calibration data is given.",
                                      flag="--rounding")
    refit_codebook: bool = option(True, "Re-solve the codebook values by least squares on the calibration "
                                        "activations (needs data).", flag="--refit-codebook")
    bias_correction: bool = option(True, "Fold the expected output shift (W - W_q) E[x] into the bias (needs data).",
                                   flag="--bias-correction")
    sequential: bool = option(True, "Share the layers in graph order, each judged on the inputs the layers shared "
                                    "before it produce and first refit to the float model's outputs (one data "
                                    "pass per layer; needs data).", flag="--sequential")
    damp: float = option(0.01, "GPTQ damping, relative to the mean diagonal of the Hessian.")
    ridge: float = option(1e-3, "Ridge of the sequential refit to the float outputs, relative to the mean input "
                                "energy.")
    seed: int = option(0, "Seed of k-means++ and of the receptive fields sampled from Conv inputs.")

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise OptionError(f"share-weights: bits must be an integer from 1 to 8, got {self.bits!r}")
        for name, b in self.layers.items():
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 8:
                raise OptionError(f"share-weights: bits of layer {name!r} must be an integer from 1 to 8 (0: keep "
                                  f"float), got {b!r}")
        if self.init not in ("linear", "kmeans++"):
            raise OptionError(f"share-weights: init must be linear or kmeans++, got {self.init!r}")
        if self.rounding not in ("auto", "nearest", "gptq"):
            raise OptionError(f"share-weights: rounding must be auto, nearest or gptq, got {self.rounding!r}")
        if not 0 <= self.damp < 1 or self.ridge < 0:
            raise OptionError(f"share-weights: damp must be in [0, 1) and ridge >= 0, got {self.damp}, {self.ridge}")

    def bits_of(self, name: str) -> int:
        return int(self.layers.get(name, self.bits))


def shareable_layers(graph: gs.Graph) -> tuple[list[LinearLayer], list[Skip]]:
    """Every linear layer whose weight could be shared (head node once), and the skips of the others."""
    layers, skips = [], []
    for node in graph.nodes:
        found = match_linear_layer(graph, node)
        if isinstance(found, Skip):
            skips.append(found)
        elif isinstance(found, LinearLayer) and node is found.nodes[0]:
            layers.append(found)
    return layers, skips


def _data_aware(layer: LinearLayer) -> bool:
    return layer.kind != "conv" or layer.group == 1  # moments of grouped Convs are not collected


def _stored_bytes(layer: LinearLayer) -> int:
    return int(np.asarray(layer.nodes[0].inputs[1].values).nbytes)


def layer_moments(graph: gs.Graph, data, seed: int) -> dict[str, Moments]:
    """Input moments of every shareable layer (whatever its bits, so that each layer's rows, sampled per
    layer position in the list, are the same in every run: the bits scan and the replay agree)."""
    layers = [layer for layer in shareable_layers(graph)[0] if _data_aware(layer)]
    return collect_layer_moments(graph, data, layers, seed=seed) if layers else {}


def shared_bytes(layer: LinearLayer, bits: int, opset: int) -> int:
    """Bytes of ``layer``'s weight once shared at ``bits`` (indices and codebook, first order)."""
    itemsize = np.asarray(layer.nodes[0].inputs[1].values).itemsize
    return index_storage_bytes(layer.size, bits, opset) + (1 << bits) * itemsize


def layer_problem(layer: LinearLayer, bits: int, opset: int) -> str | None:
    """Why ``layer`` stays in float at ``bits`` (None: it can be shared)."""
    if bits == 0:
        return "kept in float by the per-layer bits (0)"
    if layout_for(bits, opset) is None:
        return f"opset {opset} has no integer ops to expand packed indices (needs 7)"
    values = np.asarray(layer.nodes[0].inputs[1].values)
    if values.dtype not in (np.float32, np.float64, np.float16):
        return f"weight of type {values.dtype} is not float32/float16/float64"
    if shared_bytes(layer, bits, opset) + GRAPH_OVERHEAD_BYTES >= values.nbytes:
        return "weight too small: the codebook and indices would not be smaller"
    return None


class ShareWeights(Pass):
    name = "share-weights"
    Options = ShareWeightsOptions
    summary = ("k-means weight sharing: each layer's weight as 2^bits shared float values and packed indices "
               "(expanded by Gather, folded by onnxruntime at session start), GPTQ rounding and codebook refit "
               "with calibration data")
    repeatable = False
    runs_last = True
    lossy = True
    options: ShareWeightsOptions

    def rounding_for(self, has_data: bool) -> str:
        """The rounding in force: ``auto`` is gptq with calibration data, nearest without."""
        o = self.options
        if o.rounding == "gptq" and not has_data:
            raise OptionError("share-weights: rounding 'gptq' needs calibration data (--calib); use --rounding "
                              "nearest to share from the weights alone")
        return ("gptq" if has_data else "nearest") if o.rounding == "auto" else o.rounding

    # ---- plan -------------------------------------------------------------------------------------------
    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        rounding = self.rounding_for(ctx.data is not None)
        o = self.options
        needs_data = ctx.data is not None and (rounding == "gptq" or o.refit_codebook or o.bias_correction)
        sites, _ = self.sites(graph)  # validates the per-layer names before the data pass
        if needs_data and sites and o.sequential:
            stream = {"data": ctx.data, "reference": to_model_proto(graph, ctx.data.ctx, infer_shapes=False)}
            return self.plan_with_moments(graph, {}, rounding, stream)
        moments = layer_moments(graph, ctx.data, o.seed) if needs_data and sites else {}
        return self.plan_with_moments(graph, moments, rounding)

    def sites(self, graph: gs.Graph) -> tuple[list[tuple[LinearLayer, int]], SkipTally]:
        """The layers to share with their bits, and why the others are not (unknown per-layer names raise)."""
        tally = SkipTally()
        layers, skips = shareable_layers(graph)
        self._check_layer_names(layers, skips)
        for skip in skips:
            tally.add(skip.reason, skip.node)
        opset = graph_opset(graph)
        chosen = []
        for layer in layers:
            bits = self.options.bits_of(layer.name)
            problem = layer_problem(layer, bits, opset)
            if problem:
                tally.add(problem, layer.name)
            else:
                chosen.append((layer, bits))
        return chosen, tally

    def plan_with_moments(self, graph: gs.Graph, moments: dict[str, Moments], rounding: str,
                          stream: dict | None = None) -> Plan:
        """The plan given each layer's input moments on the calibration data (layers without: from the
        weights alone), or ``stream`` (the data and the float model) to collect them layer by layer as
        the layers before are shared. The bits scan calls this with moments collected once for every run."""
        chosen, tally = self.sites(graph)
        opset = graph_opset(graph)
        matches = []
        for layer, bits in chosen:
            before = _stored_bytes(layer)
            after = shared_bytes(layer, bits, opset)
            sequential = stream if stream is not None and _data_aware(layer) else None
            how = rounding if layer.name in moments or sequential is not None else "nearest"
            matches.append(Match(layer.name, "share", layer.size, 0,
                                 f"{bits}-bit codebook, {how} rounding, {before:,} -> ~{after:,} bytes",
                                 {"bits": bits, "moments": moments.get(layer.name), "rounding": how,
                                  "stream": sequential}))
        return tally.plan(self.name, matches, approximate=bool(matches))

    def _check_layer_names(self, layers: list[LinearLayer], skips: list[Skip]) -> None:
        known = {layer.name for layer in layers}
        skipped = {s.node: s.reason for s in skips}
        for name in self.options.layers:
            if name in known:
                continue
            if name in skipped:
                raise OptionError(f"share-weights: layer '{name}' cannot be shared ({skipped[name]})")
            raise OptionError(f"share-weights: unknown layer '{name}' in the per-layer bits (give the node name of a "
                              f"Gemm/MatMul/Conv; known: {', '.join(sorted(known)[:8]) or 'none'})")

    # ---- apply ------------------------------------------------------------------------------------------
    def apply(self, graph: gs.Graph, plan: Plan) -> PassResult:
        o, tally = self.options, SkipTally()
        file_before = _graph_bytes(graph) if plan.matches else None
        names = NameSource(graph)
        emitter = CodebookEmitter(graph, names, graph_opset(graph))
        totals = {"layers_shared": 0, "weights_shared": 0, "bytes_before": 0, "bytes_after": 0,
                  "index_bytes": 0, "codebook_bytes": 0, "huffman_index_bytes": 0, "biases_corrected": 0}
        ways: dict[str, int] = {}
        for match in plan.matches:
            node = node_named(graph, match.site)
            layer = match_linear_layer(graph, node) if node is not None else None
            if not isinstance(layer, LinearLayer) or layer.size != match.units:
                tally.add("site changed since it was planned", match.site)
                continue
            self._share_one(graph, names, emitter, layer, match, totals)
            aware = match.data["moments"] is not None or match.data["stream"] is not None
            way = match.data["rounding"] + ("+refit" if o.refit_codebook and aware else "")
            way += " sequential" if match.data["stream"] is not None else ""
            ways[way] = ways.get(way, 0) + 1
        skipped = dict(plan.skipped)
        for why, n in tally.counts.items():
            skipped[why] = skipped.get(why, 0) + n
        if file_before is not None and totals["layers_shared"]:
            graph.cleanup(remove_unused_graph_inputs=False)
            after = _graph_bytes(graph)
            if after is not None:
                totals.update(file_bytes_before=file_before, file_bytes_after=after)
        return PassResult(self.name, changed=totals["layers_shared"] > 0, matched=len(plan.matches),
                          rewritten=totals["layers_shared"], approximate=totals["layers_shared"] > 0,
                          skipped=skipped, counts=totals, notes=_notes(totals, ways))

    def _share_one(self, graph: gs.Graph, names: NameSource, emitter: CodebookEmitter, layer: LinearLayer,
                   match: Match, totals: dict[str, int]) -> None:
        o, bits = self.options, match.data["bits"]
        w, bias = layer.weight.reshape(layer.out_features, -1), layer.bias
        moments: Moments | None = match.data["moments"]
        if match.data["stream"] is not None:  # inputs as the layers shared so far make them
            graph.toposort()
            stream = match.data["stream"]
            moments = collect_layer_moments(graph, stream["data"], [layer], stream["reference"], seed=o.seed)[
                layer.name]
            pruned = w == 0
            w, bias = refit(moments, np.arange(moments.cols), w, bias, o.ridge)  # towards the float outputs
            w[pruned] = 0.0  # pruned weights stay pruned (and keep their zero centroid)
        hessian, mean = _hessian(moments, o.bias_correction) if moments is not None else (None, None)
        shared = share_weight(w, bits, hessian, o.init, match.data["rounding"],
                              o.refit_codebook and hessian is not None, o.seed, o.damp)
        dtype = np.asarray(layer.nodes[0].inputs[1].values).dtype
        codebook = shared.codebook.astype(dtype)
        w_q = codebook[shared.indices].astype(np.float64)
        if o.bias_correction and mean is not None:
            bias = bias + (w - w_q) @ mean
            totals["biases_corrected"] += 1
        before = _stored_bytes(layer)
        original = layer.nodes[0].inputs[1]
        weight_name = original.name
        new = write_linear_layer(graph, names, layer, w_q.reshape(layer.shape), bias)
        original.name = names.fresh(f"{weight_name}_float")  # no longer read: cleanup drops it
        stored = shared.indices.reshape(layer.shape)
        if layer.kind == "matmul":
            stored = stored.T  # MatMul stores (in, out)
        emitted = emitter.emit(f"cb{totals['layers_shared']}", codebook, stored, bits, output=weight_name)
        new.nodes[0].inputs[1] = emitted.tensor
        if new.kind == "gemm":  # write_linear_layer spells out the defaults: a small model's file notices
            for key, default in (("transA", 0), ("alpha", 1.0), ("beta", 1.0)):
                if new.nodes[0].attrs.get(key) == default:
                    del new.nodes[0].attrs[key]
        totals["layers_shared"] += 1
        totals["weights_shared"] += int(w.size)
        totals["bytes_before"] += before
        totals["bytes_after"] += emitted.index_bytes + emitted.codebook_bytes
        totals["index_bytes"] += emitted.index_bytes
        totals["codebook_bytes"] += emitted.codebook_bytes
        counts = np.bincount(shared.indices.ravel(), minlength=codebook.size)
        totals["huffman_index_bytes"] += (huffman_bits(counts) + 7) // 8


def graph_opset(graph: gs.Graph) -> int:
    return int(getattr(graph, "opset", None) or onnx.defs.onnx_opset_version())


def _graph_bytes(graph: gs.Graph) -> int | None:
    """Serialized size of the graph (the model file less its model-level fields); None above 1 GiB."""
    constant_bytes = sum(t.values.nbytes for t in graph.tensors().values() if isinstance(t, gs.Constant))
    if constant_bytes > 1 << 30:
        return None
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]  # the shapes graphsurgeon lists are not part of the saved file
    return model.ByteSize()


def _hessian(m: Moments, centred: bool) -> tuple[np.ndarray, np.ndarray]:
    """(``E[x x^T]``, or the covariance when the mean error goes to the bias; ``E[x]``)."""
    n = max(m.rows, 1)
    mean = m.mean
    h = m.gram[:-1, :-1] / n
    if centred:
        h = h - np.outer(mean, mean)
    return (h + h.T) / 2, mean


def _notes(t: dict[str, int], ways: dict[str, int]) -> tuple[str, ...]:
    if not t["layers_shared"]:
        return ()
    ratio = t["bytes_before"] / max(t["bytes_after"], 1)
    size = (f"file {t['file_bytes_before']:,} -> {t['file_bytes_after']:,} bytes "
            f"({t['file_bytes_before'] / max(t['file_bytes_after'], 1):.1f}x smaller); " if "file_bytes_after" in t
            else "")
    return (size + "onnxruntime folds the codebooks back into float weights at session start",
            f"{t['layers_shared']} layer(s), {t['weights_shared']:,} weights shared "
            f"({', '.join(f'{n} {w}' for w, n in sorted(ways.items()))})",
            f"shared weights stored in {t['bytes_after']:,} bytes instead of {t['bytes_before']:,} ({ratio:.1f}x): "
            f"indices {t['index_bytes']:,}, codebooks {t['codebook_bytes']:,}",
            f"Huffman-coded indices (archival estimate): {t['huffman_index_bytes']:,} bytes "
            f"({t['huffman_index_bytes'] / max(t['index_bytes'], 1):.0%} of the packed indices)",
            f"bias correction folded into {t['biases_corrected']} layer(s)" if t["biases_corrected"]
            else "no bias correction (needs calibration data)")


__all__ = ["ShareWeights", "ShareWeightsOptions", "shareable_layers", "shared_bytes", "layer_problem", "layer_moments",
           "graph_opset"]
