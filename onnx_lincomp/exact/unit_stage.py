"""Per-unit stage: decide every stability candidate with its own small LP, then its own MILP.

Layer by layer, shallow first. For the candidates of one layer:

1. *bound tightening* (every earlier Relu layer that reads another layer; the first layer's bounds over a
   box are exact): the per-unit LP of every unstable unit, maximising and minimising its pre-activation,
   gives bounds at least as tight as the relaxation; they (and every unit already proven stable) become
   that layer's big-M constants for all later layers;
2. *LP stage*: the per-unit LP (:mod:`.unit_encoding` without binaries); an optimum at or above the
   threshold is a proof, an LP point that flips the unit is a witness;
3. *MILP stage*, in rounds of growing CPU limits per unit over all layers, so the easy units are decided
   first: HiGHS's MILP as a threshold search (:func:`.highs_model.threshold_search`; max pools over Relus
   encoded as ``max(0, ...)``, :mod:`.unit_encoding`) for 2 s, then the
   gap-branching LP branch and bound (:mod:`.unit_bab`) for 10 s and for ``unit_time_limit``. A program with
   max-pool selection binaries stays with HiGHS unless ``bab_pools``: the branch and bound can branch on them,
   but measured on ``examples/digits_cnn.onnx`` it spent 70 CPU s without the witness HiGHS found in 4 s (the
   certificate went from complete to one unit open). A checked
   witness or a bound at the threshold ends a unit; a unit that runs out of its CPU time stays open and
   the stage goes on with the next.

Units are independent: they are solved in fixed batches (``batch`` units, shallow first, then by index)
on ``jobs`` processes; after each batch the new witnesses are applied to the candidates still pending, so
the outcome does not depend on ``jobs``. A witness is accepted only when a forward pass of the network (in
float64, on the input rounded to float32) flips the unit by more than ``witness_margin``; every witness is
also re-checked in onnxruntime by :mod:`.witness_check`.
"""
from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from .bounds import LayerBounds
from .chain import AffineChain
from .highs_model import SearchResult, solve_lp, threshold_search
from .milp import MilpOutcome
from .unit_bab import branch_and_bound
from .unit_encoding import UnitQuery, encode_unit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitStageOptions:
    time_limit: float = 240.0  # wall-clock seconds for the whole stage
    unit_time_limit: float = 60.0  # CPU seconds per unit MILP
    jobs: int = 1
    lp: bool = True
    tighten: bool = True
    bab: bool = True  # the LP branch and bound after the first MILP round (else HiGHS's MILP in every round)
    bab_pools: bool = False  # the branch and bound also takes programs with max-pool selection binaries
    margin: float = 1e-6  # a proof needs the bound this far past the threshold
    witness_margin: float = 1e-6  # a witness must flip its unit by this much
    batch: int = 8

    def __post_init__(self):
        if self.time_limit <= 0 or self.unit_time_limit <= 0 or self.jobs < 1 or self.batch < 1:
            raise ValueError("time limits must be positive, jobs and batch at least 1")


@dataclass(frozen=True)
class UnitRecord:
    layer: int
    unit: int
    sign: float
    stage: str  # "lp", "milp" (HiGHS) or "bab" (LP branch and bound)
    status: str  # "no" (proven), "found" (witness), "open"
    cpu_seconds: float
    nodes: int
    binaries: int
    encoded_units: int
    reason: str = ""
    done_at: float = 0.0  # wall seconds since the stage started when the result came back

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Work:
    """What the workers need, sent once per process."""

    chain: AffineChain
    lo: np.ndarray
    hi: np.ndarray


_WORK: _Work | None = None


@contextmanager
def one_blas_thread():
    """BLAS on one thread: the matrices here are small, and a threaded BLAS on a busy machine spends 20x the
    CPU time spinning (measured: the witness search on a 784-200-200 MLP, 12 s CPU against 0.55 s).
    Uses threadpoolctl when it is installed, else changes nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _init_worker(work: _Work) -> None:
    global _WORK
    _WORK = work
    if multiprocessing.parent_process() is not None:  # a worker process: keep its BLAS on one thread for good
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return
        threadpool_limits(1, user_api="blas")


def _flips(chain: AffineChain, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The input as onnxruntime will see it (clipped to the box, float32) and the pre-activations there."""
    x32 = np.clip(x, lo, hi).astype(np.float32).astype(np.float64)
    return x32, [z[0] for z in chain.forward(x32[None, :])]


