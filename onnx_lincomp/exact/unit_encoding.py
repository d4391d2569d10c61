"""The per-unit MILP: can unit ``i`` of layer ``k`` take the sign ``s`` anywhere on the box?

Only what the target can feel is encoded: its *cone*, the outputs of earlier layers (of the DAG, see
:mod:`.chain`) joined to it by non-zero weights (a Relu whose upper bound is <= 0 outputs 0 and is left
out). With ``c = -s w`` (``w`` the target's row over its sources) the objective ``min c @ h`` is below
``s b_k[i]`` exactly when some input gives ``s z_{k,i} > 0``.

Per encoded Relu unit ``j`` with bounds ``l < u`` (Serra et al. 2021 big-M form):
- stably active (``l >= 0``): ``h = W h_prev + b``;
- unstable, read by the target only, with ``c_j > 0``: the objective pushes ``h`` down, so
  ``h >= W h_prev + b``, ``h >= 0`` is exact (no binary): the minimum sits on ``h = relu(z)``;
- every other unstable unit: ``z = W h_prev + b``, ``h >= z``, ``h <= z - l (1 - d)``, ``h <= u d``,
  ``h >= 0``, ``d`` binary.
A max-pool output ``h = max_p z_p`` gets ``h >= z_p`` for the inputs that can be the max (the same
push-down rule drops the rest), else also ``h <= z_p + (U - l_p)(1 - d_p)`` with ``sum_p d_p = 1``.
A max pool over Relu units that nothing else in the program reads (Conv-Relu-MaxPool) is encoded, when
``merge_pools``, as ``h = max(0, max_p z_p)`` on the Relu's pre-activations (``relu`` is monotone, so
``max_p relu(z_p) = max(0, max_p z_p)``): a zero member with its own selection binary replaces a binary per
Relu unit. On the residual digits CNN this cut the binaries of a deep unit from 395 to 154, and HiGHS proved
in 83-113 CPU s units it left open after 120 s with the Relu binaries. The LP relaxation is slightly looser
(bound +0.00444 against +0.00434 there), so the LP stage keeps the Relu binaries' triangle.
Dropping the binaries gives the per-unit LP relaxation. Both are relaxations of the network on the box
for the target's question, so "no point below the threshold" in either is a proof.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .chain import AffineChain, ChainLayer
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
    relus: np.ndarray  # (binaries, 3): the columns z, h, d of every unit with a binary, in column order of d
    pools: tuple[tuple[int, np.ndarray, np.ndarray], ...] = ()  # per max-pool output with binaries: (h, z_p, d_p)

    @property
    def branchable(self) -> int:
        """Binaries the LP branch and bound can branch on (every Relu and max-pool selection binary)."""
        return len(self.relus) + sum(d.size for _, _, d in self.pools)


def cone(chain: AffineChain, lower: list[np.ndarray], upper: list[np.ndarray], k: int,
         i: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per earlier layer: (outputs unit ``i`` of layer ``k`` can feel, those of them also read by another
    encoded layer). A Relu output with ``u <= 0`` is 0 and is left out."""
    need: dict[int, np.ndarray] = {}
    shared: dict[int, np.ndarray] = {}

    def reach(layer: ChainLayer, rows: np.ndarray, target: bool) -> None:
        for src, w in layer.inputs:
            if src < 0:
                continue
            used = np.any(w[rows] != 0, axis=0)
            if chain.layers[src].kind == "relu":
                used &= upper[src] > 0
            need[src] = need.get(src, np.zeros(used.size, bool)) | used
            if not target:
                shared[src] = shared.get(src, np.zeros(used.size, bool)) | used

    reach(chain.layers[k], np.array([i]), True)
    for j in range(k - 1, -1, -1):
        if j in need and need[j].any():
            reach(chain.layers[j], _z_rows(chain.layers[j], np.flatnonzero(need[j]), lower[j], upper[j]), False)
    return ({j: np.flatnonzero(m) for j, m in need.items()},
            {j: np.flatnonzero(shared.get(j, np.zeros(m.size, bool)) & m) for j, m in need.items()})


