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

from ..errors import OptionError
from ..graph_edit import NameSource, reroute_consumers
from ..linear_layer import LinearLayer, Skip, match_linear_layer, write_linear_layer
from ..relu_sites import ReluSite, find_relu_site, relu_nodes
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan, SkipTally, node_named, option
from .merge_affine import merge_pair

LayerThreshold = int | float | str


@dataclass(frozen=True)
class FoldLinearOptions(PassOptions):
    linear_rate: float = option(1.0, "Fold units positive on at least this fraction of positions (1: exact on the "
                                     "evidence).", flag="--linear-rate")
    layer_threshold: int | float | str = option("auto", "Fold a partly linear layer through a skip path when it has "
                                                "more than N (int) linear units, more than fraction F (float), or "
                                                "'auto' (when the skip path saves parameters).",
                                                flag="--layer-threshold")
    fold_dependent: bool = option(True, "Fold linearly dependent always-active units exactly where no skip path pays.")
    skip_paths: bool = option(True, "Allow skip paths (partial folds add a MatMul from the layer input). optimize "
                                    "measures both forms in onnxruntime and records False here when skip paths are "
                                    "slower.")

    def __post_init__(self):
        t = self.layer_threshold
        if isinstance(t, bool) or (isinstance(t, str) and t != "auto"):
            raise OptionError(f"fold-linear: layer_threshold must be an int, a float or 'auto', got {t!r}")
        if isinstance(t, (int, float)) and t < 0:
            raise OptionError(f"fold-linear: layer_threshold must not be negative, got {t}")
        if not 0.0 < self.linear_rate <= 1.0:
            raise OptionError(f"fold-linear: linear_rate must be in (0, 1], got {self.linear_rate}")


def parse_layer_threshold(text: str) -> LayerThreshold:
    """``--layer-threshold`` text as an int, a float or 'auto' (usage error otherwise)."""
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError as exc:
            raise OptionError(f"--layer-threshold: expected an int, a float or 'auto', got '{text}'") from exc


def skip_pays(threshold: LayerThreshold, k: int, width: int, n_in_total: int, n_out: int) -> bool:
    if isinstance(threshold, str):
        return k * (n_in_total + n_out + 1) - n_in_total * n_out > 0
    if isinstance(threshold, int):
        return k > threshold
    return k / max(width, 1) > threshold


