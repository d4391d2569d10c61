"""Certify ReLU stability over an input box, cheapest stage first, each stage on what is still open.

1. samples (calibration data and random points of the box) disprove stability: a unit seen both
   positive and negative is unstable; a unit never seen positive is a candidate for *stably inactive*,
   one never seen negative a candidate for *stably active*;
2. interval bounds, then the linear relaxation (:mod:`.bounds`), prove candidates;
3. per unit (:mod:`.unit_stage`, the default): a small LP, HiGHS's MILP and an LP branch and bound prove
   or disprove (with a witness input) the rest, each unit within its CPU time, the stage within its wall
   budget; or (``method="network"``) one network-wide MILP (:mod:`.milp`).

A Conv channel is stable when every position of it is. The proven sets become unit evidence
(:meth:`Certificate.unit_evidence`) that the linearity passes read exactly as they read statistics, so
exact and statistical modes share one set of rewrites.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis.unit_sets import ProvenUnits, UnitEvidence
from ..calibration.data_source import CalibrationSource
from ..errors import OptionError
from ..model_io import ModelContext
from .bounds import relaxed_bounds
from .chain import AffineChain, extract_chain
from .domain import Domain
from .milp import MilpOutcome, decide_candidates
from .search import search_witness
from .unit_stage import UnitStageOptions, decide_units, one_blas_thread


@dataclass(frozen=True)
class CertifyOptions:
    random_points: int = 2048
    search_restarts: int = 16  # random starting points per candidate for the witness search
    milp: bool = True
    time_limit: float = 240.0  # total wall-clock seconds for the MILP stage
    solve_limit: float = 60.0  # seconds per MILP solve ("network": wall clock; "units": CPU seconds per unit)
    seed: int = 0
    method: Literal["units", "network"] = "units"  # per-unit LPs and MILPs, or one network-wide MILP
    jobs: int = 1  # processes for the per-unit stage
    tighten: bool = True  # per-unit LP bounds for deeper layers (per-unit stage)
    bab: bool = True  # per-unit stage: LP branch and bound after the first MILP round (else HiGHS throughout)
    bab_pools: bool = False  # per-unit stage: the branch and bound also on programs with max-pool binaries

    def __post_init__(self):
        if self.random_points < 0 or self.time_limit <= 0 or self.solve_limit <= 0:
            raise OptionError("random_points must be >= 0 and time limits positive")
        if self.method not in ("units", "network") or self.jobs < 1:
            raise OptionError(f"method must be 'units' or 'network' (got {self.method!r}) and jobs at least 1")


@dataclass(frozen=True, eq=False)
class LayerCertificate:
    relu: str
    units: int
    channels: int
    sampled_unstable: int
    interval_active: int
    interval_inactive: int
    relaxed_active: int  # proven by the relaxation on top of interval bounds
    relaxed_inactive: int
    milp_active: int
    milp_inactive: int
    milp_unstable: int  # disproven by a MILP witness
    unproven: int
    search_unstable: int = 0
    active_units: np.ndarray = field(repr=False, default=None)
    inactive_units: np.ndarray = field(repr=False, default=None)
    channel_of: np.ndarray = field(repr=False, default=None)
    open_units: tuple[int, ...] = field(repr=False, default=())  # candidates left undecided (time limit)

    @property
    def stably_active(self) -> np.ndarray:
        """Channel mask: every unit of the channel proven active."""
        return (np.bincount(self.channel_of, self.active_units, self.channels)
                == np.bincount(self.channel_of, minlength=self.channels))

    @property
    def stably_inactive(self) -> np.ndarray:
        return (np.bincount(self.channel_of, self.inactive_units, self.channels)
                == np.bincount(self.channel_of, minlength=self.channels))

    def as_dict(self) -> dict:
        return {"relu": self.relu, "units": self.units, "channels": self.channels,
                "sampled_unstable": self.sampled_unstable,
                "interval": {"active": self.interval_active, "inactive": self.interval_inactive},
                "relaxation": {"active": self.relaxed_active, "inactive": self.relaxed_inactive},
                "search": {"unstable": self.search_unstable},
                "milp": {"active": self.milp_active, "inactive": self.milp_inactive, "unstable": self.milp_unstable},
                "unproven": self.unproven, "stably_active_channels": int(self.stably_active.sum()),
                "stably_inactive_channels": int(self.stably_inactive.sum())}


@dataclass(frozen=True, eq=False)
class Certificate:
    domain: Domain
    layers: tuple[LayerCertificate, ...]
    not_certified: tuple[str, ...]
    stop_reason: str
    complete: bool
    seconds: dict
    milp_solves: int
    witnesses: tuple[np.ndarray, ...] = field(repr=False, default=())
    witness_flips: tuple[tuple[str, int, str, int], ...] = field(repr=False, default=())  # relu, unit, kind, witness
    evidence: np.ndarray = field(repr=False, default=None)  # inputs showing every claimed-unstable unit's two signs
    method: str = "units"
    lp_solves: int = 0
    tightened: int = 0
    unit_records: tuple = field(repr=False, default=())  # per-unit solves (UnitRecord), per-unit stage only
    unit_events: tuple = field(repr=False, default=())  # per-unit stage: when each candidate was decided

    def unit_evidence(self) -> UnitEvidence:
        """The proven channel sets as unit evidence for the linearity passes (the same rewrites as statistics)."""
        proven = {lc.relu: ProvenUnits(lc.stably_active, lc.stably_inactive) for lc in self.layers}
        return UnitEvidence.from_proofs(proven, self.domain.description,
                                        tuple((r, "not certified: " + self.stop_reason) for r in self.not_certified))

    def as_dict(self) -> dict:
        return {"domain": self.domain.as_dict(), "complete": self.complete, "seconds": self.seconds,
                "method": self.method, "milp_solves": self.milp_solves, "lp_solves": self.lp_solves,
                "bounds_tightened": self.tightened, "witnesses": len(self.witnesses),
                "layers": [layer.as_dict() for layer in self.layers], "not_certified": list(self.not_certified),
                "stop_reason": self.stop_reason}


@dataclass
class _Signs:
    """Per unit: seen positive / negative, and the point that came closest to each sign."""

    pos: list[np.ndarray]
    neg: list[np.ndarray]
    best_pos: list[np.ndarray]  # index of the point with the largest z
    best_neg: list[np.ndarray]  # index of the point with the smallest z


def _sample_signs(chain: AffineChain, points: np.ndarray) -> _Signs:
    widths = [layer.width for layer in chain.layers]
    pos = [np.zeros(w, bool) for w in widths]
    neg = [np.zeros(w, bool) for w in widths]
    hi_val = [np.full(w, -np.inf) for w in widths]
    lo_val = [np.full(w, np.inf) for w in widths]
    hi_idx = [np.zeros(w, int) for w in widths]
    lo_idx = [np.zeros(w, int) for w in widths]
    for start in range(0, len(points), 512):
        for k, z in enumerate(chain.forward(points[start:start + 512])):
            pos[k] |= (z > 0).any(axis=0)
            neg[k] |= (z < 0).any(axis=0)
            mx, mn = z.max(axis=0), z.min(axis=0)
            up, down = mx > hi_val[k], mn < lo_val[k]
            hi_idx[k][up] = start + z.argmax(axis=0)[up]
            lo_idx[k][down] = start + z.argmin(axis=0)[down]
            hi_val[k], lo_val[k] = np.maximum(hi_val[k], mx), np.minimum(lo_val[k], mn)
    return _Signs(pos, neg, hi_idx, lo_idx)


def _search_flips(chain: AffineChain, domain: Domain, points: np.ndarray, signs: _Signs, cands, sign: float,
                  restarts: int, seed: int):
    """Witnesses found by local search, from the closest sample and then from random restarts."""
    rng = np.random.default_rng(seed + 7)
    found = {}
    for k, i in sorted(cands):
        starts = [points[(signs.best_pos if sign > 0 else signs.best_neg)[k][i]]]
        starts += list(domain.sample(rng, restarts))
        for start in starts:
            x = search_witness(chain, domain.lower, domain.upper, k, i, sign, start)
            if x is not None:
                found[(k, i)] = x
                break
    return found


def _points(domain: Domain, calib: CalibrationSource | None, n_random: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [domain.sample(rng, n_random)] if n_random else []
    parts += [domain.lower[None, :], domain.upper[None, :]]
    if calib is not None:
        for batch in calib.batches(256):
            x = domain.flatten(batch)
            inside = np.all((x >= domain.lower) & (x <= domain.upper), axis=1)
            parts.append(x[inside])  # only points of the domain disprove stability on it
    return np.concatenate(parts)


def certify(graph: gs.Graph, ctx: ModelContext, domain: Domain, calib: CalibrationSource | None = None,
            options: CertifyOptions = CertifyOptions()) -> Certificate:
    """Prove which Relu units of ``graph`` are stable on ``domain``."""
    with one_blas_thread():
        return _certify(graph, ctx, domain, calib, options)


def _certify(graph: gs.Graph, ctx: ModelContext, domain: Domain, calib: CalibrationSource | None,
             options: CertifyOptions) -> Certificate:
    t0, cpu0 = time.perf_counter(), time.process_time()
    chain = extract_chain(graph, domain.shapes, ctx.default_opset)
    t_chain = time.perf_counter()
    points = _points(domain, calib, options.random_points, options.seed)
    signs = _sample_signs(chain, points)
    pos, neg = signs.pos, signs.neg
    t_samples = time.perf_counter()
    interval, tight = relaxed_bounds(chain, domain.lower, domain.upper)
    t_bounds = time.perf_counter()
    i_act = [b.lower >= 0 for b in interval]
    i_inact = [b.upper <= 0 for b in interval]
    r_act = [b.lower >= 0 for b in tight]
    r_inact = [b.upper <= 0 for b in tight]
    inactive_c = {(k, int(i)) for k in chain.relu_layers
                  for i in np.flatnonzero(~pos[k] & ~r_inact[k] & ~r_act[k])}
    active_c = {(k, int(i)) for k in chain.relu_layers
                for i in np.flatnonzero(~neg[k] & ~r_act[k] & ~r_inact[k])}
    searched_pos = _search_flips(chain, domain, points, signs, inactive_c, +1.0, options.search_restarts, options.seed)
    searched_neg = _search_flips(chain, domain, points, signs, active_c, -1.0, options.search_restarts, options.seed)
    t_search, cpu_search = time.perf_counter(), time.process_time()
    method = options.method if chain.is_sequential else "units"  # the network-wide MILP reads chains only
    outcome = _decide(chain, tight, domain, inactive_c - set(searched_pos), active_c - set(searched_neg),
                      replace(options, method=method))
    outcome.complete = outcome.complete or not (outcome.unproven_inactive | outcome.unproven_active) and options.milp
    for found, target in ((searched_pos, outcome.flipped_positive), (searched_neg, outcome.flipped_negative)):
        for cand, x in found.items():
            outcome.witnesses.append(x)
            target[cand] = len(outcome.witnesses) - 1
    t_milp = time.perf_counter()
    layers, flips = [], []
    searched = {**dict.fromkeys(searched_pos, "positive"), **dict.fromkeys(searched_neg, "negative")}
    for k, layer in enumerate(chain.layers):
        if layer.kind != "relu":
            continue
        m_act = np.zeros(layer.width, bool)
        m_inact = np.zeros(layer.width, bool)
        m_act[[i for kk, i in outcome.proven_active if kk == k]] = True
        m_inact[[i for kk, i in outcome.proven_inactive if kk == k]] = True
        milp_unstable, search_unstable = set(), set()
        for kind, found in (("positive", outcome.flipped_positive), ("negative", outcome.flipped_negative)):
            for (kk, i), w in found.items():
                if kk == k:
                    (search_unstable if (kk, i) in searched else milp_unstable).add(i)
                    flips.append((layer.relu, i, kind, w))
        unproven = {i for kk, i in outcome.unproven_inactive | outcome.unproven_active if kk == k}
        act, inact = r_act[k] | m_act, r_inact[k] | m_inact
        decided = set(np.flatnonzero(act | inact))
        layers.append(LayerCertificate(
            layer.relu, layer.width, layer.channels, int((pos[k] & neg[k]).sum()),
            int(i_act[k].sum()), int(i_inact[k].sum()), int((r_act[k] & ~i_act[k]).sum()),
            int((r_inact[k] & ~i_inact[k]).sum()),
            int(m_act.sum()), int(m_inact.sum()), len(milp_unstable - decided), len(unproven - decided),
            len(search_unstable - decided), act, inact, layer.channel_of, tuple(sorted(unproven - decided))))
    evidence = _evidence(points, signs, layers, outcome.witnesses)
    complete = outcome.complete and not chain.uncovered
    seconds = {"chain": t_chain - t0, "samples": t_samples - t_chain, "bounds": t_bounds - t_samples,
               "search": t_search - t_bounds, "milp": t_milp - t_search, "total": t_milp - t0,
               "cpu_before_milp": cpu_search - cpu0}
    return Certificate(domain, tuple(layers), chain.uncovered, chain.stop_reason, complete, seconds, outcome.solves,
                       tuple(outcome.witnesses), tuple(flips), evidence, method, outcome.lp_solves,
                       outcome.tightened, tuple(outcome.records), tuple(outcome.events))


def _decide(chain: AffineChain, bounds, domain: Domain, inactive_c: set, active_c: set,
            options: CertifyOptions) -> MilpOutcome:
    """The MILP stage on the candidates no sample, bound or search decided."""
    if not options.milp:
        return MilpOutcome(unproven_inactive=inactive_c, unproven_active=active_c)
    if options.method == "network":
        return decide_candidates(chain, bounds, domain.lower, domain.upper, inactive_c, active_c,
                                 time_limit=options.time_limit, solve_limit=options.solve_limit)
    unit_options = UnitStageOptions(time_limit=options.time_limit, unit_time_limit=options.solve_limit,
                                    jobs=options.jobs, tighten=options.tighten, bab=options.bab,
                                    bab_pools=options.bab_pools)
    return decide_units(chain, bounds, domain.lower, domain.upper, inactive_c, active_c, unit_options)


def _evidence(points: np.ndarray, signs: _Signs, layers: list[LayerCertificate],
              witnesses: list[np.ndarray]) -> np.ndarray:
    """The sample points closest to each sign of every unit, plus all witnesses."""
    idx = set()
    for k in range(len(signs.best_pos)):
        idx.update(int(i) for i in signs.best_pos[k])
        idx.update(int(i) for i in signs.best_neg[k])
    parts = [points[sorted(idx)]] + ([np.stack(witnesses)] if witnesses else [])
    return np.concatenate(parts)
