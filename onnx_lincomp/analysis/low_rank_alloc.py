"""Rank allocation for low-rank factorisation: cached group spectra and the ALDS min-max allocator.

A layer's folded weight ``W`` (``f x n``, ``n = c * K`` for a Conv with ``c`` input channels and ``K``
kernel taps, columns ordered channel-major like ``W.reshape(f, -1)``) is cut into ``k`` groups of input
channels ``W = [W_1 ... W_k]`` (``k`` divides ``c``). Each group is approximated by a projection of its
outputs onto ``j`` directions, ``W_i ~ U_i U_i^T W_i``, where ``U_i`` holds the top ``j`` left singular
vectors of ``W_i S_i``: ``S_i = I`` (weight space, plain truncated SVD) or ``S_i = C_ii^{1/2}`` with
``C`` the covariance of the layer's input rows (data-aware: the truncation minimises
``E ||(W_i - W^_i) x_i||^2``; ``U_i`` and the singular values come from the ``f x f`` matrix
``W_i C_ii W_i^T``, so no square root or inverse of ``C`` is ever formed, and the whitening is undone by
construction since the encoder is ``U_i^T W_i``). The layer becomes an encoder (``k * j`` outputs, block
diagonal) and a decoder (``f x k j``): ``j (k f + n)`` weights instead of ``f n``.

Error of layer ``l`` at ``(k, j)``: ALDS's ``max_i sigma_{j+1}(W_i S_i) / ||W S||_2`` ("bound"), exact for
``k = 1`` (Eckart-Young-Mirsky) and a lower bound of the relative operator-norm error otherwise (up to
``sqrt(k)`` times too small); or that error itself ("exact", :meth:`Spectrum.exact_errors`, computed for
every rank from one Cholesky factor of the codes' covariance). The energy baseline uses
``sum_{i>j} sigma_i^2 / sum_i sigma_i^2`` (``k = 1``).

Allocation (Liebenwein et al., NeurIPS 2021): the *global step* fixes every ``k_l`` and finds the
smallest threshold ``t`` whose ranks ``j_l(t) = min{j : e_l(k_l, j) <= t}`` fit the budget (exact
bisection over the finite set of error values; leftover budget is then spent greedily on the layers with
the largest error); the *local step* re-picks each ``k_l`` for the lowest error within the budget the
layer received. The two alternate from several starting ``k`` and the allocation with the lowest
maximum error (then sum of errors) wins. A layer whose factorised form is not smaller than the
original stays dense (error 0), so choices are capped at that size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

ErrorMeasure = Literal["exact", "bound", "energy"]  # bound: ALDS, max over groups of sigma_{j+1} / ||W||
EXACT_GRID = 16  # exact grouped errors at every rank up to this, then at about this many more ranks


def _linalg():
    """scipy.linalg, imported on first use (a quarter of a second at every command's start-up)."""
    import scipy.linalg

    return scipy.linalg


def _cholesky(y: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of the symmetric PSD ``y``, with a diagonal shift grown from 1e-12 of its norm
    until the factorisation succeeds: codes the calibration data never excites (inputs a dead unit feeds, a
    layer whose input hardly varies, rank above the data's) make ``y`` singular to working precision, its
    smallest eigenvalues rounding noise of either sign. Last resort: the eigenvalues clipped at that noise."""
    scale = max(float(np.linalg.norm(y)), 1e-300)
    eye = np.eye(y.shape[0])
    for shift in (1e-12, 1e-9, 1e-6):
        try:
            return _linalg().cholesky(y + shift * scale * eye, lower=True)
        except np.linalg.LinAlgError:
            continue
    values, vectors = np.linalg.eigh((y + y.T) / 2)
    floor = 1e-6 * max(float(np.abs(values).max()), 1e-300)
    return _linalg().cholesky((vectors * np.maximum(values, floor)) @ vectors.T + floor * eye, lower=True)


def divisors(n: int, limit: int) -> tuple[int, ...]:
    """Divisors of ``n`` not above ``limit``."""
    return tuple(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@dataclass
class Spectrum:
    """A layer's folded weight, its input covariance (data-aware) and the group decompositions per ``k``.

    ``mean`` and ``cov`` are the input rows' mean and covariance (``None``: weight space). Group
    decompositions are computed on first use and cached, so an allocation that tries many ``(k, j)``
    decomposes each ``(layer, k)`` once.
    """

    weight: np.ndarray  # f x n, float64
    channels: int
    cov: np.ndarray | None = None
    mean: np.ndarray | None = None
    _groups: dict[int, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict, repr=False)
    _norm: float | None = field(default=None, repr=False)
    _exact: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def cols(self) -> int:
        return int(self.weight.shape[1])

    def rank_max(self, k: int) -> int:
        return min(self.out, self.cols // k)

    def _gram(self, w: np.ndarray, cols: slice | None = None) -> np.ndarray:
        if self.cov is None:
            return w @ w.T
        c = self.cov if cols is None else self.cov[cols, cols]
        return (w @ c) @ w.T

    @property
    def norm(self) -> float:
        """``||W S||_2`` (``S = C^{1/2}`` when data-aware)."""
        if self._norm is None:
            top = float(np.linalg.eigvalsh(self._gram(self.weight))[-1])
            self._norm = math.sqrt(max(top, 0.0)) or 1.0
        return self._norm

    def groups(self, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per group: singular values (descending, ``rank_max(k)`` of them) and left singular vectors of
        ``W_i S_i`` (``S_i S_i^T = C_ii``; ``S_i = I`` in weight space): from the ``f x f`` Gram matrix, or, for a
        group at most half as wide as the layer is tall, from the thin SVD (the cost of the wide-layer k > 1
        groups drops from ``f^3`` each to ``f m^2``)."""
        if k not in self._groups:
            m = self.cols // k
            out = []
            for i in range(k):
                cols = slice(i * m, (i + 1) * m)
                if 2 * m <= self.out:  # a narrow group: the thin SVD of W_i S_i (m x m work), not f x f
                    a = self.weight[:, cols]
                    if self.cov is not None:
                        a = a @ _cholesky(self.cov[cols, cols])
                    vecs, sig, _ = np.linalg.svd(a, full_matrices=False)
                    out.append((sig[: self.rank_max(k)], vecs[:, : self.rank_max(k)]))
                    continue
                vals, vecs = _linalg().eigh(self._gram(self.weight[:, cols], cols), driver="evd")
                order = np.argsort(vals)[::-1][: self.rank_max(k)]
                out.append((np.sqrt(np.clip(vals[order], 0.0, None)), vecs[:, order]))
            self._groups[k] = out
        return self._groups[k]

    def errors(self, k: int, measure: ErrorMeasure = "bound") -> np.ndarray:
        """``e[j]`` for ranks ``j = 0 .. rank_max(k)`` (non-increasing, ``e[rank_max] = 0``)."""
        r = self.rank_max(k)
        if measure == "exact" and k > 1:
            return self.exact_errors(k)
        sig = np.stack([s for s, _ in self.groups(k)])  # k x r
        e = np.zeros(r + 1)
        if measure == "energy":
            energy = (sig ** 2).sum(axis=0)
            tail = np.cumsum(energy[::-1])[::-1]
            e[:r] = tail / max(float(tail[0]), 1e-300)
        else:
            e[:r] = sig.max(axis=0) / self.norm
        return np.minimum.accumulate(e)

    def exact_errors(self, k: int) -> np.ndarray:
        """The relative error of :meth:`factors` at every rank (data-aware: on the data, refit decoder
        included), exact at ranks ``1 .. EXACT_GRID`` and on a geometric grid above, linear in between.

        With the codes ``B x`` (rows ``u_ir^T W_i`` of group ``i``, ordered rank-major) and the least-squares
        decoder, the residual covariance is ``M - X Y^{-1} X^T`` (``M = W C W^T``, ``X = W C B^T``,
        ``Y = B C B^T``); with ``Y = L L^T`` and ``Z = X L^{-T}`` the first ``k j`` columns of ``Z`` give the
        residual at rank ``j``, ``M - Z_{:kj} Z_{:kj}^T``: one Cholesky factor serves every rank. In weight
        space ``Y`` is diagonal and this is ``||[E_1 ... E_k]||_2`` of the per-group truncations."""
        if k in self._exact:
            return self._exact[k]
        r, f = self.rank_max(k), self.out
        groups = self.groups(k)
        blocks = self._blocks(k)  # G[i][i'] = W_i C_ii' W_i'^T
        us = [u for _, u in groups]
        x = np.zeros((f, k * r))
        y = np.zeros((k * r, k * r))
        for i in range(k):
            h = sum(blocks[a][i] for a in range(k))  # sum_i' G_i'i
            x[:, i::k] = h @ us[i]
            for i2 in range(k) if self.cov is not None else (i,):
                y[i::k, i2::k] = us[i].T @ blocks[i][i2] @ us[i2]
        if self.cov is None:  # groups see disjoint columns: Y is diagonal (the squared singular values)
            y[np.diag_indices_from(y)] += 1e-12 * max(float(np.trace(y)) / y.shape[0], 1e-300)
            z = x / np.sqrt(np.diag(y))[None, :]
        else:
            low = _cholesky(y)
            z = _linalg().solve_triangular(low, x.T, lower=True).T
        total = sum(blocks[a][b] for a in range(k) for b in range(k))
        grid = sorted({*range(1, min(r, EXACT_GRID) + 1),
                       *np.unique(np.geomspace(min(r, EXACT_GRID), r, EXACT_GRID).round().astype(int)).tolist()})
        vals = {0: 1.0, r: 0.0}
        for j in grid:
            if j < r:
                zj = z[:, :k * j]
                vals[j] = math.sqrt(max(_top_eig(total - zj @ zj.T), 0.0)) / self.norm
        known = sorted(vals)
        e = np.interp(np.arange(r + 1), known, [vals[j] for j in known])
        self._exact[k] = np.minimum.accumulate(e)
        return self._exact[k]

    def _blocks(self, k: int) -> list[list[np.ndarray]]:
        m, f = self.cols // k, self.out
        w = [self.weight[:, i * m:(i + 1) * m] for i in range(k)]
        if self.cov is None:
            zero = np.zeros((f, f))
            return [[w[i] @ w[i].T if i == i2 else zero for i2 in range(k)] for i in range(k)]
        out = []
        for i in range(k):
            wc = w[i] @ self.cov[i * m:(i + 1) * m]  # f x n
            out.append([wc[:, i2 * m:(i2 + 1) * m] @ w[i2].T for i2 in range(k)])
        return out

    def factors(self, k: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(encoder ``k j x n/k`` stacked by group, decoder ``f x k j``) of rank ``j`` per group, with the
        scale split evenly between the two (encoder rows and decoder columns of equal norm).

        Data-aware with ``k > 1``, the decoder is refit by least squares on the codes of all groups,
        ``D = W C B^T (B C B^T)^{-1}`` (``B`` the block-diagonal encoder), which accounts for the
        correlation between groups that the per-group truncation ignores."""
        m = self.cols // k
        enc = np.vstack([u[:, :j].T @ self.weight[:, i * m:(i + 1) * m] for i, (_, u) in enumerate(self.groups(k))])
        dec = np.hstack([u[:, :j] for _, u in self.groups(k)])
        if self.cov is not None and k > 1:
            block = np.zeros((k * j, self.cols))
            for i in range(k):
                block[i * j:(i + 1) * j, i * m:(i + 1) * m] = enc[i * j:(i + 1) * j]
            cb = self.cov @ block.T
            gram = block @ cb
            gram[np.diag_indices_from(gram)] += 1e-10 * max(float(np.trace(gram)) / gram.shape[0], 1e-300)
            rhs = (self.weight @ cb).T
            try:
                dec = _linalg().solve(gram, rhs, assume_a="pos").T
            except np.linalg.LinAlgError:  # codes the data never excites (a dead input): the minimum-norm fit
                dec = np.linalg.lstsq(gram, rhs, rcond=None)[0].T
        e_norm, d_norm = np.linalg.norm(enc, axis=1), np.linalg.norm(dec, axis=0)
        scale = np.sqrt(np.where((e_norm > 0) & (d_norm > 0), d_norm / np.where(e_norm > 0, e_norm, 1.0), 1.0))
        return enc * scale[:, None], dec / scale[None, :]

    def approximation(self, k: int, j: int) -> np.ndarray:
        enc, dec = self.factors(k, j)
        return np.hstack([dec[:, i * j:(i + 1) * j] @ enc[i * j:(i + 1) * j] for i in range(k)])

    def true_errors(self, approx: np.ndarray) -> tuple[float, float | None]:
        """(relative operator-norm error in weight space, relative error on the data ``||dW C^{1/2}|| /
        ||W C^{1/2}||`` or None in weight space)."""
        delta = self.weight - approx
        weight_err = _op_norm(delta) / max(_op_norm(self.weight), 1e-300)
        if self.cov is None:
            return weight_err, None
        top = float(np.linalg.eigvalsh((delta @ self.cov) @ delta.T)[-1])
        return weight_err, math.sqrt(max(top, 0.0)) / self.norm


def _top_eig(a: np.ndarray) -> float:
    """The largest eigenvalue of the symmetric ``a``."""
    if a.shape[0] <= 256:
        return float(np.linalg.eigvalsh(a)[-1])
    from scipy.sparse.linalg import eigsh

    return float(eigsh(a, k=1, which="LA", tol=1e-6, return_eigenvectors=False)[0])


def _op_norm(a: np.ndarray) -> float:
    """``||a||_2`` from the smaller Gram matrix."""
    g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return math.sqrt(max(float(np.linalg.eigvalsh(g)[-1]), 0.0))


@dataclass(frozen=True)
class Choices:
    """One layer at one ``k``: the ranks it may take, their errors and sizes (last choice: dense, error 0)."""

    k: int
    ranks: np.ndarray  # rank of each choice; 0 for the dense (unfactorised) layer
    errors: np.ndarray  # non-increasing, last 0
    sizes: np.ndarray  # non-decreasing, last = the dense size


def choices(errors: np.ndarray, k: int, out: int, cols: int, weight: float, min_rank: int) -> Choices:
    """The ranks ``min_rank ..`` whose factorised size ``weight * j * (k out + cols)`` is below the dense
    size ``weight * out * cols``, then the dense layer."""
    dense = weight * out * cols
    r = len(errors) - 1
    js = np.arange(max(min_rank, 1), r + 1)
    sizes = weight * js * (k * out + cols)
    keep = sizes < dense
    js, sizes = js[keep], sizes[keep]
    return Choices(k, np.append(js, 0), np.append(errors[js], 0.0), np.append(sizes, dense))


@dataclass(frozen=True)
class Allocation:
    """The choice index per layer (into its :class:`Choices` at ``ks[l]``), the worst error and the size."""

    ks: tuple[int, ...]
    index: tuple[int, ...]
    max_error: float
    sum_error: float
    size: float

    @property
    def objective(self) -> tuple[float, float]:
        return self.max_error, self.sum_error


class Allocator:
    """Min-max allocation over layers given each layer's :class:`Choices` per ``k``."""

    def __init__(self, tables: Sequence[dict[int, Choices]], budget: float, top_up: bool = True):
        self.tables = list(tables)
        self.budget = budget
        self.top_up = top_up

    def min_size(self, ks: Sequence[int] | None = None) -> float:
        if ks is None:
            return float(sum(min(c.sizes[0] for c in t.values()) for t in self.tables))
        return float(sum(t[k].sizes[0] for t, k in zip(self.tables, ks, strict=True)))

    def _result(self, ks: Sequence[int], index: Sequence[int]) -> Allocation:
        errs = [self.tables[li][k].errors[i] for li, (k, i) in enumerate(zip(ks, index, strict=True))]
        size = sum(self.tables[li][k].sizes[i] for li, (k, i) in enumerate(zip(ks, index, strict=True)))
        return Allocation(tuple(ks), tuple(int(i) for i in index), float(max(errs, default=0.0)),
                          float(sum(errs)), float(size))

    def at_threshold(self, ks: Sequence[int], t: float) -> list[int]:
        """Per layer, the first choice whose error is at most ``t``."""
        return [int(np.searchsorted(-self.tables[li][k].errors, -t, side="left")) for li, k in enumerate(ks)]

    def global_step(self, ks: Sequence[int]) -> Allocation | None:
        """The smallest threshold whose choices fit the budget, then a greedy top-up; None if infeasible."""
        if self.min_size(ks) > self.budget:
            return None
        cands = np.unique(np.concatenate([self.tables[li][k].errors for li, k in enumerate(ks)]))
        lo, hi = 0, len(cands) - 1  # the largest threshold always fits (every layer at its first choice)
        while lo < hi:
            mid = (lo + hi) // 2
            idx = self.at_threshold(ks, float(cands[mid]))
            if self._size(ks, idx) <= self.budget:
                hi = mid
            else:
                lo = mid + 1
        index = self.at_threshold(ks, float(cands[lo]))
        if self.top_up:
            index = self._top_up(ks, index)
        return self._result(ks, index)

    def _size(self, ks: Sequence[int], index: Sequence[int]) -> float:
        return float(sum(self.tables[li][k].sizes[i] for li, (k, i) in enumerate(zip(ks, index, strict=True))))

    def _top_up(self, ks: Sequence[int], index: list[int]) -> list[int]:
        """Spend what the threshold left of the budget one rank at a time on the worst layer that fits."""
        left = self.budget - self._size(ks, index)
        for _ in range(20 * len(index) + 100):
            best, best_err = -1, -1.0
            for li, (k, i) in enumerate(zip(ks, index, strict=True)):
                c = self.tables[li][k]
                if i + 1 < len(c.sizes) and c.sizes[i + 1] - c.sizes[i] <= left and c.errors[i] > best_err:
                    best, best_err = li, float(c.errors[i])
            if best < 0 or best_err <= 0.0:
                break
            c = self.tables[best][ks[best]]
            left -= c.sizes[index[best] + 1] - c.sizes[index[best]]
            index[best] += 1
        return index

    def local_step(self, alloc: Allocation) -> tuple[int, ...]:
        """Per layer, the ``k`` with the lowest error within the size the layer received."""
        ks = []
        for li, (k, i) in enumerate(zip(alloc.ks, alloc.index, strict=True)):
            cur = self.tables[li][k]
            room = cur.sizes[i]
            if cur.ranks[i] == 0:  # dense: nothing to improve
                ks.append(k)
                continue
            best, score = k, float(cur.errors[i])
            for k2, c in sorted(self.tables[li].items()):
                j = int(np.searchsorted(c.sizes, room, side="right")) - 1
                if j >= 0 and c.ranks[j] != 0 and float(c.errors[j]) < score - 1e-12:
                    best, score = k2, float(c.errors[j])
            ks.append(best)
        return tuple(ks)

    def alternate(self, start: Sequence[int], rounds: int) -> Allocation | None:
        ks = tuple(start)
        alloc = self.global_step(ks)
        while alloc is None and any(k > 1 for k in ks):  # infeasible: smaller k per layer
            ks = tuple(_snap(max(1, k // 2), self.tables[li]) for li, k in enumerate(ks))
            alloc = self.global_step(ks)
        if alloc is None:
            return None
        for _ in range(rounds):
            new_ks = self.local_step(alloc)
            if new_ks == alloc.ks:
                break
            new = self.global_step(new_ks)
            if new is None or new.objective >= alloc.objective:
                break
            alloc = new
        return alloc

    def alds(self, targets: Sequence[int], rounds: int) -> Allocation | None:
        """The best alternating allocation from every layer at ``k = 1`` and at the feasible ``k`` nearest
        each target (lowest maximum error, then sum of errors)."""
        return min(self.alds_candidates(targets, rounds).values(), key=lambda a: a.objective, default=None)

    def alds_candidates(self, targets: Sequence[int], rounds: int) -> dict[int, Allocation]:
        """The alternating allocation reached from each start (key: the start's target ``k``, 1 for every
        layer at ``k = 1``), without duplicates; a start that reaches an allocation already found is left
        out. A caller that can measure the allocations (on calibration data) chooses among these."""
        starts = {1: tuple(1 for _ in self.tables)}
        for t in targets:
            start = tuple(_snap(t, table) for table in self.tables)
            if start not in starts.values():
                starts.setdefault(t, start)
        out: dict[int, Allocation] = {}
        seen: set[tuple] = set()
        for target, start in starts.items():
            alloc = self.alternate(start, rounds)
            if alloc is not None and (alloc.ks, alloc.index) not in seen:
                seen.add((alloc.ks, alloc.index))
                out[target] = alloc
        return out

    def result(self, picks: Sequence[tuple[int, int]]) -> Allocation:
        """The :class:`Allocation` of given ``(k, choice index)`` per layer (its errors and size)."""
        return self._result([k for k, _ in picks], [i for _, i in picks])


def _snap(target: int, table: dict[int, Choices]) -> int:
    """The ``k`` of ``table`` nearest ``target`` (the smaller on a tie)."""
    return min(table, key=lambda k: (abs(k - target), k))


def uniform_ranks(rank_max: Sequence[int], ratio: float, min_rank: Sequence[int]) -> list[int]:
    """``ceil(ratio * rank_max)`` per layer, at least its minimum rank."""
    return [min(r, max(m, 1, math.ceil(ratio * r - 1e-9))) for r, m in zip(rank_max, min_rank, strict=True)]


__all__ = ["Spectrum", "Choices", "choices", "Allocation", "Allocator", "divisors", "uniform_ranks"]
