"""Exact mode past residual connections, Concat and MaxPool: the DAG matches onnxruntime, bounds hold,
per-unit decisions agree with brute force, and the certificate covers every Relu."""
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from conftest import check_claims, cnn_model, init, make_model, run, unit_square, vinfo
from onnx_lincomp.calibration import input_specs
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.exact import CertifyOptions, certify, parse_domain
from onnx_lincomp.exact.bounds import relaxed_bounds
from onnx_lincomp.exact.chain import extract_chain
from onnx_lincomp.exact.highs_model import _STATUS, highs_instance, run_highs, solve_lp, threshold_search
from onnx_lincomp.exact.unit_bab import branch_and_bound
from onnx_lincomp.exact.unit_encoding import UnitQuery, encode_unit
from onnx_lincomp.exact.unit_stage import UnitStageOptions, decide_units
from onnx_lincomp.model_io import model_from_proto

SETTINGS = settings()


def residual_model(rng: np.random.Generator, n_in: int = 2, width: int = 6, concat: bool = False) -> onnx.ModelProto:
    """x -> fc0 -> Relu(h0) -> fc1 -> Relu(h1) -> fc2 -> Add(h0) [or Concat(h0, h1)] -> Relu(h2) -> fc3 -> y."""
    def w(a, b):
        return rng.normal(0, 1 / np.sqrt(b), (a, b)).astype(np.float32)

    def b(a):
        return rng.normal(0, 0.2, a).astype(np.float32)

    inits = [init("w0", w(width, n_in)), init("b0", b(width)), init("w1", w(width, width)), init("b1", b(width)),
             init("w2", w(width, width)), init("b2", b(width))]
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["z0"], name="fc0", transB=1),
             helper.make_node("Relu", ["z0"], ["h0"], name="relu0"),
             helper.make_node("Gemm", ["h0", "w1", "b1"], ["z1"], name="fc1", transB=1),
             helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
             helper.make_node("Gemm", ["h1", "w2", "b2"], ["g2"], name="fc2", transB=1)]
    if concat:
        nodes += [helper.make_node("Concat", ["h0", "g2"], ["z2"], name="cat", axis=1)]
        inits += [init("w3", w(3, 2 * width)), init("b3", b(3))]
    else:
        nodes += [helper.make_node("Add", ["g2", "h0"], ["z2"], name="res")]
        inits += [init("w3", w(3, width)), init("b3", b(3))]
    nodes += [helper.make_node("Relu", ["z2"], ["h2"], name="relu2"),
              helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], name="fc3", transB=1)]
    return make_model(nodes, [vinfo("x", ["N", n_in])], [vinfo("y", ["N", 3])], inits)


def _chain(model, shape):
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    return loaded, extract_chain(loaded.graph, shape, 17)


def _pre_activations(model: onnx.ModelProto, names: list[str], feeds: dict) -> list[np.ndarray]:
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    ref.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return [o.reshape(len(o), -1) for o in run(ref, feeds)[1:]]


@pytest.mark.parametrize("concat", [False, True])
def test_residual_dag_matches_onnxruntime_and_bounds_hold(rng, concat):
    model = residual_model(rng, n_in=4, width=7, concat=concat)
    _, chain = _chain(model, (4,))
    assert [layer.relu for layer in chain.layers] == ["relu0", "relu1", "relu2"] and not chain.uncovered
    assert not chain.is_sequential and sorted(src for src, _ in chain.layers[2].inputs) == [0, 1]
    x = rng.random((500, 4), dtype=np.float32)
    for z, ref in zip(chain.forward(x), _pre_activations(model, ["z0", "z1", "z2"], {"x": x}), strict=True):
        np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
    interval, tight = relaxed_bounds(chain, np.zeros(4), np.ones(4))
    xs = np.concatenate([x, np.where(rng.random((64, 4)) < 0.5, 0.0, 1.0)])
    for z, ib, tb in zip(chain.forward(xs), interval, tight, strict=True):
        assert np.all(z >= tb.lower - 1e-9) and np.all(z <= tb.upper + 1e-9)
        assert np.all(tb.lower >= ib.lower - 1e-9) and np.all(tb.upper <= ib.upper + 1e-9)
    g = chain.gradient(2, 0, xs[0].astype(np.float64))  # the gradient through both paths
    eps = 1e-6
    num = [(chain.forward((xs[0] + eps * np.eye(4)[j])[None])[2][0, 0] - chain.forward(xs[:1])[2][0, 0]) / eps
           for j in range(4)]
    np.testing.assert_allclose(g, num, atol=1e-4)


