"""The per-unit MILP: can unit ``i`` of layer ``k`` take the sign ``s`` anywhere on the box?

Only what the target can feel is encoded: its *cone*, the units of earlier layers joined to it by
non-zero weights (a unit whose upper bound is <= 0 outputs 0 and is left out). With ``c = -s W_k[i]`` the
objective ``min c @ h_{k-1}`` is below ``s b_k[i]`` exactly when some input gives ``s z_{k,i} > 0``.

Per encoded unit ``j`` with bounds ``l < u`` (Serra et al. 2021 big-M form):
- stably active (``l >= 0``): ``h = W h_prev + b``;
- unstable in the last encoded layer with ``c_j > 0``: the objective pushes ``h`` down, so
  ``h >= W h_prev + b``, ``h >= 0`` is exact (no binary): the minimum sits on ``h = relu(z)``;
- every other unstable unit: ``z = W h_prev + b``, ``h >= z``, ``h <= z - l (1 - d)``, ``h <= u d``,
  ``h >= 0``, ``d`` binary.
Dropping the binaries gives the per-unit LP relaxation. Both are relaxations of the network on the box
for the target's question, so "no point below the threshold" in either is a proof.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .chain import AffineChain
from .highs_model import SparseProgram


@dataclass(frozen=True)
class UnitQuery:
    layer: int
    unit: int
    sign: float  # +1: can z be > 0 (candidate stably inactive); -1: can z be < 0 (candidate stably active)

    @property
    def key(self) -> tuple[int, int]:
        return self.layer, self.unit


@dataclass(frozen=True, eq=False)
class UnitProgram:
    program: SparseProgram
    threshold: float  # a point with cost below it flips the target
    n_inputs: int  # the input x is v[:n_inputs]
    encoded_units: int


def cone(chain: AffineChain, upper: list[np.ndarray], k: int, i: int) -> list[np.ndarray]:
    """Per layer before ``k``: the units that can influence unit ``i`` of layer ``k``."""
    need: list[np.ndarray] = [np.zeros(0, int)] * k
    weights = chain.layers[k].weight[i][None, :]
    for m in range(k - 1, -1, -1):
        reach = np.any(weights != 0, axis=0) & (upper[m] > 0)
        need[m] = np.flatnonzero(reach)
        weights = chain.layers[m].weight[need[m]]
    return need


class _Builder:
    """Columns and sparse rows, appended block by block."""

    def __init__(self):
        self.lower: list[np.ndarray] = []
        self.upper: list[np.ndarray] = []
        self.integer: list[np.ndarray] = []
        self.n = 0
        self.r, self.c, self.v = [], [], []
        self.rlo: list[np.ndarray] = []
        self.rhi: list[np.ndarray] = []
        self.m = 0

    def cols(self, lower: np.ndarray, upper: np.ndarray, integer: bool = False) -> np.ndarray:
        idx = np.arange(self.n, self.n + lower.size)
        self.lower.append(np.asarray(lower, np.float64))
        self.upper.append(np.asarray(upper, np.float64))
        self.integer.append(np.full(lower.size, integer))
        self.n += lower.size
        return idx

    def rows(self, terms: list[tuple[np.ndarray, np.ndarray, np.ndarray]], lo: np.ndarray, hi: np.ndarray) -> None:
        """Rows ``lo <= sum of terms <= hi``; a term is (row offsets, column indices, values)."""
        for rr, cc, vv in terms:
            self.r.append(self.m + rr)
            self.c.append(cc)
            self.v.append(vv)
        self.rlo.append(np.asarray(lo, np.float64))
        self.rhi.append(np.asarray(hi, np.float64))
        self.m += lo.size

    def dense(self, weight: np.ndarray, prev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The term ``-weight @ v[prev]`` for rows 0..len(weight)-1 (zeros skipped)."""
        rr, cc = np.nonzero(weight)
        return rr, prev[cc], -weight[rr, cc]

    def program(self, cost: np.ndarray) -> SparseProgram:
        rows = sp.csr_matrix((np.concatenate(self.v), (np.concatenate(self.r), np.concatenate(self.c))),
                             shape=(self.m, self.n)) if self.m else sp.csr_matrix((0, self.n))
        return SparseProgram(cost, np.concatenate(self.lower), np.concatenate(self.upper),
                             np.concatenate(self.integer), rows,
                             np.concatenate(self.rlo) if self.m else np.zeros(0),
                             np.concatenate(self.rhi) if self.m else np.zeros(0))


def _one(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.arange(idx.size), idx, np.ones(idx.size)


def encode_unit(chain: AffineChain, lower: list[np.ndarray], upper: list[np.ndarray], lo: np.ndarray,
                hi: np.ndarray, query: UnitQuery) -> UnitProgram:
    """The per-unit MILP of ``query`` over the box ``[lo, hi]`` with pre-activation bounds ``lower``/``upper``."""
    k, i, s = query.layer, query.unit, query.sign
    need = cone(chain, upper, k, i)
    b = _Builder()
    prev = b.cols(lo, hi)
    n0 = prev.size
    target = chain.layers[k].weight[i]
    encoded = 0
    for m in range(k):
        units = need[m]
        w = chain.layers[m].weight[units]
        w = w[:, need[m - 1]] if m > 0 else w
        bias, lw, up = chain.layers[m].bias[units], lower[m][units], upper[m][units]
        h = np.zeros(units.size, int)
        act = lw >= 0
        push_down = ~act & (-s * target[units] > 0) if m == k - 1 else np.zeros(units.size, bool)
        full = ~act & ~push_down
        if act.any():
            h[act] = b.cols(lw[act], up[act])
            rr, cc, vv = b.dense(w[act], prev)
            b.rows([_one(h[act]), (rr, cc, vv)], bias[act], bias[act])  # h - W h_prev = b
        if push_down.any():
            h[push_down] = b.cols(np.zeros(push_down.sum()), up[push_down])
            rr, cc, vv = b.dense(w[push_down], prev)
            b.rows([_one(h[push_down]), (rr, cc, vv)], bias[push_down], np.full(push_down.sum(), np.inf))
        if full.any():
            n, lf, uf = int(full.sum()), lw[full], up[full]
            z = b.cols(lf, uf)
            hf = b.cols(np.zeros(n), uf)
            d = b.cols(np.zeros(n), np.ones(n), integer=True)
            h[full] = hf
            rr, cc, vv = b.dense(w[full], prev)
            b.rows([_one(z), (rr, cc, vv)], bias[full], bias[full])  # z - W h_prev = b
            ar, ones = np.arange(n), np.ones(n)
            b.rows([_one(hf), (ar, z, -ones)], np.zeros(n), np.full(n, np.inf))  # h >= z
            b.rows([_one(hf), (ar, z, -ones), (ar, d, -lf)], np.full(n, -np.inf), -lf)  # h <= z - l(1-d)
            b.rows([_one(hf), (ar, d, -uf)], np.full(n, -np.inf), np.zeros(n))  # h <= u d
        prev = h
        encoded += units.size
    cost = np.zeros(b.n)
    cost[prev] = -s * (target if k == 0 else target[need[k - 1]])
    return UnitProgram(b.program(cost), float(s * chain.layers[k].bias[i]), n0, encoded)
