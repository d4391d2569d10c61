"""One sparse LP / MILP and its solution with HiGHS through its own Python binding.

The binding is ``highspy`` when installed, else the copy of the same pybind11 module that SciPy ships
(``scipy.optimize._highspy._core``, HiGHS >= 1.7): both expose the class ``_Highs`` with callbacks, which
``scipy.optimize.milp`` does not.

LP answers are read through :func:`lagrangian_bound`, a bound that holds whatever the solver's
tolerances. A *threshold search* minimises ``c @ v`` and asks one question: is there a feasible point with
``c @ v < threshold``? The model carries no objective offset (every value HiGHS reports is then the plain
``c @ v``), HiGHS's ``objective_bound`` is set to ``threshold + margin`` so it prunes every node whose dual
bound reaches it, and:

- an improving solution is handed to ``accept``; when ``accept`` takes it (a checked witness) the search
  stops at once;
- status *infeasible* means no point has ``c @ v < threshold + margin``: the question is answered no;
- anything else (time limit, CPU limit, a solution ``accept`` refused) leaves the question open.

Each solve runs on one thread (``threads=1``), with HiGHS's own wall-clock ``time_limit`` and a CPU-time
limit checked in the MIP interrupt callback (on the solving thread, so it counts this solve only).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

try:  # the maintained binding when present
    from highspy import _core as _hcore  # type: ignore[import-not-found]
except ImportError:  # the same module as bundled with SciPy
    from scipy.optimize._highspy import _core as _hcore

_CB = _hcore.cb.HighsCallbackType
_IMPROVING = int(_CB.kCallbackMipImprovingSolution)
_INTERRUPT = int(_CB.kCallbackMipInterrupt)
_STATUS = _hcore.HighsModelStatus

SearchStatus = Literal["no", "found", "open"]


@dataclass(frozen=True, eq=False)
class SparseProgram:
    """``min cost @ v`` s.t. ``row_lower <= rows @ v <= row_upper``, ``col_lower <= v <= col_upper``,
    ``v[integer]`` integral."""

    cost: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    integer: np.ndarray  # bool per column
    rows: sp.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray

    @property
    def binaries(self) -> int:
        return int(self.integer.sum())


@dataclass(frozen=True, eq=False)
class SearchResult:
    status: SearchStatus
    point: np.ndarray | None  # the accepted solution (status "found"), else the best one seen, if any
    value: float | None  # LP: the optimal value; MILP: the best objective seen
    cpu_seconds: float
    nodes: int = 0
    reason: str = ""


def highs_instance(program: SparseProgram, relax: bool, wall_limit: float):
    """A HiGHS object holding ``program`` (integrality dropped when ``relax``), one thread, quiet."""
    h = _hcore._Highs()
    for key, val in (("output_flag", False), ("threads", 1), ("time_limit", float(max(wall_limit, 0.01))),
                     ("random_seed", 0), ("mip_rel_gap", 0.0), ("mip_abs_gap", 0.0)):
        h.setOptionValue(key, val)
    rows = program.rows.tocsr()
    rows.sort_indices()
    lp = _hcore.HighsLp()
    lp.num_col_, lp.num_row_ = int(program.cost.size), int(rows.shape[0])
    lp.col_cost_ = np.asarray(program.cost, np.float64)
    lp.col_lower_ = np.asarray(program.col_lower, np.float64)
    lp.col_upper_ = np.asarray(program.col_upper, np.float64)
    lp.row_lower_ = np.asarray(program.row_lower, np.float64)
    lp.row_upper_ = np.asarray(program.row_upper, np.float64)
    lp.offset_ = 0.0
    lp.a_matrix_.format_ = _hcore.MatrixFormat.kRowwise
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = lp.num_col_, lp.num_row_
    lp.a_matrix_.start_ = rows.indptr.astype(np.int32)
    lp.a_matrix_.index_ = rows.indices.astype(np.int32)
    lp.a_matrix_.value_ = rows.data.astype(np.float64)
    if not relax and program.integer.any():
        kinds = (_hcore.HighsVarType.kContinuous, _hcore.HighsVarType.kInteger)
        lp.integrality_ = [kinds[int(b)] for b in program.integer]
    if h.passModel(lp) == _hcore.HighsStatus.kError:
        raise RuntimeError("HiGHS refused the model")
    return h


def run_highs(h) -> None:
    """``h.run()``, restarting HiGHS's global scheduler once if another thread count started it."""
    if h.run() == _hcore.HighsStatus.kError and h.getModelStatus() == _STATUS.kNotset:
        # a global scheduler started elsewhere in this process with another thread count: restart it once
        _hcore._Highs.resetGlobalScheduler(True)
        h.run()


