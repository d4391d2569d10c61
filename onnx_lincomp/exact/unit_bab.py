"""Branch and bound over Relu phases and max-pool selections with warm-started LPs, branching where the
relaxation gap is.

For a per-unit program (:mod:`.unit_encoding`) the LP relaxation differs from the MILP only in the units
with a binary: there the LP may put ``h`` above ``relu(z)`` (the triangle). Fixing ``d = 0`` (``z <= 0``,
``h = 0``) or ``d = 1`` (``h = z >= 0``) removes that unit's gap. Likewise a max-pool output with selection
binaries (``h <= z_p + (U - l_p)(1 - d_p)``, ``sum_p d_p = 1``) may sit above ``max_p z_p``: fixing
``d_p = 1`` makes ``h = z_p`` (the others drop to 0 through the sum row) and ``d_p = 0`` takes ``p`` out of
the window, so branching on the member with the largest ``d_p`` closes the gap ``h - max_p z_p`` in at most
``|window| - 1`` levels (a window with one member left, or one member fixed to 1, is settled). At each node
the Relu unit or max-pool output with the largest gap, weighed by ``|c_h|`` (units of earlier layers, which
do not touch the objective, by the mean objective coefficient), is branched on; nodes are taken best bound
first and re-solved by dual simplex from the previous basis, so a node costs a few pivots.

Every node LP is a relaxation of the network on its part of the box, so when every open node's bound
reaches ``threshold + margin`` no input flips the unit: a proof. Node bounds are the safe Lagrangian bounds
of :func:`.highs_model.lagrangian_bound`, so the proof does not rest on the LP solver's tolerances; an
infeasible node is pruned only when its Farkas ray certifies that the same way. A node LP point that flips
the unit in a forward pass is a witness. Measured on the 784-200-200 Fashion-MNIST L1 MLP: units on which
HiGHS's MILP spends 50 CPU s in its root cut loop without leaving the root (bound stuck 0.008 past the
threshold) are proven here in 0.5-10 s by a few hundred nodes.
"""
from __future__ import annotations

import heapq
import time
from collections.abc import Callable

import numpy as np

from .highs_model import (
    _STATUS,
    SearchResult,
    SparseProgram,
    highs_instance,
    lagrangian_bound,
    run_highs,
    threshold_search,
)
from .unit_encoding import UnitProgram


