"""Branch and bound over Relu phases with warm-started LPs, branching where the relaxation gap is.

For a per-unit program (:mod:`.unit_encoding`) the LP relaxation differs from the MILP only in the units
with a binary: there the LP may put ``h`` above ``relu(z)`` (the triangle). Fixing ``d = 0`` (``z <= 0``,
``h = 0``) or ``d = 1`` (``h = z >= 0``) removes that unit's gap. At each node the unit with the largest
gap ``|c_h| (h - relu(z))`` in the node's LP solution is branched on (units of earlier layers, which do not
touch the objective, weigh their gap by the mean objective coefficient); nodes are taken best bound first
and re-solved by dual simplex from the previous basis, so a node costs a few pivots.

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
        self.d = unit.relus[:, 2].astype(np.int32)
        self.z, self.hcol = unit.relus[:, 0], unit.relus[:, 1]
        cost = np.abs(unit.program.cost[self.hcol])
        self.weight = np.where(cost > 0, cost, cost[cost > 0].mean() if (cost > 0).any() else 1.0)

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
        gap = self.weight * (point[self.hcol] - np.maximum(point[self.z], 0.0))
        if fixed:
            gap[[j for j, _ in fixed]] = -1.0
        j = int(np.argmax(gap)) if gap.size else -1
        return j if j >= 0 and gap[j] > 1e-12 else None


def branch_and_bound(unit: UnitProgram, margin: float, accept: Callable[[np.ndarray], bool], cpu_limit: float,
                     wall_limit: float) -> SearchResult:
    """Is there a point with ``cost @ v < unit.threshold``? Answers "no" (proof), "found" or "open"."""
    start, wall_start = time.thread_time(), time.perf_counter()
    proof = unit.threshold + margin
    if unit.relus.size == 0:  # an LP: nothing to branch on
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