@SETTINGS
@given(st.integers(0, 10**6), st.booleans())
def test_units_on_a_residual_dag_agree_with_brute_force(seed, concat):
    rng = np.random.default_rng(seed)
    _, chain = _chain(residual_model(rng, concat=concat), (2,))
    lo, hi = np.zeros(2), np.ones(2)
    _, tight = relaxed_bounds(chain, lo, hi)
    undecided = {(k, int(i)) for k, b in enumerate(tight) for i in np.flatnonzero((b.lower < 0) & (b.upper > 0))}
    out = decide_units(chain, tight, lo, hi, set(undecided), set(undecided), UnitStageOptions(time_limit=60))
    grid = unit_square()
    zs = chain.forward(grid)
    check_claims(chain, out, zs)
    for k, i in undecided:
        if zs[k][:, i].max() < -1e-6:
            assert (k, i) in out.proven_inactive
        if zs[k][:, i].max() > 1e-4:
            assert (k, i) in out.flipped_positive


def test_maxpool_cnn_is_certified_past_the_pool(rng):
    model = cnn_model(rng, dead=[0], linear=[1])
    loaded, chain = _chain(model, (1, 6, 6))
    assert [layer.kind for layer in chain.layers] == ["relu", "max", "relu"] and not chain.uncovered
    x = rng.random((300, 1, 6, 6), dtype=np.float32)
    zs = chain.forward(x.reshape(300, -1))
    ref = _pre_activations(model, ["c1", "c2"], {"x": x})
    np.testing.assert_allclose(zs[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(zs[2], ref[1], rtol=1e-5, atol=1e-5)
    lo, hi = np.zeros(36), np.ones(36)
    _, tight = relaxed_bounds(chain, lo, hi)
    for z, b in zip(zs, tight, strict=True):
        assert np.all(z >= b.lower - 1e-9) and np.all(z <= b.upper + 1e-9)
    cert = certify(loaded.graph, loaded.ctx, parse_domain(["0,1"], input_specs(loaded.graph)),
                   options=CertifyOptions(time_limit=120))
    assert [lc.relu for lc in cert.layers] == ["relu1", "relu2"] and cert.complete and not cert.not_certified
    assert cert.layers[0].stably_inactive[0] and cert.layers[0].stably_active[1]
    big = np.concatenate([x.reshape(300, -1), np.where(rng.random((2000, 36)) < 0.5, 0.0, 1.0),
                          rng.random((8000, 36))])
    zs = chain.forward(big)
    for lc, z in zip(cert.layers, (zs[0], zs[2]), strict=True):
        per_channel = z.reshape(len(z), lc.channels, -1)
        assert np.all(per_channel[:, lc.stably_inactive] <= 0) and np.all(per_channel[:, lc.stably_active] >= 0)


def pooled_model(rng: np.random.Generator, relu_first: bool) -> onnx.ModelProto:
    """x (N,2) -> fc0 (12) [-> Relu] -> Reshape (3,2,2) -> MaxPool 2x2 -> Flatten -> fc1 (5) -> Relu -> fc2 (4)
    -> Relu -> fc3 (2): every unit after the pool feels a max over four affine (or Relu) units of x."""
    def w(a, b):
        return rng.normal(0, 1.2 / np.sqrt(b), (a, b)).astype(np.float32)

    inits = [init("w0", w(12, 2)), init("b0", rng.normal(0, 0.3, 12).astype(np.float32)),
             init("shape", np.array([-1, 3, 2, 2], np.int64)), init("w1", w(5, 3)),
             init("b1", rng.normal(0, 0.3, 5).astype(np.float32)), init("w2", w(4, 5)),
             init("b2", rng.normal(0, 0.3, 4).astype(np.float32)), init("w3", w(2, 4)),
             init("b3", np.zeros(2, np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["z0"], name="fc0", transB=1)]
    if relu_first:
        nodes.append(helper.make_node("Relu", ["z0"], ["h0"], name="relu0"))
    nodes += [helper.make_node("Reshape", ["h0" if relu_first else "z0", "shape"], ["r"], name="reshape"),
              helper.make_node("MaxPool", ["r"], ["m"], name="pool", kernel_shape=[2, 2]),
              helper.make_node("Flatten", ["m"], ["f"], name="flatten", axis=1),
              helper.make_node("Gemm", ["f", "w1", "b1"], ["z1"], name="fc1", transB=1),
              helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
              helper.make_node("Gemm", ["h1", "w2", "b2"], ["z2"], name="fc2", transB=1),
              helper.make_node("Relu", ["z2"], ["h2"], name="relu2"),
              helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], name="fc3", transB=1)]
    return make_model(nodes, [vinfo("x", ["N", 2])], [vinfo("y", ["N", 2])], inits)


def _bab_against_grid(chain, grid_z, lo, hi, layers) -> int:
    """Branch and bound on every unstable unit of ``layers`` (both signs) agrees with the grid; returns how many
    of the programs had max-pool selection binaries."""
    _, tight = relaxed_bounds(chain, lo, hi)
    lower, upper = [b.lower for b in tight], [b.upper for b in tight]
    with_pools = 0
    for k in layers:
        for i in np.flatnonzero((lower[k] < 0) & (upper[k] > 0)):
            for sign in (1.0, -1.0):
                unit = encode_unit(chain, lower, upper, lo, hi, UnitQuery(k, int(i), sign))
                assert unit.program.binaries == unit.branchable  # every binary is one the B&B can branch on
                with_pools += bool(unit.pools)

                def flips(v, k=k, i=i, sign=sign):
                    return sign * chain.forward(v[None, :2])[k][0, i] > 1e-6

                res = branch_and_bound(unit, 1e-6, flips, 30.0, 60.0)
                extreme = (sign * grid_z[k][:, i]).max()
                if res.status == "no":
                    assert extreme <= 1e-9, (k, i, sign)
                elif res.status == "found":
                    assert sign * chain.forward(res.point[None, :2])[k][0, i] > 0
                if extreme > 1e-4:
                    assert res.status == "found", (k, i, sign, res.reason)
                if extreme < -1e-4:
                    assert res.status == "no", (k, i, sign, res.reason)
    return with_pools


@SETTINGS
@given(st.integers(0, 10**6), st.booleans())
def test_branch_and_bound_on_max_pool_selections_agrees_with_brute_force(seed, relu_first):
    rng = np.random.default_rng(seed)
    model = pooled_model(rng, relu_first)
    _, chain = _chain(model, (2,))
    assert "max" in [layer.kind for layer in chain.layers] and not chain.uncovered
    grid = unit_square()
    zs = chain.forward(grid)
    pool = [layer.kind for layer in chain.layers].index("max")
    after = [k for k in chain.relu_layers if k > pool]
    _bab_against_grid(chain, zs, np.zeros(2), np.ones(2), after)


def _optimum(program) -> float:
    """The optimum of a small per-unit MILP: HiGHS as the stage sets it up (one thread, no gap, no objective
    offset). SciPy's ``milp`` was not used: on seeds 329 and 18646 it stopped 5e-4 to 7e-4 short of the
    optimum that HiGHS reaches here on the same programs."""
    h = highs_instance(program, False, 60.0)
    run_highs(h)
    assert h.getModelStatus() == _STATUS.kOptimal, h.modelStatusToString(h.getModelStatus())
    return float(h.getInfo().objective_function_value)


def pool_and_skip_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x (N,2) -> fc0 (8) -> Relu h0 -> Reshape (2,2,2) -> MaxPool -> Flatten -> fc1, plus fc_skip(h0), Add ->
    Relu -> fc2: the Relu after the Add reads h0 itself, so its pool must keep the Relu binaries."""
    def w(a, b):
        return rng.normal(0, 1.2 / np.sqrt(b), (a, b)).astype(np.float32)

    inits = [init("w0", w(8, 2)), init("b0", rng.normal(0, 0.3, 8).astype(np.float32)),
             init("shape", np.array([-1, 2, 2, 2], np.int64)), init("w1", w(3, 2)),
             init("b1", rng.normal(0, 0.3, 3).astype(np.float32)), init("ws", w(3, 8)),
             init("bs", np.zeros(3, np.float32)), init("w2", w(2, 3)), init("b2", np.zeros(2, np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["z0"], name="fc0", transB=1),
             helper.make_node("Relu", ["z0"], ["h0"], name="relu0"),
             helper.make_node("Reshape", ["h0", "shape"], ["r"], name="reshape"),
             helper.make_node("MaxPool", ["r"], ["m"], name="pool", kernel_shape=[2, 2]),
             helper.make_node("Flatten", ["m"], ["f"], name="flatten", axis=1),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["a"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h0", "ws", "bs"], ["b"], name="fc_skip", transB=1),
             helper.make_node("Add", ["a", "b"], ["z1"], name="add"),
             helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
             helper.make_node("Gemm", ["h1", "w2", "b2"], ["y"], name="fc2", transB=1)]
    return make_model(nodes, [vinfo("x", ["N", 2])], [vinfo("y", ["N", 2])], inits)


def test_a_relu_read_past_its_pool_is_not_merged(rng):
    _, chain = _chain(pool_and_skip_model(rng), (2,))
    assert [layer.kind for layer in chain.layers] == ["relu", "max", "relu"]
    lo, hi = np.zeros(2), np.ones(2)
    _, tight = relaxed_bounds(chain, lo, hi)
    lower, upper = [b.lower for b in tight], [b.upper for b in tight]
    for i in range(3):
        for sign in (1.0, -1.0):
            plain = encode_unit(chain, lower, upper, lo, hi, UnitQuery(2, i, sign))
            merged = encode_unit(chain, lower, upper, lo, hi, UnitQuery(2, i, sign), merge_pools=True)
            assert merged.program.binaries == plain.program.binaries and len(merged.relus) == len(plain.relus)
            assert abs(_optimum(merged.program) - _optimum(plain.program)) < 1e-9


@SETTINGS
@given(st.integers(0, 10**6))
def test_max_pools_over_relus_merged_agree_with_brute_force(seed):
    """Relu -> MaxPool encoded as max(0, max of the pre-activations): fewer binaries, the same answers as the
    grid (HiGHS's MILP and the LP relaxation both stay sound)."""
    rng = np.random.default_rng(seed)
    _, chain = _chain(pooled_model(rng, relu_first=True), (2,))
    grid_z = chain.forward(unit_square())
    lo, hi = np.zeros(2), np.ones(2)
    _, tight = relaxed_bounds(chain, lo, hi)
    lower, upper = [b.lower for b in tight], [b.upper for b in tight]
    pool = [layer.kind for layer in chain.layers].index("max")
    fewer = 0
    for k in [k for k in chain.relu_layers if k > pool]:
        for i in np.flatnonzero((lower[k] < 0) & (upper[k] > 0)):
            for sign in (1.0, -1.0):
                plain = encode_unit(chain, lower, upper, lo, hi, UnitQuery(k, int(i), sign))
                unit = encode_unit(chain, lower, upper, lo, hi, UnitQuery(k, int(i), sign), merge_pools=True)
                assert len(unit.relus) <= len(plain.relus)
                fewer += len(unit.relus) < len(plain.relus)

                def flips(v, k=k, i=i, sign=sign):
                    return sign * chain.forward(v[None, :2])[k][0, i] > 1e-6

                extreme = (sign * grid_z[k][:, i]).max()
                lp = solve_lp(unit.program, 30.0)
                assert unit.threshold - lp.value >= extreme - 1e-7  # the relaxation bounds the true maximum
                best = unit.threshold - _optimum(unit.program)  # the MILP's exact maximum of s z
                assert best >= extreme - 1e-6  # never below a point the network reaches
                assert abs(best - (plain.threshold - _optimum(plain.program))) < 1e-5  # the same network (tolerances)
                res = threshold_search(unit.program, unit.threshold, 1e-6, flips, 30.0, 60.0)
                if res.status == "no":
                    assert extreme <= 1e-9, (k, i, sign)
                elif res.status == "found":
                    assert flips(res.point)
                if abs(extreme) > 1e-4:
                    assert res.status == ("found" if extreme > 0 else "no"), (k, i, sign, res.reason)
    relu0_unstable = bool(((lower[0] < 0) & (upper[0] > 0)).any())
    assert fewer > 0 or not relu0_unstable or not any(
        ((lower[k] < 0) & (upper[k] > 0)).any() for k in chain.relu_layers if k > pool)


def test_max_pool_branching_runs_in_onnxruntime_terms(rng):
    """The pooled chain is the network (onnxruntime), and programs with selection binaries are decided."""
    model = pooled_model(rng, relu_first=False)
    _, chain = _chain(model, (2,))
    x = rng.random((2000, 2), dtype=np.float32)
    relus = [k for k, layer in enumerate(chain.layers) if layer.kind == "relu"]
    for k, ref in zip(relus, _pre_activations(model, ["z1", "z2"], {"x": x}), strict=True):
        np.testing.assert_allclose(chain.forward(x)[k], ref, rtol=1e-5, atol=1e-5)
    grid = unit_square()
    assert _bab_against_grid(chain, chain.forward(grid), np.zeros(2), np.ones(2), relus) > 0


@pytest.mark.parametrize("bab_pools", [False, True])
def test_stage_with_max_pool_programs_agrees_with_brute_force(rng, bab_pools):
    _, chain = _chain(pooled_model(rng, relu_first=True), (2,))
    lo, hi = np.zeros(2), np.ones(2)
    _, tight = relaxed_bounds(chain, lo, hi)
    undecided = {(k, int(i)) for k in chain.relu_layers
                 for i in np.flatnonzero((tight[k].lower < 0) & (tight[k].upper > 0))}
    out = decide_units(chain, tight, lo, hi, set(undecided), set(undecided),
                       UnitStageOptions(time_limit=60, bab_pools=bab_pools))
    assert out.complete
    zs = chain.forward(unit_square())
    for k, i in undecided:
        top, bottom = zs[k][:, i].max(), zs[k][:, i].min()
        assert (k, i) not in out.proven_inactive or top <= 1e-9
        assert (k, i) not in out.proven_active or bottom >= -1e-9
        assert (top >= -1e-6 or (k, i) in out.proven_inactive) and (bottom <= 1e-6 or (k, i) in out.proven_active)
        assert (top <= 1e-4 or (k, i) in out.flipped_positive) and (bottom >= -1e-4 or (k, i) in out.flipped_negative)
    for (k, i), w in out.flipped_positive.items():
        assert chain.forward(out.witnesses[w][None])[k][0, i] > 0
    for (k, i), w in out.flipped_negative.items():
        assert chain.forward(out.witnesses[w][None])[k][0, i] < 0