class _NodeLp:
    """The LP relaxation of one unit program, re-solved under fixed phases."""

    def __init__(self, unit: UnitProgram, wall_limit: float):
        self.unit = unit
        self.h = highs_instance(unit.program, True, wall_limit)
        self.h.setOptionValue("simplex_strategy", 1)  # dual simplex: bound changes keep the basis dual feasible
        self.n_relu = len(unit.relus)
        self.z, self.hcol = unit.relus[:, 0], unit.relus[:, 1]
        # every branchable binary: the Relu phases, then each max-pool output's selection binaries
        self.d = np.concatenate([unit.relus[:, 2]] + [d for _, _, d in unit.pools]).astype(np.int32)
        self.pool_first = self.n_relu + np.cumsum([0] + [d.size for _, _, d in unit.pools])[:-1].astype(int)
        cost = np.abs(unit.program.cost)
        heads = np.concatenate([self.hcol, np.array([h for h, _, _ in unit.pools], int)]).astype(int)
        used = cost[heads][cost[heads] > 0]
        default = used.mean() if used.size else 1.0
        self.weight = np.where(cost[self.hcol] > 0, cost[self.hcol], default)
        self.pool_weight = np.array([cost[h] if cost[h] > 0 else default for h, _, _ in unit.pools])

    def solve(self, fixed: tuple[tuple[int, float], ...]) -> tuple[float, np.ndarray | None] | None:
        """(optimal value, point) under the fixed phases; (inf, None) when infeasible; None on failure."""
        lower, upper = np.zeros(self.d.size), np.ones(self.d.size)
        for j, phase in fixed:
            lower[j] = upper[j] = phase
        self.h.changeColsBounds(self.d.size, self.d, lower, upper)
        run_highs(self.h)
        status = self.h.getModelStatus()
        col_lower, col_upper = self.unit.program.col_lower.copy(), self.unit.program.col_upper.copy()
        col_lower[self.d], col_upper[self.d] = lower, upper
        if status == _STATUS.kInfeasible:  # believed only with a Farkas ray that certifies it
            _, has_ray, ray = self.h.getDualRay()
            return (np.inf, None) if has_ray and self._certifies(np.asarray(ray), col_lower, col_upper) else None
        if status != _STATUS.kOptimal:
            return None
        sol = self.h.getSolution()
        bound = lagrangian_bound(self.unit.program, np.asarray(sol.row_dual), col_lower, col_upper)
        return bound, np.asarray(sol.col_value)

    def _certifies(self, ray: np.ndarray, col_lower: np.ndarray, col_upper: np.ndarray) -> bool:
        """The ray's Lagrangian bound without the objective is positive: no point satisfies the rows."""
        p = self.unit.program
        bare = SparseProgram(np.zeros_like(p.cost), p.col_lower, p.col_upper, p.integer, p.rows, p.row_lower,
                             p.row_upper)
        return lagrangian_bound(bare, ray, col_lower, col_upper) > 0

    def branch_unit(self, point: np.ndarray, fixed: tuple[tuple[int, float], ...]) -> int | None:
        """The binary (index into ``self.d``) of the Relu unit or max-pool output with the largest weighed gap at
        ``point``; None when every gap is closed (the LP point is a point of the network)."""
        gap = self.weight * (point[self.hcol] - np.maximum(point[self.z], 0.0))
        fixed_at = dict(fixed)
        if fixed:
            gap[[j for j in fixed_at if j < self.n_relu]] = -1.0
        j = int(np.argmax(gap)) if gap.size else -1
        best, choice = (gap[j], j) if j >= 0 else (-1.0, -1)
        for g, (h, zc, d) in enumerate(self.unit.pools):
            first = int(self.pool_first[g])
            members = range(first, first + d.size)
            free = [m for m in members if m not in fixed_at]
            if len(free) <= 1 or any(fixed_at.get(m) == 1.0 for m in members):
                continue  # settled: one member selected, or the sum row selects the last one left
            pool_gap = self.pool_weight[g] * (point[h] - point[zc].max())
            if pool_gap > best:
                # the free member the LP leans on most (ties: the larger z_p)
                best, choice = pool_gap, max(free, key=lambda m: (point[self.d[m]], point[zc[m - first]]))
        return choice if choice >= 0 and best > 1e-12 else None


def branch_and_bound(unit: UnitProgram, margin: float, accept: Callable[[np.ndarray], bool], cpu_limit: float,
                     wall_limit: float) -> SearchResult:
    """Is there a point with ``cost @ v < unit.threshold``? Answers "no" (proof), "found" or "open"."""
    start, wall_start = time.thread_time(), time.perf_counter()
    proof = unit.threshold + margin
    if unit.branchable == 0:  # an LP: nothing to branch on
        return threshold_search(unit.program, unit.threshold, margin, accept, cpu_limit, wall_limit)
    lp = _NodeLp(unit, wall_limit)
    root = lp.solve(())
    if root is None:
        return SearchResult("open", None, None, time.thread_time() - start, 0, "root LP failed")
    heap = [(root[0], 0, ())]
    points = {0: root[1]}
    count, nodes, reason = 0, 1, ""
    while heap and heap[0][0] < proof:
        if time.thread_time() - start > cpu_limit:
            reason = "cpu time limit"
            break
        if time.perf_counter() - wall_start > wall_limit:
            reason = "wall time limit"
            break
        value, key, fixed = heapq.heappop(heap)
        point = points.pop(key)
        if value < unit.threshold and accept(point):
            return SearchResult("found", point, value, time.thread_time() - start, nodes)
        j = lp.branch_unit(point, fixed)
        if j is None:  # every gap closed: the LP is exact here, and its value is below the proof level
            heapq.heappush(heap, (value, key, fixed))
            points[key] = point
            reason = "a point within the margin of the threshold"
            break
        for phase in (0.0, 1.0):
            child = fixed + ((j, phase),)
            res = lp.solve(child)
            nodes += 1
            if res is None:
                return SearchResult("open", None, heap[0][0] if heap else value, time.thread_time() - start, nodes,
                                    "node LP failed")
            if res[0] < proof:
                count += 1
                heapq.heappush(heap, (res[0], count, child))
                points[count] = res[1]
    cpu = time.thread_time() - start
    if not heap or heap[0][0] >= proof:
        return SearchResult("no", None, heap[0][0] if heap else np.inf, cpu, nodes)
    return SearchResult("open", None, heap[0][0], cpu, nodes, reason)
