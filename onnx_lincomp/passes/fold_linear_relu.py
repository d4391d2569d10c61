"""fold-linear: Relu units that are always active act as the identity; fold them away.

For a chain ``z1 = W1 x + b1 -> relu -> z2 = W2 h + b2`` (Gemm/MatMul) split the units of layer 1 into
the linear set ``L`` (positive on every calibration position, or on at least ``linear_rate``) and the
rest ``K``. Since ``relu(z1[L]) = z1[L]``:

    z2 = W2[:, K] relu(z1[K]) + (W2[:, L] W1[L, :]) x + (b2 + W2[:, L] b1[L])

so rows ``L`` of ``W1, b1`` and columns ``L`` of ``W2`` go, the skip matrix ``S = W2[:, L] W1[L, :]`` maps
the layer input straight into ``z2``, and the bias is folded. When layer 1 already receives skips
``S_j u_j`` the linear units carry them too: the new skips are ``W2[:, L] S_j[L, :]`` from each source
``u_j`` (one MatMul per source tensor, no Concat). The fold is applied only when it saves parameters:
``layer_threshold`` "auto" uses ``k (n_in' + n_out + 1) - n_in' n_out > 0`` with ``n_in'`` the true total
skip-input width (Dobler & Lemmerich, with the width term corrected); an int needs more than that many
linear units, a float more than that fraction.

Where the skip does not pay, linearly dependent linear units still fold exactly (Serra et al. 2021):
with a row basis ``B`` of the linear units' effective weights and ``W[D] = K W[B]`` for the others,
``z_D = K (z_B - b_B) + b_D`` on the data, hence ``W2[:, B] += W2[:, D] K``,
``b2 += W2[:, D] (b_D - K b_B)`` and ``D`` is deleted. A fully linear layer loses its Relu (the affine
pair is merged by merge-affine when cheaper). Conv layers are handled only in that whole-layer case.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph_edit import NameSource, reroute_consumers
from ..linear_layer import LinearLayer, Skip, match_linear_layer, write_linear_layer
from .merge_affine import merge_pair
from ..relu_sites import ReluSite, find_relu_site, relu_nodes
from .base import PassContext, PassResult

LayerThreshold = int | float | str


@dataclass(frozen=True)
class FoldLinearOptions:
    layer_threshold: LayerThreshold = "auto"
    fold_dependent: bool = True

    def __post_init__(self):
        t = self.layer_threshold
        if isinstance(t, str) and t != "auto":
            raise ValueError(f"layer_threshold must be an int, a float or 'auto', got {t!r}")


def parse_layer_threshold(text: str) -> LayerThreshold:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError as exc:
            raise ValueError(f"--layer-threshold: expected an int, a float or 'auto', got '{text}'") from exc


def skip_pays(threshold: LayerThreshold, k: int, width: int, n_in_total: int, n_out: int) -> bool:
    if isinstance(threshold, str):
        return k * (n_in_total + n_out + 1) - n_in_total * n_out > 0
    if isinstance(threshold, int):
        return k > threshold
    return k / max(width, 1) > threshold


def dependent_units(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Split rows into a basis ``B`` and dependents ``D`` with ``rows[D] = K rows[B]`` (None if independent)."""
    if rows.shape[0] <= 1:
        return None
    rank = np.linalg.matrix_rank(rows)
    if rank >= rows.shape[0]:
        return None
    basis: list[int] = []
    for i in range(rows.shape[0]):  # greedy: keep a row when it raises the rank
        if np.linalg.matrix_rank(rows[basis + [i]]) > len(basis):
            basis.append(i)
        if len(basis) == rank:
            break
    b = np.array(basis)
    d = np.setdiff1d(np.arange(rows.shape[0]), b)
    k, *_ = np.linalg.lstsq(rows[b].T, rows[d].T, rcond=None)
    k = k.T
    scale = max(np.abs(rows).max(), 1e-30)
    if np.abs(k @ rows[b] - rows[d]).max() > 1e-9 * scale * rows.shape[1]:
        return None
    return b, d, k


class _SkipBook:
    """Skip contributions ``S @ u`` into layer outputs, materialised as MatMul + Sum at the end."""

    def __init__(self):
        self.into: dict[str, list[tuple[gs.Tensor, np.ndarray]]] = {}

    def incoming(self, tensor: gs.Tensor) -> list[tuple[gs.Tensor, np.ndarray]]:
        return self.into.get(tensor.name, [])

    def add(self, target: gs.Tensor, source: gs.Tensor, matrix: np.ndarray) -> None:
        entries = self.into.setdefault(target.name, [])
        for i, (u, s) in enumerate(entries):
            if u is source:
                entries[i] = (u, s + matrix)
                return
        entries.append((source, matrix))

    def keep_rows(self, target: gs.Tensor, rows: np.ndarray) -> None:
        if target.name in self.into:
            self.into[target.name] = [(u, s[rows]) for u, s in self.into[target.name]]

    def materialise(self, graph: gs.Graph, names: NameSource, dtype) -> int:
        added = 0
        tensors = graph.tensors()
        for target_name, entries in self.into.items():
            target = tensors[target_name]
            last = target.inputs[0]
            main = gs.Variable(names.fresh(f"{target.name}_main"), dtype=target.dtype)
            last.outputs[0] = main
            parts = [main]
            for u, s in entries:
                out = gs.Variable(names.fresh(f"{target.name}_skip"), dtype=target.dtype)
                graph.nodes.append(gs.Node("MatMul", names.fresh("lincomp_skip_matmul"),
                                           inputs=[u, gs.Constant(names.fresh("skip_w"), np.ascontiguousarray(s.T.astype(dtype)))],
                                           outputs=[out]))
                parts.append(out)
                added += int(s.size)
            graph.nodes.append(gs.Node("Sum", names.fresh("lincomp_skip_sum"), inputs=parts, outputs=[target]))
        return added