def dependent_units(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Split rows into a basis ``B`` and dependents ``D`` with ``rows[D] = K rows[B]`` (None if independent)."""
    n = rows.shape[0]
    if n <= 1:
        return None
    # one pivoted QR of rows^T gives the rank and a well-conditioned basis at once (a greedy matrix_rank
    # loop cost one SVD per row and dominated sweeps of wide MLPs); fewer rows than features are
    # almost always independent, which the QR shows at the cost of one factorisation
    import scipy.linalg  # imported on first use: scipy costs a third of a second at start-up

    # R only (Q is never used, and is as large as the rows); the copy's transpose is Fortran-ordered, so
    # LAPACK factorises it in place
    r, piv = scipy.linalg.qr(np.array(rows, dtype=np.float64).T, mode="r", pivoting=True, overwrite_a=True)
    diag = np.abs(np.diag(r))
    tol = diag.max(initial=0.0) * max(rows.shape) * np.finfo(np.float64).eps
    rank = int((diag > tol).sum())
    if rank >= n:
        return None
    b = np.sort(piv[:rank])
    d = np.setdiff1d(np.arange(n), b)
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
                                           inputs=[u, gs.Constant(names.fresh("skip_w"),
                                                                  np.ascontiguousarray(s.T.astype(dtype)))],
                                           outputs=[out]))
                parts.append(out)
                added += int(s.size)
            graph.nodes.append(gs.Node("Sum", names.fresh("lincomp_skip_sum"), inputs=parts, outputs=[target]))
        return added


def remove_relu(graph: gs.Graph, relu: gs.Node) -> None:
    reroute_consumers(graph, relu.outputs[0], relu.inputs[0])
    relu.outputs.clear()
    relu.inputs.clear()


class FoldLinearRelu(Pass):
    name = "fold-linear"
    Options = FoldLinearOptions
    summary = "fold always-active units into the next layer (skip paths, dependent units, fully linear layers)"
    options: FoldLinearOptions

    def _plan_site(self, site: ReluSite, ctx: PassContext, tally: SkipTally) -> Match | None:
        units = (ctx.evidence.unit_set(site.relu.name, site.width, linear_rate=self.options.linear_rate)
                 if ctx.evidence else None)
        if units is None:
            tally.add("no statistics for this Relu", site.relu.name)
            return None
        lin = units.linear
        if not lin.any():
            return None
        if lin.all():
            return Match(site.relu.name, "identity", site.width, 0, f"all {site.width} units linear ({units.origin})",
                         {"linear": lin})
        if not site.is_chain:
            tally.add("partial fold needs a Gemm/MatMul producer with one Gemm/MatMul consumer", site.relu.name)
            return None
        k, c = int(lin.sum()), site.consumers[0].layer
        saved = k * (site.producer.in_features + c.out_features + 1) - site.producer.in_features * c.out_features
        return Match(site.relu.name, "fold", k, max(saved, 0), f"{k} of {site.width} units linear ({units.origin})",
                     {"linear": lin})

    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        tally, matches = SkipTally(), []
        for relu in relu_nodes(graph):
            site = find_relu_site(graph, relu)
            if isinstance(site, Skip):
                tally.add(site.reason, relu.name)
                continue
            match = self._plan_site(site, ctx, tally)
            if match is not None:
                matches.append(match)
        return tally.plan(self.name, matches, approximate=self.options.linear_rate < 1.0 and bool(matches))

    def _fold(self, graph, names, book: _SkipBook, site: ReluSite, lin: np.ndarray) -> tuple[np.ndarray, int, str]:
        """Apply the skip fold or the dependent-unit fold; returns (kept indices, folded count, how)."""
        p, c = site.producer, site.consumers[0].layer
        incoming = book.incoming(p.output)
        n_in_total = p.in_features + sum(u_s[1].shape[1] for u_s in incoming)
        k_idx, l_idx = np.flatnonzero(~lin), np.flatnonzero(lin)
        if self.options.skip_paths and skip_pays(self.options.layer_threshold, len(l_idx), site.width, n_in_total,
                                                 c.out_features):
            wl = c.weight[:, l_idx]
            book.add(c.output, p.input, wl @ p.weight_rows(l_idx))
            for u, s in incoming:
                book.add(c.output, u, wl @ s[l_idx])
            write_linear_layer(graph, names, c, c.weight[:, k_idx], c.bias + wl @ p.bias[l_idx])
            write_linear_layer(graph, names, p, p.stored[k_idx], p.bias[k_idx])
            book.keep_rows(p.output, k_idx)
            return k_idx, len(l_idx), "skip"
        if not self.options.fold_dependent:
            return np.arange(site.width), 0, ""
        rows = np.hstack([p.weight_rows(l_idx)] + [s[l_idx] for _, s in incoming])
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
        write_linear_layer(graph, names, p, p.stored[keep], p.bias[keep])
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

    def apply(self, graph: gs.Graph, plan: Plan) -> PassResult:
        names, book, skipped = NameSource(graph), _SkipBook(), Counter(plan.skipped)
        folded = rewritten = relus_removed = merged_into_next = 0
        kept: dict[str, np.ndarray] = {}
        for match in plan.matches:
            relu = node_named(graph, match.site)
            site = find_relu_site(graph, relu) if relu is not None else None
            lin = match.data["linear"]
            if not isinstance(site, ReluSite) or site.width != lin.size:
                skipped["site changed since it was planned"] += 1
                continue
            if match.action == "identity":
                remove_relu(graph, relu)
                if site.is_chain:
                    merged_into_next += self._merge_whole_layer(graph, names, book, site)
                relus_removed += 1
                folded += site.width
                rewritten += 1
                continue
            keep, n, how = self._fold(graph, names, book, site, lin)
            if n:
                kept[match.site] = keep
                folded += n
                rewritten += 1
            elif how == "":
                skipped["folding the linear units would not save parameters"] += 1
        skip_params = book.materialise(graph, names, _weight_dtype(graph))
        notes = (f"{relus_removed} fully linear Relu layers replaced by the identity"
                 f" ({merged_into_next} merged into the next layer)",) if relus_removed else ()
        if skip_params:
            notes += (f"{skip_params} skip-path parameters added",)
        return PassResult(self.name, changed=rewritten > 0, matched=len(plan.matches), rewritten=rewritten,
                          approximate=plan.approximate and rewritten > 0, skipped=dict(skipped),
                          counts={"units_folded": folded, "skip_params": skip_params}, notes=notes, kept=kept)


def _weight_dtype(graph: gs.Graph):
    """The float dtype of the graph's layer weights (skip matrices are stored in it)."""
    for node in graph.nodes:
        if node.op in ("Gemm", "MatMul") and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            dtype = np.asarray(node.inputs[1].values).dtype
            if dtype.kind == "f":
                return dtype
    return np.float32
