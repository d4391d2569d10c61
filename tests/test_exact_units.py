"""Per-unit LP/MILP stage: proofs agree with brute force and sampling, witnesses flip, jobs do not change results."""
import numpy as np
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import check_claims, mlp_model, unit_square
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.exact.bounds import relaxed_bounds
from onnx_lincomp.exact.chain import extract_chain
from onnx_lincomp.exact.highs_model import SparseProgram, threshold_search
from onnx_lincomp.exact.unit_bab import branch_and_bound
from onnx_lincomp.exact.unit_encoding import UnitQuery, encode_unit
from onnx_lincomp.exact.unit_stage import UnitStageOptions, decide_units
from onnx_lincomp.model_io import model_from_proto

SETTINGS = settings()


def _chain(model, n_in):
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    return extract_chain(loaded.graph, (n_in,), 17)


def _undecided(tight):
    return {(k, int(i)) for k, b in enumerate(tight) for i in np.flatnonzero((b.lower < 0) & (b.upper > 0))}


@SETTINGS
@given(st.integers(0, 10**6))
def test_units_agree_with_brute_force_in_two_dimensions(seed):
    rng = np.random.default_rng(seed)
    chain = _chain(mlp_model(rng, [2, 6, 5, 4, 2]), 2)
    lo, hi = np.zeros(2), np.ones(2)
    _, tight = relaxed_bounds(chain, lo, hi)
    undecided = _undecided(tight)
    out = decide_units(chain, tight, lo, hi, set(undecided), set(undecided), UnitStageOptions(time_limit=60))
    grid = unit_square()
    zs = chain.forward(grid)
    check_claims(chain, out, zs)
    # completeness: every unit the grid shows stable is proven, every other one has a witness
    for k, i in undecided:
        top, bottom = zs[k][:, i].max(), zs[k][:, i].min()
        if top < -1e-6:
            assert (k, i) in out.proven_inactive
        if bottom > 1e-6:
            assert (k, i) in out.proven_active
        if top > 1e-4:
            assert (k, i) in out.flipped_positive
        if bottom < -1e-4:
            assert (k, i) in out.flipped_negative


def test_units_are_sound_against_sampling_on_a_wider_net(rng):
    widths = [10, 24, 20, 16, 3]
    model = mlp_model(rng, widths, dead={1: [0, 1, 2], 2: [3]}, linear={1: [5, 6]})
    chain = _chain(model, widths[0])
    lo, hi = np.zeros(widths[0]), np.ones(widths[0])
    _, tight = relaxed_bounds(chain, lo, hi)
    undecided = _undecided(tight)
    out = decide_units(chain, tight, lo, hi, set(undecided), set(undecided), UnitStageOptions(time_limit=120))
    assert out.complete
    x = np.concatenate([rng.random((10000, widths[0])), rng.integers(0, 2, (2000, widths[0])).astype(float)])
    check_claims(chain, out, chain.forward(x))
    assert {r.stage for r in out.records} <= {"lp", "milp"}


def test_jobs_do_not_change_the_outcome(rng):
    chain = _chain(mlp_model(rng, [8, 16, 12, 10, 2], dead={1: [0, 1]}), 8)
    lo, hi = np.zeros(8), np.ones(8)
    _, tight = relaxed_bounds(chain, lo, hi)
    undecided = _undecided(tight)
    outs = [decide_units(chain, tight, lo, hi, set(undecided), set(undecided),
                         UnitStageOptions(time_limit=120, jobs=jobs, batch=4)) for jobs in (1, 2)]
    a, b = outs
    assert a.proven_inactive == b.proven_inactive and a.proven_active == b.proven_active
    assert a.flipped_positive.keys() == b.flipped_positive.keys()
    assert a.flipped_negative.keys() == b.flipped_negative.keys()
    for la, lb in zip(a.bounds, b.bounds, strict=True):  # the same LPs: equal up to float64 summation order
        np.testing.assert_allclose(la.upper, lb.upper, rtol=1e-12, atol=1e-12)


def test_a_timed_out_unit_stays_open_and_the_stage_goes_on(rng):
    chain = _chain(mlp_model(rng, [12, 20, 16, 2]), 12)
    lo, hi = np.zeros(12), np.ones(12)
    _, tight = relaxed_bounds(chain, lo, hi)
    cands = {(k, i) for k, i in _undecided(tight) if k == 1}
    out = decide_units(chain, tight, lo, hi, set(cands), set(), UnitStageOptions(unit_time_limit=1e-9, lp=False))
    solved = {(r.layer, r.unit) for r in out.records}
    assert cands == solved | set(out.flipped_positive)  # every candidate was solved or flipped by another's witness
    opened = {(r.layer, r.unit) for r in out.records if r.status == "open"}
    assert opened == out.unproven_inactive and len(opened) >= 2 and not out.complete
    assert all(r.reason == "cpu time limit" for r in out.records if r.status == "open")
    check_claims(chain, out, chain.forward(rng.random((5000, 12))))