def _solve(task: tuple) -> tuple[UnitRecord, np.ndarray | None, float | None]:
    """One unit: (record, witness input or None, LP optimum of ``s z`` for the LP stage)."""
    query, lower, upper, stage, cpu_limit, deadline, margin, witness_margin, bab_pools = task
    work = _WORK
    left = deadline - time.time()
    if left <= 0:
        skipped = UnitRecord(query.layer, query.unit, query.sign, stage, "open", 0.0, 0, 0, 0, "wall budget spent")
        return skipped, None, None
    unit = encode_unit(work.chain, lower, upper, work.lo, work.hi, query)
    n0 = unit.n_inputs
    witness: list[np.ndarray] = []

    def accept(v: np.ndarray) -> bool:
        x32, zs = _flips(work.chain, v[:n0], work.lo, work.hi)
        if query.sign * zs[query.layer][query.unit] > witness_margin:
            witness.append(x32)
            return True
        return False

    if stage == "lp":
        res = solve_lp(unit.program, left)
        status, best = "open", None
        if res.value is not None:
            best = unit.threshold - res.value  # the LP's bound on max of s z
            if res.value >= unit.threshold + margin:
                status = "no"
            elif accept(res.point):
                status = "found"
        res = SearchResult(status, None, res.value, res.cpu_seconds, 0, res.reason)
    elif stage == "bab" and (unit.program.binaries == len(unit.relus)
                             or bab_pools and unit.program.binaries == unit.branchable):
        res = branch_and_bound(unit, margin, accept, cpu_limit, left)
        best = None
    else:
        stage = "milp"
        if any(layer.kind == "max" for layer in work.chain.layers):  # max pools over Relus as max(0, .)
            unit = encode_unit(work.chain, lower, upper, work.lo, work.hi, query, merge_pools=True)
        wall = min(left, max(4.0 * cpu_limit, cpu_limit + 10.0))  # backstop: callbacks pause in the root cut loop
        res = threshold_search(unit.program, unit.threshold, margin, accept, cpu_limit, wall)
        best = None
    record = UnitRecord(query.layer, query.unit, query.sign, stage, res.status, res.cpu_seconds, res.nodes,
                        unit.program.binaries, unit.encoded_units, res.reason)
    return record, (witness[0] if res.status == "found" else None), best


class _InProcess(Executor):
    """The executor interface on the calling process (``jobs=1``)."""

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        return map(fn, *iterables)


@dataclass
class _State:
    chain: AffineChain
    lower: list[np.ndarray]
    upper: list[np.ndarray]
    lo: np.ndarray
    hi: np.ndarray
    pending: dict[tuple[int, int, float], UnitQuery]
    out: MilpOutcome
    records: list[UnitRecord] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    cpu_start: float = field(default_factory=time.process_time)
    worker_cpu: float = 0.0  # solver CPU seconds spent in other processes (jobs > 1)
    lp_bound: dict[tuple[int, int, float], float] = field(default_factory=dict)  # LP bound on max s z per query

    def clock(self) -> tuple[float, float]:
        """(wall, CPU) seconds since the stage started, CPU counting every process."""
        return time.perf_counter() - self.start, time.process_time() - self.cpu_start + self.worker_cpu

    def event(self, query: UnitQuery, verdict: str) -> None:
        wall, cpu = self.clock()
        self.out.events.append((round(wall, 3), round(cpu, 3), query.layer, query.unit, query.sign, verdict))

    def apply_witness(self, x: np.ndarray, origin: tuple[int, int, float] | None = None) -> None:
        """Every pending candidate that ``x`` flips is disproven by it."""
        x32, zs = _flips(self.chain, x, self.lo, self.hi)
        self.out.witnesses.append(x32)
        w = len(self.out.witnesses) - 1
        for key, q in list(self.pending.items()):
            if q.sign * zs[q.layer][q.unit] > 0 or key == origin:
                (self.out.flipped_positive if q.sign > 0 else self.out.flipped_negative)[q.key] = w
                del self.pending[key]
                self.event(q, "unstable")

    def settle(self, query: UnitQuery) -> None:
        """``query`` is proven: the unit's bound on that side is 0."""
        key = (query.layer, query.unit, query.sign)
        self.pending.pop(key, None)
        self.event(query, "stable")
        if query.sign > 0:
            self.out.proven_inactive.add(query.key)
            self.upper[query.layer][query.unit] = min(self.upper[query.layer][query.unit], 0.0)
        else:
            self.out.proven_active.add(query.key)
            self.lower[query.layer][query.unit] = max(self.lower[query.layer][query.unit], 0.0)


def rounds(unit_time_limit: float, bab: bool = True) -> tuple[tuple[str, float], ...]:
    """(solver, CPU seconds per unit) of each round: HiGHS's MILP for 2 s (its heuristics find witnesses
    fast), then the gap-branching LP branch and bound for 10 s and for ``unit_time_limit`` (or HiGHS again
    when ``bab`` is off). Easy units are decided in the first, short rounds."""
    limits = sorted({min(t, unit_time_limit) for t in (2.0, 10.0, unit_time_limit)})
    return tuple(("milp" if i == 0 or not bab else "bab", t) for i, t in enumerate(limits))


