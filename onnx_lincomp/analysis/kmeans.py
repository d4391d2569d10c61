"""Weight sharing maths: 1-D k-means codebooks, data-aware rounding to a codebook, codebook refit, Huffman size.

A layer's weight ``W`` (``out x cols``, out-major) is replaced by ``C[I]``: a codebook ``C`` of ``K = 2^b``
floats and an index matrix ``I`` (Deep Compression's weight sharing, Han et al. 2016).

* :func:`kmeans_1d`: Lloyd's algorithm on the weight values, centroids initialised linearly between the
  smallest and largest weight (Deep Compression's choice) or by k-means++. In 1-D the clusters are
  contiguous runs of the sorted values, so one iteration is a ``searchsorted`` plus prefix sums. When the
  weight holds exact zeros (pruned weights) one centroid is pinned at 0 and the zeros stay on it.
* :func:`gptq_round`: sequential rounding with the calibration Hessian ``H = E[x x^T]`` (GPTQ, Frantar et
  al. 2023, with a codebook instead of a uniform grid). Columns are rounded one at a time (largest
  ``H_jj`` first); the rounding error of column ``j`` is pushed onto the columns not yet rounded through
  the upper Cholesky factor ``U`` of ``H^{-1}``: ``W[:, j+1:] -= (w_j - q_j) / U_jj * U[j, j+1:]``, which
  minimises the layer output error ``tr((W - W_q) H (W - W_q)^T)`` greedily.
* :func:`refit_codebook`: with the assignment fixed, ``W_q = sum_k c_k S_k`` is linear in the codebook,
  so the ``c`` minimising ``tr((W - W_q) H (W - W_q)^T)`` solves ``A c = r`` with
  ``A_kl = sum_i s_ik^T H s_il`` and ``r_k = sum_i s_ik^T H w_i`` (``s_ik``: row ``i``'s indicator of
  cluster ``k``). A pinned zero centroid stays 0.
* :func:`huffman_bits`: the Huffman-coded size of the indices (Deep Compression's third stage), the
  archival size estimate reported next to the packed size.

With bias correction the layer's bias absorbs the mean error ``E[(W - W_q) x] = (W - W_q) mu``, and the
error left is the centred one: callers pass the covariance ``E[x x^T] - mu mu^T`` as ``H`` then.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

import numpy as np

Init = Literal["linear", "kmeans++"]
Rounding = Literal["nearest", "gptq"]
KMEANS_ITERATIONS = 100
KMEANS_PP_SAMPLE = 100_000  # values k-means++ draws its seeds from
GPTQ_BLOCK = 128
REFIT_CHUNK_ENTRIES = 1 << 22  # rows x K x cols entries handled at once by the codebook refit


@dataclass(frozen=True)
class SharedWeight:
    """A weight as a codebook and indices: ``codebook[indices]`` is the shared weight."""

    codebook: np.ndarray  # (K,), ascending
    indices: np.ndarray  # same shape as the weight, integers in [0, K)
    zero_pinned: bool = False

    @property
    def weight(self) -> np.ndarray:
        return self.codebook[self.indices]

    @property
    def bits(self) -> int:
        return max(1, int(np.ceil(np.log2(max(self.codebook.size, 2)))))


def _sorted_codebook(codebook: np.ndarray, indices: np.ndarray | None = None):
    """The codebook in ascending order and the indices remapped to it."""
    order = np.argsort(codebook, kind="stable")
    if indices is None:
        return codebook[order], None
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return codebook[order], rank[indices]


def nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of an ascending ``codebook`` for every value (ties to the lower entry)."""
    if codebook.size == 1:
        return np.zeros(np.shape(values), dtype=np.int64)
    mids = (codebook[1:] + codebook[:-1]) / 2
    return np.searchsorted(mids, values, side="left").astype(np.int64)


def _linear_init(values: np.ndarray, k: int) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return np.linspace(lo, hi, k) if k > 1 else np.array([(lo + hi) / 2])