def remove_relu(graph: gs.Graph, relu: gs.Node) -> None:
    reroute_consumers(graph, relu.outputs[0], relu.inputs[0])
    relu.outputs.clear()
    relu.inputs.clear()


class FoldLinearRelu:
    name = "fold-linear"

    def __init__(self, options: FoldLinearOptions = FoldLinearOptions()):
        self.options = options

    def _linear_mask(self, ctx: PassContext, relu: str, width: int) -> np.ndarray | None:
        stats = ctx.stats.get(relu) if ctx.stats else None
        if stats is None or stats.channels != width:
            return None
        if ctx.linear_rate >= 1.0:
            return stats.always_active & ~stats.dead
        return (stats.position_rate >= ctx.linear_rate) & ~stats.dead

    def _fold(self, graph, names, book: _SkipBook, site: ReluSite, lin: np.ndarray) -> tuple[np.ndarray, int, str]:
        """Apply the skip fold or the dependent-unit fold; returns (kept indices, folded count, how)."""
        p, c = site.producer, site.consumers[0].layer
        incoming = book.incoming(p.output)
        n_in_total = p.in_features + sum(u_s[1].shape[1] for u_s in incoming)
        k_idx, l_idx = np.flatnonzero(~lin), np.flatnonzero(lin)
        if skip_pays(self.options.layer_threshold, len(l_idx), site.width, n_in_total, c.out_features):
            wl = c.weight[:, l_idx]
            book.add(c.output, p.input, wl @ p.weight[l_idx])
            for u, s in incoming:
                book.add(c.output, u, wl @ s[l_idx])
            write_linear_layer(graph, names, c, c.weight[:, k_idx], c.bias + wl @ p.bias[l_idx])
            write_linear_layer(graph, names, p, p.weight[k_idx], p.bias[k_idx])
            book.keep_rows(p.output, k_idx)
            return k_idx, len(l_idx), "skip"
        if not self.options.fold_dependent:
            return np.arange(site.width), 0, ""
        rows = np.hstack([p.weight[l_idx]] + [s[l_idx] for _, s in incoming])
        found = dependent_units(rows)
        if found is None:
            return np.arange(site.width), 0, ""
        b, d, kmat = found
        b_u, d_u = l_idx[b], l_idx[d]
        w2 = c.weight.copy()
        w2[:, b_u] += c.weight[:, d_u] @ kmat
        bias2 = c.bias + c.weight[:, d_u] @ (p.bias[d_u] - kmat @ p.bias[b_u])
        keep = np.setdiff1d(np.arange(site.width), d_u)
        write_linear_layer(graph, names, c, w2[:, keep], bias2)
        write_linear_layer(graph, names, p, p.weight[keep], p.bias[keep])
        book.keep_rows(p.output, keep)
        return keep, len(d_u), "dependent"

    @staticmethod
    def _merge_whole_layer(graph, names, book: _SkipBook, site: ReluSite) -> int:
        """Merge a fully linear layer into its consumer now (so later folds skip from the narrower input).

        Skips pending into the layer's output are carried through the consumer: ``S -> W2 S``.
        """
        p = site.producer
        c = match_linear_layer(graph, site.consumers[0].layer.nodes[0])
        if not isinstance(c, LinearLayer) or merge_pair(graph, names, p, c) is not None:
            return 0
        for u, s in book.into.pop(p.output.name, []):
            book.add(c.output, u, c.weight @ s)
        return 1

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        names = NameSource(graph)
        book = _SkipBook()
        skipped: Counter = Counter()
        folded = rewritten = matched = relus_removed = merged_into_next = 0
        kept: dict[str, np.ndarray] = {}
        dtype = np.float32
        for relu in relu_nodes(graph):
            site = find_relu_site(graph, relu)
            if isinstance(site, Skip):
                skipped[site.reason] += 1
                continue
            matched += 1
            lin = self._linear_mask(ctx, relu.name, site.width)
            if lin is None:
                skipped["no statistics for this Relu"] += 1
                continue
            if not lin.any():
                continue
            dtype = np.asarray(site.producer.nodes[0].inputs[1].values).dtype
            if lin.all():
                remove_relu(graph, relu)
                if site.is_chain:
                    merged_into_next += self._merge_whole_layer(graph, names, book, site)
                relus_removed += 1
                folded += site.width
                rewritten += 1
                continue
            if not site.is_chain:
                skipped["partial fold needs a Gemm/MatMul producer with one Gemm/MatMul consumer"] += 1
                continue
            keep, n, how = self._fold(graph, names, book, site, lin)
            if n:
                kept[relu.name] = keep
                folded += n
                rewritten += 1
            elif how == "":
                skipped["folding the linear units would not save parameters"] += 1
        skip_params = book.materialise(graph, names, dtype)
        notes = (f"{relus_removed} fully linear Relu layers replaced by the identity"
                 f" ({merged_into_next} merged into the next layer)",) if relus_removed else ()
        if skip_params:
            notes += (f"{skip_params} skip-path parameters added",)
        return PassResult(self.name, changed=rewritten > 0, matched=matched, rewritten=rewritten,
                          neurons_folded=folded, approximate=ctx.linear_rate < 1.0, skipped=dict(skipped),
                          notes=notes, kept=kept)