def _run_batches(state: _State, executor: Executor, queries: list[UnitQuery], stage: str,
                 options: UnitStageOptions, deadline: float, cpu_limit: float) -> None:
    for start in range(0, len(queries), options.batch):
        batch = [q for q in queries[start:start + options.batch] if (q.layer, q.unit, q.sign) in state.pending]
        if not batch:
            continue
        if time.time() >= deadline:
            break
        lower, upper = [a.copy() for a in state.lower], [a.copy() for a in state.upper]  # one snapshot a batch
        tasks = [(q, lower, upper, stage, cpu_limit, deadline, options.margin, options.witness_margin,
                  options.bab_pools) for q in batch]
        for q, (record, witness, best) in zip(batch, list(executor.map(_solve, tasks)), strict=True):
            if options.jobs > 1:
                state.worker_cpu += record.cpu_seconds
            state.records.append(replace(record, done_at=state.clock()[0]))
            if stage == "lp":
                state.out.lp_solves += 1
            else:
                state.out.solves += 1
            key = (q.layer, q.unit, q.sign)
            if best is not None:
                state.lp_bound[key] = best
            if record.status == "no":
                state.settle(q)
            elif record.status == "found" and key in state.pending:
                state.apply_witness(witness, origin=key)
        logger.info("%s: %d candidates pending", stage, len(state.pending))


def _tighten(state: _State, executor: Executor, layer: int, options: UnitStageOptions, deadline: float) -> int:
    """Per-unit LP bounds for the unstable units of ``layer``; returns how many bounds moved."""
    lower, upper = state.lower[layer], state.upper[layer]
    unstable = np.flatnonzero((lower < 0) & (upper > 0))
    queries = [UnitQuery(layer, int(j), s) for j in unstable for s in (1.0, -1.0)
               if (layer, int(j), s) not in state.lp_bound]
    moved = 0
    for start in range(0, len(queries), options.batch):
        if time.time() >= deadline:
            break
        batch = queries[start:start + options.batch]
        tasks = [(q, state.lower, state.upper, "lp", options.unit_time_limit, deadline, options.margin,
                  options.witness_margin, options.bab_pools) for q in batch]
        for q, (_, _, best) in zip(batch, list(executor.map(_solve, tasks)), strict=True):
            state.out.lp_solves += 1
            if best is not None:
                state.lp_bound[(q.layer, q.unit, q.sign)] = best
    for j in unstable:
        for s in (1.0, -1.0):
            best = state.lp_bound.get((layer, int(j), s))
            if best is None:
                continue
            slack = options.margin * (1.0 + abs(best))  # solver tolerance: keep the bound safe
            if s > 0 and best + slack < upper[j]:
                upper[j], moved = best + slack, moved + 1
            elif s < 0 and -best - slack > lower[j]:
                lower[j], moved = -best - slack, moved + 1
    return moved


def _executor(options: UnitStageOptions, work: _Work) -> Executor:
    if options.jobs == 1:
        _init_worker(work)
        return _InProcess()
    return ProcessPoolExecutor(options.jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(work,))


def decide_units(chain: AffineChain, bounds: list[LayerBounds], lo: np.ndarray, hi: np.ndarray,
                 inactive_cands: set[tuple[int, int]], active_cands: set[tuple[int, int]],
                 options: UnitStageOptions = UnitStageOptions()) -> MilpOutcome:
    """Prove or disprove every candidate with per-unit LPs and MILPs; undecided ones stay open."""
    start = time.perf_counter()
    deadline = time.time() + options.time_limit
    out = MilpOutcome()
    queries = [UnitQuery(k, i, 1.0) for k, i in inactive_cands] + [UnitQuery(k, i, -1.0) for k, i in active_cands]
    queries.sort(key=lambda q: (q.layer, q.unit, -q.sign))
    state = _State(chain, [b.lower.copy() for b in bounds], [b.upper.copy() for b in bounds], lo, hi,
                   {(q.layer, q.unit, q.sign): q for q in queries}, out)
    executor = _executor(options, _Work(chain, lo, hi))
    layers = sorted({q.layer for q in queries})
    done: set[int] = set()  # layers whose bounds were tightened
    try:
        for r, (solver, cpu_limit) in enumerate(rounds(options.unit_time_limit, options.bab)):
            for k in layers:
                layer_queries = [q for q in queries if q.layer == k]
                if r == 0 and options.tighten:
                    for j in range(k):
                        if j not in done and chain.layers[j].kind == "relu" and any(
                                src >= 0 for src, _ in chain.layers[j].inputs):
                            out.tightened += _tighten(state, executor, j, options, deadline)
                        done.add(j)
                if r == 0 and options.lp:
                    _run_batches(state, executor, layer_queries, "lp", options, deadline, cpu_limit)
                _run_batches(state, executor, layer_queries, solver, options, deadline, cpu_limit)
    finally:
        executor.shutdown()
    out.unproven_inactive = {q.key for q in state.pending.values() if q.sign > 0}
    out.unproven_active = {q.key for q in state.pending.values() if q.sign < 0}
    out.complete = not state.pending
    out.records = state.records
    out.bounds = [LayerBounds(lw, up) for lw, up in zip(state.lower, state.upper, strict=True)]
    out.seconds = time.perf_counter() - start
    return out