def _kmeans_pp_init(values: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    pool = values if values.size <= KMEANS_PP_SAMPLE else rng.choice(values, KMEANS_PP_SAMPLE, replace=False)
    centres = [float(rng.choice(pool))]
    dist = (pool - centres[0]) ** 2
    for _ in range(1, k):
        total = dist.sum()
        c = float(rng.choice(pool, p=dist / total)) if total > 0 else float(rng.choice(pool))
        centres.append(c)
        dist = np.minimum(dist, (pool - c) ** 2)
    return np.sort(np.asarray(centres))


def kmeans_1d(values: np.ndarray, k: int, init: Init = "linear", keep_zero: bool = False, seed: int = 0,
              iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """An ascending codebook of ``k`` centroids for ``values`` (Lloyd's algorithm in 1-D).

    ``keep_zero``: one centroid is pinned at 0 (exact zeros, pruned weights, stay zero); the other
    ``k - 1`` are fitted to the non-zero values (which still go to 0 when it is their nearest entry).
    """
    flat = np.sort(np.asarray(values, dtype=np.float64).ravel())
    free = k - 1 if keep_zero else k
    fit = flat[flat != 0] if keep_zero else flat
    if free <= 0 or fit.size == 0:
        return np.zeros(k) if fit.size == 0 else np.array([0.0])
    if init == "linear":
        centres = _linear_init(fit, free)
    elif init == "kmeans++":
        centres = _kmeans_pp_init(fit, free, np.random.default_rng(seed))
    else:
        raise ValueError(f"unknown k-means initialisation {init!r}")
    fixed = np.array([0.0]) if keep_zero else np.empty(0)
    prefix = np.concatenate([[0.0], np.cumsum(flat)])
    for _ in range(iterations):
        book = np.concatenate([fixed, centres])
        order = np.argsort(book, kind="stable")
        book = book[order]
        mids = (book[1:] + book[:-1]) / 2
        bounds = np.concatenate([[0], np.searchsorted(flat, mids, side="right"), [flat.size]])
        counts = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        means = np.where(counts > 0, sums / np.maximum(counts, 1), book)
        is_free = order >= fixed.size
        empty = np.flatnonzero((counts == 0) & is_free)
        if empty.size:  # re-seed an empty cluster at the value farthest from its centroid
            err = (flat - np.repeat(book, counts)) ** 2
            for e in empty:
                far = int(np.argmax(err))
                means[e], err[far] = flat[far], 0.0
        new = np.sort(means[is_free])
        if np.allclose(new, np.sort(centres), rtol=0, atol=1e-12 * (np.abs(flat).max() + 1e-30)):
            centres = new
            break
        centres = new
    return np.sort(np.concatenate([fixed, centres]))


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + damp * mean(diag H) I)^{-1}`` (diagonal 1 for dead columns)."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    d = np.arange(h.shape[0])
    lam = damp * float(np.mean(np.diag(h)))
    for _ in range(8):
        try:
            low = np.linalg.cholesky(h + lam * np.eye(h.shape[0]))
            break
        except np.linalg.LinAlgError:
            lam = max(lam * 10, 1e-8)
    else:
        raise np.linalg.LinAlgError("Hessian is not positive definite even with damping")
    inv_low = np.linalg.solve(low, np.eye(h.shape[0]))  # L^{-1}; H^{-1} = L^{-T} L^{-1}
    hinv = inv_low.T @ inv_low
    hinv = (hinv + hinv.T) / 2
    hinv[d, d] += 1e-12 * float(np.mean(np.diag(hinv)))
    return np.linalg.cholesky(hinv).T


def gptq_round(weight: np.ndarray, hessian: np.ndarray, codebook: np.ndarray, pinned: np.ndarray | None = None,
               damp: float = 0.01, act_order: bool = True, block: int = GPTQ_BLOCK) -> np.ndarray:
    """Indices into the ascending ``codebook`` for ``weight`` (``out x cols``), rounded column by column with
    the error pushed onto the columns not yet rounded (``hessian``: ``cols x cols``). ``pinned`` entries
    (exact zeros of a pruned weight) round to the zero centroid whatever the updates."""
    w = np.array(weight, dtype=np.float64)
    out, cols = w.shape
    perm = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(cols)
    w = w[:, perm]
    u = _inverse_cholesky(np.asarray(hessian)[np.ix_(perm, perm)], damp)
    pin = pinned[:, perm] if pinned is not None else None
    zero = int(np.argmin(np.abs(codebook)))
    idx = np.empty((out, cols), dtype=np.int64)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w1 = w[:, start:stop].copy()
        err1 = np.empty((out, stop - start))
        for j in range(stop - start):
            col = w1[:, j]
            q = nearest(col, codebook)
            if pin is not None:
                q[pin[:, start + j]] = zero
            idx[:, start + j] = q
            e = (col - codebook[q]) / u[start + j, start + j]
            w1[:, j:] -= np.outer(e, u[start + j, start + j:stop])
            err1[:, j] = e
        if stop < cols:
            w[:, stop:] -= err1 @ u[start:stop, stop:]
    back = np.empty_like(perm)
    back[perm] = np.arange(cols)
    return idx[:, back]


def output_error(weight: np.ndarray, shared: np.ndarray, hessian: np.ndarray) -> float:
    """``tr((W - W_q) H (W - W_q)^T)``: the summed squared output error the weight change makes."""
    d = np.asarray(weight, dtype=np.float64) - shared
    return float(np.sum((d @ hessian) * d))


def _cluster_gram(indices: np.ndarray, hessian: np.ndarray, k: int) -> np.ndarray:
    """``A = sum_i S_i^T H S_i`` (``k x k``), ``S_i`` the one-hot assignment of row ``i``'s columns."""
    from scipy import sparse

    out, cols = indices.shape
    a = np.zeros(k * k)
    chunk = max(1, REFIT_CHUNK_ENTRIES // max(k * cols, 1))
    for start in range(0, out, chunk):
        idx = indices[start:start + chunk]
        rows = idx.shape[0]
        # P[(i, k), a] = 1 where idx[i, a] == k: P @ H sums H's rows per cluster, for each row i
        p = sparse.csr_matrix((np.ones(rows * cols), ((np.arange(rows)[:, None] * k + idx).ravel(),
                                                      np.tile(np.arange(cols), rows))), shape=(rows * k, cols))
        t = np.asarray(p @ hessian).reshape(rows, k, cols)
        bins = np.arange(k)[None, :, None] * k + idx[:, None, :]
        a += np.bincount(bins.ravel(), weights=t.ravel(), minlength=k * k)
    return a.reshape(k, k)


def refit_codebook(weight: np.ndarray, indices: np.ndarray, codebook: np.ndarray, hessian: np.ndarray,
                   zero_pinned: bool = False) -> np.ndarray:
    """The codebook minimising ``tr((W - C[I]) H (W - C[I])^T)`` for the fixed assignment ``indices``
    (least squares over the codebook values; unused entries and a pinned zero keep their value)."""
    k = codebook.size
    w = np.asarray(weight, dtype=np.float64)
    a = _cluster_gram(indices, hessian, k)
    r = np.bincount(indices.ravel(), weights=(w @ hessian).ravel(), minlength=k)
    free = np.bincount(indices.ravel(), minlength=k) > 0
    if zero_pinned:
        free[int(np.argmin(np.abs(codebook)))] = False
    if not free.any():
        return codebook.copy()
    f = np.flatnonzero(free)
    af = a[np.ix_(f, f)]
    rhs = r[f] - a[np.ix_(f, ~free)] @ codebook[~free]
    lam = 1e-9 * max(float(np.trace(af)) / f.size, 1e-30)
    try:
        sol = np.linalg.solve(af + lam * np.eye(f.size), rhs + lam * codebook[f])
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(af, rhs, rcond=None)[0]
    out = codebook.astype(np.float64).copy()
    out[f] = sol
    return out


def share_weight(weight: np.ndarray, bits: int, hessian: np.ndarray | None = None, init: Init = "linear",
                 rounding: Rounding = "nearest", refit: bool = False, seed: int = 0, damp: float = 0.01,
                 rounds: int = 2) -> SharedWeight:
    """``weight`` (``out x cols``) as ``2^bits`` shared values: k-means codebook, then (with a Hessian) GPTQ
    rounding and/or a codebook refit, alternated ``rounds`` times, keeping the assignment of least output
    error. Exact zeros keep a zero centroid of their own."""
    w = np.asarray(weight, dtype=np.float64)
    k = 1 << bits
    zeros = w == 0
    pin = bool(zeros.any()) and k >= 2
    book = kmeans_1d(w, k, init, keep_zero=pin, seed=seed)
    if book.size < k:
        book = np.concatenate([book, np.full(k - book.size, book[-1] if book.size else 0.0)])
    idx = nearest(w, book)
    if pin:
        idx[zeros] = int(np.argmin(np.abs(book)))
    if hessian is None or (rounding == "nearest" and not refit):
        return SharedWeight(book, idx, pin)
    best = (output_error(w, book[idx], hessian), book, idx)
    for _ in range(max(rounds, 1)):
        if rounding == "gptq":
            idx = gptq_round(w, hessian, book, zeros if pin else None, damp)
        if refit:
            book, idx = _sorted_codebook(refit_codebook(w, idx, book, hessian, pin), idx)
        err = output_error(w, book[idx], hessian)
        if err < best[0]:
            best = (err, book, idx)
        if rounding == "nearest" or not refit:  # nothing changes between rounds then
            break
    return SharedWeight(best[1], best[2], pin)


def huffman_bits(counts: np.ndarray) -> int:
    """Bits of the Huffman code of symbols occurring ``counts`` times (0 for a single symbol)."""
    freq = [int(c) for c in np.asarray(counts).ravel() if c > 0]
    if len(freq) <= 1:
        return 0
    heap = [(f, i) for i, f in enumerate(freq)]  # (weight, tie-break)
    heapq.heapify(heap)
    total, tie = 0, len(freq)
    while len(heap) > 1:
        f1, _ = heapq.heappop(heap)
        f2, _ = heapq.heappop(heap)
        total += f1 + f2  # every symbol below the merged node gets one more bit
        heapq.heappush(heap, (f1 + f2, tie))
        tie += 1
    return total


__all__ = ["Init", "Rounding", "SharedWeight", "kmeans_1d", "nearest", "gptq_round", "refit_codebook",
           "output_error", "share_weight", "huffman_bits"]