def _members(layer: ChainLayer, outputs: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> list[np.ndarray]:
    """Per max-pool output: the inputs that can be the max (an input whose upper bound is below another's
    lower bound never is)."""
    out = []
    for o in outputs:
        window = np.unique(layer.pools[o])
        out.append(window[upper[window] >= lower[window].max()])
    return out


def _z_rows(layer: ChainLayer, outputs: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    if layer.kind == "relu":
        return outputs
    members = _members(layer, outputs, lower, upper)
    return np.unique(np.concatenate(members)) if members else np.zeros(0, int)


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


def _z_expression(b: _Builder, layer: ChainLayer, rows: np.ndarray, cols: dict[int, np.ndarray],
                  need: dict[int, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The terms ``-W h_src`` of the rows ``rows`` of ``z`` (each source through its encoded columns)."""
    terms = []
    for src, w in layer.inputs:
        part = w[rows] if src < 0 else w[rows][:, need.get(src, np.zeros(0, int))]
        if part.size:
            terms.append(b.dense(part, cols[src]))
    return terms


def _encode_relu(b: _Builder, layer: ChainLayer, rows: np.ndarray, terms, lw: np.ndarray, up: np.ndarray,
                 push_down: np.ndarray, relus: list[np.ndarray]) -> np.ndarray:
    """Columns of ``h`` for the Relu units ``rows`` (bounds ``lw``, ``up``); see the module docstring."""
    bias = layer.bias[rows]
    h = np.zeros(rows.size, int)
    act = lw >= 0
    full = ~act & ~push_down
    for mask, kind in ((act, "active"), (push_down & ~act, "down"), (full, "full")):
        if not mask.any():
            continue
        n = int(mask.sum())
        remap = np.full(rows.size, -1)
        remap[mask] = np.arange(n)
        sel = [(remap[rr[mask[rr]]], cc[mask[rr]], vv[mask[rr]]) for rr, cc, vv in terms]
        if kind == "active":  # h - W h_prev = b
            h[mask] = b.cols(lw[mask], up[mask])
            b.rows([_one(h[mask]), *sel], bias[mask], bias[mask])
        elif kind == "down":  # h - W h_prev >= b, h >= 0
            h[mask] = b.cols(np.zeros(n), up[mask])
            b.rows([_one(h[mask]), *sel], bias[mask], np.full(n, np.inf))
        else:
            lf, uf = lw[mask], up[mask]
            z = b.cols(lf, uf)
            hf = b.cols(np.zeros(n), uf)
            d = b.cols(np.zeros(n), np.ones(n), integer=True)
            h[mask] = hf
            relus.append(np.stack([z, hf, d], axis=1))
            b.rows([_one(z), *sel], bias[mask], bias[mask])  # z - W h_prev = b
            ar, ones = np.arange(n), np.ones(n)
            b.rows([_one(hf), (ar, z, -ones)], np.zeros(n), np.full(n, np.inf))  # h >= z
            b.rows([_one(hf), (ar, z, -ones), (ar, d, -lf)], np.full(n, -np.inf), -lf)  # h <= z - l(1-d)
            b.rows([_one(hf), (ar, d, -uf)], np.full(n, -np.inf), np.zeros(n))  # h <= u d
    return h


def _encode_max(b: _Builder, layer: ChainLayer, outputs: np.ndarray, terms, zrows: np.ndarray, lower: np.ndarray,
                upper: np.ndarray, push_down: np.ndarray, pools: list) -> np.ndarray:
    """Columns of the max-pool outputs ``outputs``: ``h >= z_p`` for every member, and when the objective may
    push ``h`` up, ``h <= z_p + (U - l_p)(1 - d_p)`` with one ``d_p`` set (Tjeng et al. 2019); those outputs'
    (h, z_p, d_p) columns are appended to ``pools``."""
    z = b.cols(lower[zrows], upper[zrows])
    b.rows([_one(z), *terms], layer.bias[zrows], layer.bias[zrows])
    col_of = dict(zip(zrows.tolist(), z.tolist(), strict=True))
    h = np.zeros(outputs.size, int)
    for t, members in enumerate(_members(layer, outputs, lower, upper)):
        if members.size == 1:
            h[t] = col_of[int(members[0])]
            continue
        zc = np.array([col_of[int(p)] for p in members])
        h[t] = _max_of(b, zc, lower[members], lower[members].max(), upper[members].max(), push_down[t], pools)
    return h


def _max_of(b: _Builder, zc: np.ndarray, lows: np.ndarray, floor: float, cap: float, push_down: bool, pools: list,
            zero: int | None = None) -> int:
    """The column of ``h = max_p v[zc_p]`` (bounds ``[floor, cap]``): ``h >= z_p``, and unless ``push_down``
    also ``h <= z_p + (cap - l_p)(1 - d_p)`` with one ``d_p`` set, over the members and, when given, the
    constant-zero column ``zero`` (then ``h = max(0, ...)``); its (h, z_p, d_p) columns go to ``pools``."""
    h = int(b.cols(np.array([floor]), np.array([cap]))[0])
    n, ones = zc.size, np.ones(zc.size)
    b.rows([(np.arange(n), np.full(n, h), ones), (np.arange(n), zc, -ones)], np.zeros(n),
           np.full(n, np.inf))  # h >= z_p
    if push_down:
        return h
    if zero is not None:
        zc, lows, n = np.append(zc, zero), np.append(lows, 0.0), n + 1
        ones = np.ones(n)
    d = b.cols(np.zeros(n), np.ones(n), integer=True)
    big = cap - lows
    b.rows([(np.arange(n), np.full(n, h), ones), (np.arange(n), zc, -ones), (np.arange(n), d, big)],
           np.full(n, -np.inf), big)  # h <= z_p + (U - l_p)(1 - d_p)
    b.rows([(np.zeros(n, int), d, ones)], np.ones(1), np.ones(1))  # one d_p set
    pools.append((h, zc, d))
    return h


def _pool_selection(layer: ChainLayer) -> tuple[int, np.ndarray] | None:
    """(source, source unit of every row of ``z``) when a max-pool layer only selects units of one layer
    (weights 0/1, one 1 a row, no bias: a MaxPool reading a Relu, maybe through a Reshape)."""
    if layer.kind != "max" or len(layer.inputs) != 1 or np.any(layer.bias != 0):
        return None
    src, w = layer.inputs[0]
    if src < 0 or not (np.all((w == 0) | (w == 1)) and np.all(w.sum(axis=1) == 1)):
        return None
    return src, np.argmax(w, axis=1)


def _merged_relus(chain: AffineChain, need: dict[int, np.ndarray], k: int) -> dict[int, tuple[int, np.ndarray]]:
    """Relu layer -> (max-pool layer, selection) for the Relus that only a max pool over them reads here."""
    out = {}
    for j in need:
        found = _pool_selection(chain.layers[j])
        if found is None or chain.layers[found[0]].kind != "relu":
            continue
        r = found[0]
        if not any(m != j and any(src == r for src, _ in chain.layers[m].inputs) for m in [*need, k]):
            out[r] = (j, found[1])
    return out


def _encode_relu_max(b: _Builder, layer: ChainLayer, outputs: np.ndarray, sel: np.ndarray, z_cols: np.ndarray,
                     z_units: np.ndarray, lower: np.ndarray, upper: np.ndarray, push_down: np.ndarray,
                     pools: list, zero: list[int]) -> np.ndarray:
    """Columns of max-pool outputs ``h = max(0, max_p z_p)`` over the pre-activations ``z`` of a Relu layer
    (``z_cols``: the columns of its units ``z_units``; ``lower``/``upper``: its bounds; ``sel``: the Relu unit of
    every pool row). ``h >= z_p``, ``h >= max(0, max_p l_p)``; when the objective may push ``h`` up, also
    ``h <= z_p + (U - l_p)(1 - d_p)`` for every member and for a constant-zero member (``zero``: its column,
    made on first need) unless a member is never negative, with one ``d_p`` set."""
    where = np.full(lower.size, -1)
    where[z_units] = np.arange(z_units.size)
    h = np.zeros(outputs.size, int)
    for t, o in enumerate(outputs):
        units = np.unique(sel[np.unique(layer.pools[o])])
        floor = max(0.0, float(lower[units].max()))
        # the others are never above the max (nor those the cone left out by the pool's own bounds)
        units = units[(upper[units] > 0) & (upper[units] >= floor) & (where[units] >= 0)]
        if units.size == 0:  # every member <= 0: the output is 0
            if not zero:
                zero.append(int(b.cols(np.zeros(1), np.zeros(1))[0]))
            h[t] = zero[0]
            continue
        zc = z_cols[where[units]]
        with_zero = bool(lower[units].max() < 0)
        if units.size == 1 and not with_zero:  # an always-active unit alone: h = z
            h[t] = zc[0]
            continue
        if with_zero and not push_down[t] and not zero:
            zero.append(int(b.cols(np.zeros(1), np.zeros(1))[0]))
        h[t] = _max_of(b, zc, lower[units], floor, float(upper[units].max()), push_down[t], pools,
                       zero[0] if with_zero and not push_down[t] else None)
    return h


def encode_unit(chain: AffineChain, lower: list[np.ndarray], upper: list[np.ndarray], lo: np.ndarray,
                hi: np.ndarray, query: UnitQuery, merge_pools: bool = False) -> UnitProgram:
    """The per-unit MILP of ``query`` over the box ``[lo, hi]`` with pre-activation bounds ``lower``/``upper``
    (``merge_pools``: max pools over Relus as ``max(0, ...)``, see the module docstring)."""
    k, i, s = query.layer, query.unit, query.sign
    need, shared = cone(chain, lower, upper, k, i)
    target = chain.layers[k]
    direct = {src: w[i] for src, w in target.inputs}
    merged = _merged_relus(chain, need, k) if merge_pools else {}
    pooled = {j: (r, sel) for r, (j, sel) in merged.items()}
    b = _Builder()
    cols: dict[int, np.ndarray] = {-1: b.cols(lo, hi)}
    relus: list[np.ndarray] = []
    pools: list[tuple[int, np.ndarray, np.ndarray]] = []
    zero: list[int] = []
    encoded = 0
    for j in sorted(need):
        outputs, layer = need[j], chain.layers[j]
        if outputs.size == 0:
            cols[j] = np.zeros(0, int)
            continue
        c = -s * direct[j][outputs] if j in direct else np.zeros(outputs.size)
        push_down = (c > 0) & ~np.isin(outputs, shared[j])
        if j in pooled:  # a max pool over a merged Relu: max(0, max of its pre-activations)
            r, sel = pooled[j]
            cols[j] = _encode_relu_max(b, layer, outputs, sel, cols[r], need[r], lower[r], upper[r], push_down,
                                       pools, zero)
            encoded += outputs.size
            continue
        rows = _z_rows(layer, outputs, lower[j], upper[j])
        terms = _z_expression(b, layer, rows, cols, need)
        if j in merged:  # only its max pool reads it: the pre-activations z = W h_prev + b, no binaries
            cols[j] = b.cols(lower[j][rows], upper[j][rows])
            b.rows([_one(cols[j]), *terms], layer.bias[rows], layer.bias[rows])
        elif layer.kind == "relu":
            cols[j] = _encode_relu(b, layer, rows, terms, lower[j][rows], upper[j][rows], push_down, relus)
        else:
            cols[j] = _encode_max(b, layer, outputs, terms, rows, lower[j], upper[j], push_down, pools)
        encoded += outputs.size
    cost = np.zeros(b.n)
    for src, row in direct.items():
        idx = np.arange(row.size) if src < 0 else need.get(src, np.zeros(0, int))
        np.add.at(cost, cols[src], -s * row[idx])
    return UnitProgram(b.program(cost), float(s * target.bias[i]), cols[-1].size, encoded,
                       np.concatenate(relus) if relus else np.zeros((0, 3), int), tuple(pools))