def _program(cost, lower, upper, integer, rows, rlo, rhi):
    return SparseProgram(np.array(cost, float), np.array(lower, float), np.array(upper, float),
                         np.array(integer, bool), sp.csr_matrix(np.array(rows, float)), np.array(rlo, float),
                         np.array(rhi, float))


def test_threshold_search_answers_and_reads_no_offset():
    # min -x - y, x + y <= 1.5, binaries: the minimum is -1
    prog = _program([-1, -1], [0, 0], [1, 1], [1, 1], [[1, 1]], [-np.inf], [1.5])
    assert threshold_search(prog, -1.001, 1e-6, lambda v: True, 10, 10).status == "no"
    assert threshold_search(prog, -1.0, 1e-6, lambda v: True, 10, 10).status == "open"  # a boundary is no proof
    found = threshold_search(prog, -0.5, 1e-6, lambda v: True, 10, 10)
    assert found.status == "found" and found.point.sum() == 1
    # a point below the threshold that the check refuses is no proof
    assert threshold_search(prog, -0.5, 1e-6, lambda v: False, 10, 10).status == "open"
    lp = _program([-1, -1], [0, 0], [1, 1], [0, 0], [[1, 1]], [-np.inf], [1.5])  # an LP: minimum -1.5
    assert threshold_search(lp, -1.501, 1e-6, lambda v: True, 10, 10).status == "no"
    assert threshold_search(lp, -1.4, 1e-6, lambda v: True, 10, 10).status == "found"


def test_encoding_drops_units_the_target_cannot_feel_and_binaries_it_does_not_need(rng):
    chain = _chain(mlp_model(rng, [6, 10, 4, 2]), 6)
    lo, hi = np.zeros(6), np.ones(6)
    _, tight = relaxed_bounds(chain, lo, hi)
    lower, upper = [b.lower for b in tight], [b.upper for b in tight]
    w = chain.layers[1].weight.copy()
    w[0, :5] = 0.0  # the target unit feels only units 5..9 of the first layer
    chain.layers[1].weight[:] = w
    unstable = (lower[0] < 0) & (upper[0] > 0)
    for sign in (1.0, -1.0):
        unit = encode_unit(chain, lower, upper, lo, hi, UnitQuery(1, 0, sign))
        feel = np.arange(10) >= 5
        assert unit.encoded_units == int((feel & (upper[0] > 0)).sum())
        pulls_up = feel & unstable & (-sign * w[0] < 0)
        assert unit.program.binaries == int(pulls_up.sum())


@SETTINGS
@given(st.integers(0, 10**6))
def test_branch_and_bound_agrees_with_brute_force_in_two_dimensions(seed):
    rng = np.random.default_rng(seed)
    chain = _chain(mlp_model(rng, [2, 8, 6, 5, 2]), 2)
    lo, hi = np.zeros(2), np.ones(2)
    _, tight = relaxed_bounds(chain, lo, hi)
    lower, upper = [b.lower for b in tight], [b.upper for b in tight]
    grid = unit_square()
    zs = chain.forward(grid)
    for k, i in sorted(_undecided(tight)):
        if k == 0:
            continue
        for sign in (1.0, -1.0):
            unit = encode_unit(chain, lower, upper, lo, hi, UnitQuery(k, i, sign))

            def flips(v, k=k, i=i, sign=sign):
                return sign * chain.forward(v[None, :2])[k][0, i] > 1e-6

            res = branch_and_bound(unit, 1e-6, flips, 30.0, 60.0)
            extreme = (sign * zs[k][:, i]).max()
            if res.status == "no":
                assert extreme <= 1e-9, (k, i, sign)
            elif res.status == "found":
                assert sign * chain.forward(res.point[None, :2])[k][0, i] > 0
            if extreme > 1e-4:
                assert res.status == "found", (k, i, sign)
            if extreme < -1e-4:
                assert res.status == "no", (k, i, sign)


def test_cli_certify_per_unit_options(tmp_path, rng):
    import json

    import onnx
    from click.testing import CliRunner

    from onnx_lincomp.cli import main

    model = mlp_model(rng, [6, 12, 10, 2], dead={1: [0, 1]})
    onnx.save(model, tmp_path / "m.onnx")
    runner = CliRunner()
    outs = {}
    for args in (["--jobs", "2", "--unit-time-limit", "5"], ["--milp-method", "network"]):
        res = runner.invoke(main, ["certify", str(tmp_path / "m.onnx"), "--input-range", "0,1", "--json", "-", *args])
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        assert data["complete"]
        outs[data["method"]] = [(lc["stably_active_channels"], lc["stably_inactive_channels"]) for lc in data["layers"]]
    assert outs["units"] == outs["network"] and outs["units"][1][1] >= 2
