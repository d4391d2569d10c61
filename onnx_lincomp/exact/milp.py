"""MILP stage: decide the remaining stability candidates with one mixed-integer program (HiGHS).

Encoding (Serra et al. 2021, big-M with the tightened bounds ``l < 0 < u`` of each unstable unit):
``h >= z``, ``h <= z - l (1 - d)``, ``h <= u d``, ``h >= 0``, ``d`` binary (``d = 1``: active); stable
units are ``h = z`` or ``h = 0``. Candidates for *stably inactive* (``P``) get ``p <= d`` and
``z >= eps`` when ``d = 1``; candidates for *stably active* (``Q``) get ``q <= 1 - d`` and ``z <= -eps``
when ``d = 0``. The program maximises ``sum p + sum q`` subject to ``sum p + sum q >= 1``: a solution
is an input of the box that flips candidates (each gets that input as its witness, checked by a
forward pass), they leave the objective, and the program is solved again. When it is infeasible no
remaining candidate can flip: all are proven. The witness rounds use a small margin ``eps`` so the
witnesses flip robustly in float32; the final proof round uses ``eps = 0``, which is what makes the
proof sound (a unit that can reach ``z = 0`` exactly is not claimed stable). When that round meets only
boundary points, up to three tenfold smaller margins below the last infeasible one are tried (a unit whose
smallest value over the box is ``-3.7e-5`` is shown unstable, not left open); a proof still costs two solves.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from .bounds import LayerBounds
from .chain import AffineChain

logger = logging.getLogger(__name__)

_SHRINKS = 3  # tenfold smaller witness margins tried after a proof round that met only boundary points


@dataclass
class MilpOutcome:
    proven_inactive: set[tuple[int, int]] = field(default_factory=set)  # (layer, unit) proven never positive
    proven_active: set[tuple[int, int]] = field(default_factory=set)  # proven never negative
    flipped_positive: dict[tuple[int, int], int] = field(default_factory=dict)  # inactive candidate -> witness
    flipped_negative: dict[tuple[int, int], int] = field(default_factory=dict)  # active candidate -> witness
    witnesses: list[np.ndarray] = field(default_factory=list)
    unproven_inactive: set[tuple[int, int]] = field(default_factory=set)  # left open (time limit, boundary)
    unproven_active: set[tuple[int, int]] = field(default_factory=set)
    solves: int = 0
    lp_solves: int = 0
    seconds: float = 0.0
    complete: bool = False
    tightened: int = 0  # bounds moved by per-unit LPs (per-unit stage)
    records: list = field(default_factory=list)  # per-unit solves (per-unit stage): UnitRecord
    bounds: list = field(default_factory=list)  # per-unit stage: the bounds it ended with (LayerBounds per layer)
    events: list = field(default_factory=list)  # per-unit stage: (wall s, CPU s, layer, unit, sign, verdict)


class _Program:
    """Variables and constraints of the network encoding up to layer ``last``.

    Variables: the input ``x``, then per layer the pre-activations ``z`` (one dense equality row each,
    ``z = W h_prev + b``), the outputs ``h`` and a binary ``d`` per unstable unit; every Relu
    constraint is then a sparse row, which keeps the solver's cut loop cheap.
    """

    def __init__(self, chain: AffineChain, bounds: list[LayerBounds], lo: np.ndarray, hi: np.ndarray, last: int,
                 verbose: bool = False):
        self.chain, self.bounds, self.last, self.verbose = chain, bounds, last, verbose
        self.n0 = chain.input_size
        offset = self.n0
        lower, upper, integ = [lo], [hi], [np.zeros(self.n0)]
        self.z_index, self.h_index, self.d_index = [], [], []
        for k in range(last + 1):
            b = bounds[k]
            n = b.lower.size
            self.z_index.append(np.arange(offset, offset + n))
            self.h_index.append(np.arange(offset + n, offset + 2 * n))
            offset += 2 * n
            lower += [b.lower, np.zeros(n)]
            upper += [b.upper, np.maximum(b.upper, 0)]
            integ += [np.zeros(n), np.zeros(n)]
        for k in range(last + 1):
            b = bounds[k]
            unstable = np.flatnonzero((b.lower < 0) & (b.upper > 0))
            idx = np.full(b.lower.size, -1)
            idx[unstable] = np.arange(offset, offset + unstable.size)
            self.d_index.append(idx)
            offset += unstable.size
            lower.append(np.zeros(unstable.size))
            upper.append(np.ones(unstable.size))
            integ.append(np.ones(unstable.size))
        self.base_size = offset
        self.lower, self.upper, self.integrality = np.concatenate(lower), np.concatenate(upper), np.concatenate(integ)
        self.rows, self.lb, self.ub = self._network_rows()

    def _prev(self, k: int) -> np.ndarray:
        return np.arange(self.n0) if k == 0 else self.h_index[k - 1]

    def _sparse_rows(self, entries: list[tuple[np.ndarray, np.ndarray]], r: int) -> sp.csr_matrix:
        """``r`` rows, each a sum of (column index array, coefficient array) terms per row."""
        rows = np.concatenate([np.arange(r)] * len(entries))
        cols = np.concatenate([c for c, _ in entries])
        vals = np.concatenate([v for _, v in entries])
        return sp.csr_matrix((vals, (rows, cols)), shape=(r, self.base_size))

    def _network_rows(self):
        """Rows of the encoding: ``z = W h_prev + b`` per layer, then the Relu rows of every layer but the last."""
        blocks, lbs, ubs = [], [], []
        for k in range(self.last + 1):
            layer, b = self.chain.layers[k], self.bounds[k]
            n = layer.bias.size
            z, h, d = self.z_index[k], self.h_index[k], self.d_index[k]
            w = sp.csr_matrix(layer.weight)
            eq = sp.csr_matrix((-w.data, self._prev(k)[w.indices], w.indptr), shape=(n, self.base_size))
            blocks.append((eq + sp.csr_matrix((np.ones(n), (np.arange(n), z)), shape=(n, self.base_size))).tocsr())
            lbs.append(layer.bias.copy())
            ubs.append(layer.bias.copy())  # z - W h_prev = b
            if k == self.last:
                continue  # candidates of the last layer need only z (and their d, linked per solve)
            active = np.flatnonzero(b.lower >= 0)  # h = z; stably inactive units have h in [0, 0] by bounds
            unstable = np.flatnonzero((b.lower < 0) & (b.upper > 0))
            if active.size:
                ones = np.ones(active.size)
                blocks.append(self._sparse_rows([(h[active], ones), (z[active], -ones)], active.size))
                lbs.append(np.zeros(active.size)), ubs.append(np.zeros(active.size))
            if unstable.size:
                u, ones = unstable, np.ones(unstable.size)
                blocks.append(self._sparse_rows([(h[u], ones), (z[u], -ones)], u.size))  # h >= z
                lbs.append(np.zeros(u.size)), ubs.append(np.full(u.size, np.inf))
                blocks.append(self._sparse_rows([(h[u], ones), (z[u], -ones), (d[u], -b.lower[u])],
                                                u.size))  # h <= z - l(1-d)
                lbs.append(np.full(u.size, -np.inf)), ubs.append(-b.lower[u])
                blocks.append(self._sparse_rows([(h[u], ones), (d[u], -b.upper[u])], u.size))  # h <= u d
                lbs.append(np.full(u.size, -np.inf)), ubs.append(np.zeros(u.size))
        return sp.vstack(blocks).tocsr(), lbs, ubs

    def lp_max(self, k: int, i: int, sign: float, time_limit: float) -> float | None:
        """Max of ``sign * z_{k,i}`` over the LP relaxation (binaries relaxed to [0, 1]); None on failure."""
        c = np.zeros(self.base_size)
        c[self.z_index[k][i]] = -sign
        res = milp(c, integrality=np.zeros(self.base_size), bounds=Bounds(self.lower, self.upper),
                   constraints=LinearConstraint(self.rows, np.concatenate(self.lb), np.concatenate(self.ub)),
                   options={"time_limit": max(time_limit, 0.1)})
        if res.status != 0:
            return None
        return float(-res.fun)

    def solve(self, pcands: list[tuple[int, int]], qcands: list[tuple[int, int]], eps: float, time_limit: float):
        """One solve: returns (status, input x or None)."""
        cands = pcands + qcands
        extra = len(cands)
        total = self.base_size + extra
        base = sp.hstack([self.rows, sp.csr_matrix((self.rows.shape[0], extra))]).tocsr()
        rows, cols, vals, lb_extra, ub_extra = [], [], [], [], []
        r = 0
        for j, (k, i) in enumerate(cands):
            var, d, z, b = self.base_size + j, self.d_index[k][i], self.z_index[k][i], self.bounds[k]
            if j < len(pcands):  # p <= d ; z >= l + (eps - l) d
                rows += [r, r, r + 1, r + 1]
                cols += [var, d, z, d]
                vals += [1.0, -1.0, 1.0, -(eps - b.lower[i])]
                lb_extra += [-np.inf, b.lower[i]]
                ub_extra += [0.0, np.inf]
            else:  # q <= 1 - d ; z <= -eps + (u + eps) d
                rows += [r, r, r + 1, r + 1]
                cols += [var, d, z, d]
                vals += [1.0, 1.0, 1.0, -(b.upper[i] + eps)]
                lb_extra += [-np.inf, -np.inf]
                ub_extra += [1.0, -eps]
            r += 2
        rows += [r] * extra  # at least one flip
        cols += list(range(self.base_size, total))
        vals += [1.0] * extra
        lb_extra.append(1.0), ub_extra.append(np.inf)
        a = sp.vstack([base, sp.csr_matrix((vals, (rows, cols)), shape=(r + 1, total))]).tocsr()
        lb = np.concatenate([np.concatenate(self.lb), np.array(lb_extra)])
        ub = np.concatenate([np.concatenate(self.ub), np.array(ub_extra)])
        c = np.concatenate([np.zeros(self.base_size), -np.ones(extra)])
        bounds = Bounds(np.concatenate([self.lower, np.zeros(extra)]), np.concatenate([self.upper, np.ones(extra)]))
        integ = np.concatenate([self.integrality, np.zeros(extra)])
        res = milp(c, integrality=integ, bounds=bounds, constraints=LinearConstraint(a, lb, ub),
                   options={"time_limit": max(time_limit, 0.1), "mip_rel_gap": 0.5, "presolve": True,
                            "disp": self.verbose})
        x = None if res.x is None else np.clip(res.x[:self.n0], self.lower[:self.n0], self.upper[:self.n0])
        return res.status, x


def _flip_rounds(program: _Program, chain: AffineChain, pc: set, qc: set, out: MilpOutcome, eps: float,
                 start: float, time_limit: float, solve_limit: float) -> tuple[set, set]:
    """Witness rounds with margin ``eps``, then a proof round with 0; returns the candidates left open."""
    margin = eps
    ceiling = np.inf  # the smallest margin found infeasible: raising the margin again stops below it
    shrinks = 0  # margins tried below it after the proof round met only boundary points
    while pc or qc:
        left = time_limit - (time.perf_counter() - start)
        if left <= 0:
            break
        logger.info("MILP solve %d: %d candidates open, margin %g, %.0f s left", out.solves + 1, len(pc) + len(qc),
                    margin, left)
        status, x = program.solve(sorted(pc), sorted(qc), margin, min(solve_limit, left))
        out.solves += 1
        if status == 2:  # infeasible: nothing can flip with this margin
            if margin == 0.0:  # sound: no input of the box reaches even z = 0 for these
                out.proven_inactive |= pc
                out.proven_active |= qc
                return set(), set()
            ceiling = margin
            margin = 0.0
            continue
        if x is None:  # time limit without a solution: these stay open
            break
        zs = chain.forward(x[None, :])
        flipped_p = {(k, i) for (k, i) in pc if zs[k][0, i] > 0}
        flipped_q = {(k, i) for (k, i) in qc if zs[k][0, i] < 0}
        if not flipped_p and not flipped_q:
            if margin > 0.0 and margin * 10.0 < ceiling:
                margin *= 10.0
                continue
            if margin == 0.0 and shrinks < _SHRINKS and np.isfinite(ceiling):
                # only boundary points at 0: a flip smaller than the last infeasible margin may exist
                shrinks += 1
                margin = ceiling / 10.0
                continue
            break  # only boundary points (or flips below float32's reach): those stay open, not claimed
        out.witnesses.append(x)
        for cand in flipped_p:
            out.flipped_positive[cand] = len(out.witnesses) - 1
        for cand in flipped_q:
            out.flipped_negative[cand] = len(out.witnesses) - 1
        pc = pc - flipped_p
        qc = qc - flipped_q
    return pc, qc


def decide_candidates(chain: AffineChain, bounds: list[LayerBounds], lo: np.ndarray, hi: np.ndarray,
                      inactive_cands: set[tuple[int, int]], active_cands: set[tuple[int, int]], *,
                      time_limit: float = 120.0, solve_limit: float = 60.0, eps: float = 1e-4) -> MilpOutcome:
    """Flip or prove every candidate: witness rounds with margin ``eps``, then a proof round with 0."""
    out = MilpOutcome()
    start = time.perf_counter()
    pc, qc = set(inactive_cands), set(active_cands)
    if not pc and not qc:
        out.complete = True
        return out
    last = max(k for k, _ in pc | qc)
    program = _Program(chain, bounds, lo, hi, last)
    # root relaxation first: a candidate whose LP bound already has the right sign is proven
    for cands, sign, proven in ((pc, 1.0, out.proven_inactive), (qc, -1.0, out.proven_active)):
        for k, i in sorted(cands):
            left = time_limit - (time.perf_counter() - start)
            if left <= 0:
                break
            bound = program.lp_max(k, i, sign, min(solve_limit, left))
            out.lp_solves += 1
            if bound is not None and bound < 0:
                proven.add((k, i))
        cands -= proven
    pc, qc = _flip_rounds(program, chain, pc, qc, out, eps, start, time_limit, solve_limit)
    if len(pc) + len(qc) > 1:  # a joint solve timed out (or met only boundary points): one candidate at a time,
        rest_p, rest_q = set(), set()  # a unit that times out stays open and the stage goes on with the next
        for cands, sign in ((sorted(pc), 1), (sorted(qc), -1)):
            for cand in cands:
                if cand in out.flipped_positive and sign > 0 or cand in out.flipped_negative and sign < 0:
                    continue
                p, q = _flip_rounds(program, chain, {cand} if sign > 0 else set(), set() if sign > 0 else {cand},
                                    out, eps, start, time_limit, solve_limit)
                rest_p |= p
                rest_q |= q
        pc, qc = rest_p, rest_q
    out.unproven_inactive, out.unproven_active = pc, qc
    out.complete = not pc and not qc  # every candidate proven or flipped
    out.seconds = time.perf_counter() - start
    return out
