"""Exact mode: bounds are sound, MILP decisions agree with brute force, compression is exact on the box."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import assert_same_outputs, check_claims, mlp_model, read_idx, run, shared_path, unit_square
from onnx_lincomp.calibration import input_specs
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.cli import main
from onnx_lincomp.errors import CalibrationDataError
from onnx_lincomp.exact import CertifyOptions, certify, parse_domain
from onnx_lincomp.exact.bounds import relaxed_bounds
from onnx_lincomp.exact.chain import extract_chain
from onnx_lincomp.exact.milp import decide_candidates
from onnx_lincomp.model_io import load_model, model_from_proto
from onnx_lincomp.optimize import compress_exact

SETTINGS = settings()  # the profile (conftest) sets examples: 25 derandomised in CI, HYPOTHESIS_PROFILE=long for 500


def _chain(model, n_in):
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    return loaded, extract_chain(loaded.graph, (n_in,), 17)


@SETTINGS
@given(st.integers(0, 10**6), st.lists(st.integers(2, 12), min_size=2, max_size=4))
def test_bounds_are_sound_and_relaxation_is_tighter(seed, widths):
    rng = np.random.default_rng(seed)
    model = mlp_model(rng, widths + [2])
    _, chain = _chain(model, widths[0])
    lo, hi = -np.ones(widths[0]), np.ones(widths[0])
    interval, tight = relaxed_bounds(chain, lo, hi)
    x = rng.uniform(-1, 1, (4000, widths[0]))
    x[:8] = np.where(rng.random((8, widths[0])) < 0.5, -1.0, 1.0)  # corners
    for z, ib, tb in zip(chain.forward(x), interval, tight, strict=True):
        assert np.all(z >= tb.lower - 1e-9) and np.all(z <= tb.upper + 1e-9)
        assert np.all(tb.lower >= ib.lower - 1e-9) and np.all(tb.upper <= ib.upper + 1e-9)


def test_chain_matches_onnxruntime(rng):
    model = mlp_model(rng, [5, 7, 6, 3], kind="matmul")
    _, chain = _chain(model, 5)
    x = rng.random((20, 5), dtype=np.float32)
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    ref.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in ("z0", "z1"))
    outs = run(ref, {"x": x})[1:]
    for z, r in zip(chain.forward(x), outs, strict=True):
        np.testing.assert_allclose(z, r, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.integers(0, 10**6))
@example(178)  # a unit whose minimum over the box is -3.7e-5: below the first witness margin, still unstable
def test_milp_agrees_with_brute_force_in_two_dimensions(seed):
    rng = np.random.default_rng(seed)
    model = mlp_model(rng, [2, 6, 5, 2])
    _, chain = _chain(model, 2)
    lo, hi = np.zeros(2), np.ones(2)
    _, tight = relaxed_bounds(chain, lo, hi)
    undecided = {(k, i) for k, b in enumerate(tight) for i in np.flatnonzero((b.lower < 0) & (b.upper > 0))}
    out = decide_candidates(chain, tight, lo, hi, set(undecided), set(undecided), time_limit=60)
    assert out.complete
    grid = unit_square()
    zs = chain.forward(grid)
    check_claims(chain, out, zs)
    # brute force finds no unit stable that the MILP left unstable (completeness on this grid)
    for k, i in undecided - out.proven_inactive:
        assert (k, i) in out.flipped_positive
    for k, i in undecided - out.proven_active:
        assert (k, i) in out.flipped_negative


@SETTINGS
@given(st.integers(0, 10**6))
def test_exact_compression_equals_original_on_the_box(seed):
    rng = np.random.default_rng(seed)
    widths = [int(rng.integers(3, 8)), int(rng.integers(6, 14)), int(rng.integers(6, 14)), 3]
    dead = {0: list(rng.choice(widths[1], 2, replace=False)), 1: list(rng.choice(widths[2], 2, replace=False))}
    linear = {0: [u for u in range(3) if u not in dead[0]]}
    model = mlp_model(rng, widths, dead=dead, linear=linear)
    result = compress_exact(model_from_proto(model), ("0,1",), check_points=2000)
    assert result.exact.certificate.complete
    for k, units in dead.items():
        assert result.exact.certificate.layers[k].stably_inactive[units].all()
    x = rng.random((10000, widths[0]), dtype=np.float32)
    assert_same_outputs(model, result.model, {"x": x}, rtol=1e-5, atol=1e-5)
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert json.loads(meta["onnx_lincomp.exact.domain"])["lower"] == 0.0
    assert "proven_in_original" in json.loads(meta["onnx_lincomp.exact.certificate"])
    assert result.exact.witness_check.confirmed == result.exact.witness_check.channels_claimed_unstable


def test_domain_parsing(tmp_path, rng):
    loaded = model_from_proto(mlp_model(rng, [4, 5, 2]))
    specs = input_specs(loaded.graph)
    assert parse_domain(["x=-1,2"], specs).upper.tolist() == [2.0] * 4
    np.savez(tmp_path / "b.npz", lower=np.zeros(4), upper=np.arange(1, 5))
    assert parse_domain([str(tmp_path / "b.npz")], specs).upper.tolist() == [1, 2, 3, 4]
    for bad, msg in ((["2,1"], "above upper"), (["y=0,1"], "names input 'y'"), (["a,b"], "LO,HI"),
                     ([], "needs --input-range")):
        with pytest.raises(CalibrationDataError, match=msg):
            parse_domain(bad, specs)


def test_serra_mnist_has_no_stable_neurons_and_accuracy_is_unchanged(tmp_path):
    path = shared_path("models", "exact-compression", "serra_mnist_100x100.onnx")
    images = read_idx(shared_path("data", "mnist",
                                  "t10k-images-idx3-ubyte.gz")).reshape(-1, 784).astype(np.float32) / 255
    labels = read_idx(shared_path("data", "mnist", "t10k-labels-idx1-ubyte.gz"))
    np.savez(tmp_path / "mnist.npz", input=images, y=labels)
    result = compress_exact(load_model(path), ("0,1",), calib=str(tmp_path / "mnist.npz"), check_points=2000)
    cert = result.exact.certificate
    assert cert.complete
    assert all(int(lc.stably_active.sum()) == 0 and int(lc.stably_inactive.sum()) == 0 for lc in cert.layers)
    acc_before = (run(onnx.load(path), {"input": images})[0].argmax(1) == labels).mean()
    acc_after = (run(result.model, {"input": images})[0].argmax(1) == labels).mean()
    assert acc_before == acc_after == pytest.approx(0.9789, abs=1e-4)


def test_serra_cifar10_sound_and_complete():
    path = shared_path("models", "exact-compression", "serra_cifar10_400x400_l1_pruned.onnx")
    loaded = load_model(path)
    canonicalize(loaded.graph)
    cert = certify(loaded.graph, loaded.ctx, parse_domain(["0,1"], input_specs(loaded.graph)),
                   options=CertifyOptions(time_limit=60))
    counts = [(int(lc.stably_active.sum()), int(lc.stably_inactive.sum())) for lc in cert.layers]
    assert counts == [(85, 0), (116, 0)] and cert.complete
    assert cert.seconds["total"] < 30
    from onnx_lincomp.exact.witness_check import check_witnesses
    check = check_witnesses(loaded.graph, loaded.ctx, cert)
    assert check.channels_claimed_unstable == 163 and check.confirmed == 163


def test_cli_certify_and_exact_optimize(tmp_path, rng):
    model = mlp_model(rng, [4, 8, 6, 2], dead={0: [1]}, linear={0: [2]})
    onnx.save(model, tmp_path / "m.onnx")
    runner = CliRunner()
    res = runner.invoke(main, ["certify", str(tmp_path / "m.onnx"), "--input-range", "0,1", "--json", "-"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["complete"] and data["layers"][0]["stably_inactive_channels"] >= 1
    out = tmp_path / "e.onnx"
    res = runner.invoke(main, ["optimize", "--exact", str(tmp_path / "m.onnx"), "--input-range", "0,1", "-o", str(out)])
    assert res.exit_code == 0, res.output and "COMPLETE" in res.output
    assert any(p.key == "onnx_lincomp.exact.certificate" for p in onnx.load(out).metadata_props)
    res = runner.invoke(main, ["certify", str(tmp_path / "m.onnx"), "--input-range", "1,0"])
    assert res.exit_code == 3 and "above upper bound" in res.stderr


def test_all_inactive_layer_makes_the_output_constant(rng):
    model = mlp_model(rng, [4, 6, 5, 3], dead={0: list(range(6))})
    result = compress_exact(model_from_proto(model), ("0,1",), check_points=1000)
    assert result.exact.certificate.layers[0].stably_inactive.all()
    x = rng.random((50, 4), dtype=np.float32)
    y = run(result.model, {"x": x})[0]
    np.testing.assert_allclose(y, np.broadcast_to(y[0], y.shape), rtol=0, atol=0)
    np.testing.assert_allclose(y, run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    y_far = run(result.model, {"x": 10 * rng.normal(size=(5, 4)).astype(np.float32)})[0]
    np.testing.assert_allclose(y_far, np.broadcast_to(y[0], y_far.shape))  # constant everywhere now


def test_a_single_point_box_is_refused(rng):
    model = mlp_model(rng, [4, 8, 2])
    specs = input_specs(model_from_proto(model).graph)
    with pytest.raises(CalibrationDataError, match="is a single point"):
        parse_domain(["0,0"], specs)