def lagrangian_bound(program: SparseProgram, row_dual: np.ndarray, col_lower: np.ndarray | None = None,
                     col_upper: np.ndarray | None = None) -> float:
    """A lower bound on the LP's minimum that holds for *any* row multipliers ``y`` (weak duality with the
    column bounds kept): ``min c v >= sum_i y_i r_i + sum_j min_{v_j in [l_j, u_j]} (c - A^T y)_j v_j``, with
    ``r_i`` the row bound that ``y_i``'s sign selects. Evaluated in float64 on the solver's duals, it does
    not trust the solver's tolerances (the Neumaier-Shcherbina safe bound, up to float64 rounding). Column
    bounds other than the program's (a branch-and-bound node's) are passed as ``col_lower``/``col_upper``."""
    col_lower = program.col_lower if col_lower is None else col_lower
    col_upper = program.col_upper if col_upper is None else col_upper
    best = -np.inf
    for y in (np.asarray(row_dual, np.float64), -np.asarray(row_dual, np.float64)):  # either sign convention
        y = np.where((y > 0) & np.isinf(program.row_lower) | (y < 0) & np.isinf(program.row_upper), 0.0, y)
        rows = np.where(y > 0, program.row_lower, program.row_upper)
        const = float(np.sum(np.where(y != 0, y * np.where(np.isinf(rows), 0.0, rows), 0.0)))
        red = program.cost - program.rows.T @ y
        cols = np.where(red > 0, col_lower, col_upper)
        if np.any(np.isinf(cols[red != 0])):
            continue
        best = max(best, const + float(np.sum(np.where(red != 0, red * np.where(np.isinf(cols), 0.0, cols), 0.0))))
    return best


def solve_lp(program: SparseProgram, wall_limit: float) -> SearchResult:
    """The LP relaxation (integrality dropped): a safe lower bound on its optimum (:func:`lagrangian_bound`)
    and its optimal point, or status "open" on failure."""
    start = time.thread_time()
    h = highs_instance(program, True, wall_limit)
    run_highs(h)
    cpu = time.thread_time() - start
    if h.getModelStatus() != _STATUS.kOptimal:
        return SearchResult("open", None, None, cpu, reason=h.modelStatusToString(h.getModelStatus()))
    sol = h.getSolution()
    return SearchResult("open", np.asarray(sol.col_value), lagrangian_bound(program, np.asarray(sol.row_dual)), cpu)


def threshold_search(program: SparseProgram, threshold: float, margin: float, accept: Callable[[np.ndarray], bool],
                     cpu_limit: float, wall_limit: float) -> SearchResult:
    """Is there a point with ``cost @ v < threshold``? See the module docstring."""
    if not program.integer.any():  # an LP: its optimum answers the question
        res = solve_lp(program, wall_limit)
        if res.value is None:
            return res
        if res.value >= threshold + margin:
            return SearchResult("no", None, res.value, res.cpu_seconds)
        if res.value < threshold and accept(res.point):
            return SearchResult("found", res.point, res.value, res.cpu_seconds)
        return SearchResult("open", res.point, res.value, res.cpu_seconds, reason="optimum within the margin")
    h = highs_instance(program, False, wall_limit)
    h.setOptionValue("objective_bound", float(threshold + margin))
    proof = threshold + margin
    state = {"found": None, "best": None, "value": None, "cpu_out": False, "proved": False}
    start = time.thread_time()

    def callback(kind, _message, out, inp, _user):
        if kind == _IMPROVING:
            v = np.array(out.mip_solution, np.float64)
            state["best"], state["value"] = v, float(out.objective_function_value)
            if state["found"] is None and state["value"] < threshold and accept(v):
                state["found"] = v
                inp.user_interrupt = True
        elif kind == _INTERRUPT:
            if out.mip_dual_bound >= proof:  # every node is pruned: no point below the threshold
                state["proved"] = True
                inp.user_interrupt = True
            elif time.thread_time() - start > cpu_limit:
                state["cpu_out"] = True
                inp.user_interrupt = True

    h.setCallback(callback, None)
    h.startCallback(_CB.kCallbackMipImprovingSolution)
    h.startCallback(_CB.kCallbackMipInterrupt)
    run_highs(h)
    cpu = time.thread_time() - start
    status, info = h.getModelStatus(), h.getInfo()
    nodes = int(info.mip_node_count)
    if state["found"] is not None:
        return SearchResult("found", state["found"], state["value"], cpu, nodes)
    # the dual bound is a valid lower bound however the run ended (HiGHS may say "optimal" with a stray point
    # above the objective bound when the bound pruned every node, so the status alone is not read)
    if state["proved"] or status == _STATUS.kInfeasible or info.mip_dual_bound >= proof:
        return SearchResult("no", None, float(info.mip_dual_bound), cpu, nodes)
    if state["best"] is None and info.primal_solution_status:
        v = np.asarray(h.getSolution().col_value, np.float64)  # a solution found without a callback (presolve)
        value = float(program.cost @ v)
        if value < threshold and accept(v):
            return SearchResult("found", v, value, cpu, nodes)
    reason = ("cpu time limit" if state["cpu_out"] else
              "best point is no witness" if status == _STATUS.kOptimal else h.modelStatusToString(status))
    return SearchResult("open", state["best"], state["value"], cpu, nodes, reason)
