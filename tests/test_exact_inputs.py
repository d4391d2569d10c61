"""Exact mode on models with several float inputs: a box per input, parsed per name, stated in the certificate;
every claim agrees with brute force and 10,000 random box points in onnxruntime, every witness flips there, and
the exact compression is equal to the original on the box."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import init, make_model, run, vinfo
from onnx_lincomp.calibration import input_specs
from onnx_lincomp.calibration.data_source import CalibrationSource
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.cli import main
from onnx_lincomp.errors import CalibrationDataError
from onnx_lincomp.exact import CertifyOptions, certify, parse_domain
from onnx_lincomp.exact.bounds import relaxed_bounds
from onnx_lincomp.exact.chain import extract_chain
from onnx_lincomp.exact.witness_check import check_witnesses
from onnx_lincomp.model_io import model_from_proto
from onnx_lincomp.optimize import compress_exact

BOXES = {"a": (0.0, 1.0), "b": (-1.0, 0.4)}
SPEC = ["0,1", "b=-1,0.4"]


def two_input_model(rng: np.random.Generator, join: str, width: int = 6) -> onnx.ModelProto:
    """a (N,2) and b (N,1) meet before the first Relu: Concat(a, b) -> fc0 (``concat``), or Gemm(a) + MatMul(b)
    (``add``). Unit 0 of relu0 is stably inactive and unit 1 stably active only with b's own box (b <= 0.4): read
    with a's box [0, 1] they would be unstable."""
    w0 = rng.normal(0, 0.8, (width, 3)).astype(np.float32)
    b0 = rng.normal(0, 0.3, width).astype(np.float32)
    w0[0], b0[0] = [1.0, 0.0, 1.0], -1.5  # max over the boxes: 1 + 0.4 - 1.5 = -0.1
    w0[1], b0[1] = [0.0, 1.0, -1.0], 0.5  # min over the boxes: 0 - 0.4 + 0.5 = 0.1
    w1 = rng.normal(0, 0.6, (5, width)).astype(np.float32)
    b1 = rng.normal(0, 0.3, 5).astype(np.float32)
    w2 = rng.normal(0, 0.6, (2, 5)).astype(np.float32)
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", np.zeros(2, np.float32))]
    if join == "concat":
        inits += [init("w0", w0), init("b0", b0)]
        nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], name="cat", axis=1),
                 helper.make_node("Gemm", ["ab", "w0", "b0"], ["z0"], name="fc0", transB=1)]
    else:
        inits += [init("w0a", w0[:, :2].copy()), init("w0b", w0[:, 2:].copy()), init("b0", b0)]
        nodes = [helper.make_node("Gemm", ["a", "w0a", "b0"], ["ga"], name="fc0a", transB=1),
                 helper.make_node("MatMul", ["b", "w0b_t"], ["gb"], name="fc0b"),
                 helper.make_node("Add", ["ga", "gb"], ["z0"], name="join")]
        inits.append(init("w0b_t", w0[:, 2:].T.copy()))
    nodes += [helper.make_node("Relu", ["z0"], ["h0"], name="relu0"),
              helper.make_node("Gemm", ["h0", "w1", "b1"], ["z1"], name="fc1", transB=1),
              helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
              helper.make_node("Gemm", ["h1", "w2", "b2"], ["y"], name="fc2", transB=1)]
    return make_model(nodes, [vinfo("a", ["N", 2]), vinfo("b", ["N", 1])], [vinfo("y", ["N", 2])], inits)


def _pre_activations(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """The input of every Relu, from onnxruntime."""
    relus = {n.name: n.input[0] for n in model.graph.node if n.op_type == "Relu"}
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    ref.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in relus.values())
    outs = run(ref, feeds)[len(model.graph.output):]
    return {name: o.reshape(len(o), -1) for name, o in zip(relus, outs, strict=True)}


def _box_points(rng: np.random.Generator, n_random: int = 10000, steps: int = 31) -> dict[str, np.ndarray]:
    """A grid over the 3-dimensional box, its corners and ``n_random`` uniform points, per input."""
    (alo, ahi), (blo, bhi) = BOXES["a"], BOXES["b"]
    axes = [np.linspace(alo, ahi, steps), np.linspace(alo, ahi, steps), np.linspace(blo, bhi, steps)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    lo, hi = np.array([alo, alo, blo]), np.array([ahi, ahi, bhi])
    pts = np.concatenate([grid, lo + rng.random((n_random, 3)) * (hi - lo)]).astype(np.float32)
    return {"a": pts[:, :2], "b": pts[:, 2:]}


def _certified(model: onnx.ModelProto):
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    domain = parse_domain(SPEC, input_specs(loaded.graph))
    cert = certify(loaded.graph, loaded.ctx, domain, options=CertifyOptions(time_limit=60, random_points=256))
    return loaded, domain, cert


@pytest.mark.parametrize("join", ["concat", "add"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_inputs_claims_agree_with_brute_force_and_onnxruntime(join, seed):
    rng = np.random.default_rng(seed)
    model = two_input_model(rng, join)
    loaded, domain, cert = _certified(model)
    assert domain.inputs == ("a", "b") and cert.complete and not cert.not_certified
    assert domain.lower.tolist() == [0, 0, -1] and domain.upper.tolist() == [1, 1, 0.4]
    assert cert.layers[0].stably_inactive[0] and cert.layers[0].stably_active[1]  # only b's own box proves these
    feeds = _box_points(rng)
    pre = _pre_activations(model, feeds)
    for lc in cert.layers:
        z = pre[lc.relu]
        assert np.all(z[:, lc.stably_inactive] <= 0) and np.all(z[:, lc.stably_active] >= 0), lc.relu
        # completeness (the certificate is complete): a unit the grid shows strictly stable is proven
        assert np.all(lc.stably_inactive[z.max(axis=0) < -1e-3]) and np.all(lc.stably_active[z.min(axis=0) > 1e-3])
    # the flat chain is the network: its pre-activations match onnxruntime on the same points
    x = np.concatenate([feeds["a"], feeds["b"]], axis=1)
    zs = extract_chain(loaded.graph, domain.shapes, 17).forward(x)
    for lc, z in zip(cert.layers, zs, strict=True):
        np.testing.assert_allclose(z, pre[lc.relu], rtol=1e-5, atol=1e-5)
    # every witness is a point of both boxes and flips its unit in onnxruntime
    for relu, unit, kind, w in cert.witness_flips:
        point = cert.witnesses[w]
        assert np.all(point >= domain.lower) and np.all(point <= domain.upper)
        z = _pre_activations(model, domain.feeds(point[None]))[relu][0, unit]
        assert (z > 0) if kind == "positive" else (z < 0), (relu, unit, kind, z)
    check = check_witnesses(loaded.graph, loaded.ctx, cert)
    assert check.confirmed == check.channels_claimed_unstable and not check.failed


def test_bounds_use_each_inputs_own_box(rng):
    model = two_input_model(rng, "concat")
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    domain = parse_domain(SPEC, input_specs(loaded.graph))
    chain = extract_chain(loaded.graph, domain.shapes, 17)
    assert chain.inputs == ("a", "b") and chain.input_size == 3
    interval, tight = relaxed_bounds(chain, domain.lower, domain.upper)
    assert interval[0].upper[0] == pytest.approx(-0.1, abs=1e-6) and interval[0].lower[1] == pytest.approx(0.1,
                                                                                                           abs=1e-6)
    zs = chain.forward(domain.sample(rng, 5000))
    for z, b in zip(zs, tight, strict=True):
        assert np.all(z >= b.lower - 1e-9) and np.all(z <= b.upper + 1e-9)


@pytest.mark.parametrize("join", ["concat", "add"])
def test_two_input_exact_compression_is_equal_on_the_box_and_states_each_box(rng, join):
    model = two_input_model(rng, join)
    result = compress_exact(model_from_proto(model), tuple(SPEC), check_points=2000)
    cert = result.exact.certificate
    assert cert.complete
    onnx.checker.check_model(result.model, full_check=True)
    params = [sum(int(np.prod(t.dims)) for t in m.graph.initializer) for m in (model, result.model)]
    assert params[1] < params[0]  # the dead unit is removed, the linear one folded
    feeds = _box_points(rng, steps=11)
    for x, y in zip(run(model, feeds), run(result.model, feeds), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    meta = {p.key: p.value for p in result.model.metadata_props}
    stated = json.loads(meta["onnx_lincomp.exact.domain"])
    assert [(b["input"], b["shape"], b["lower"], b["upper"]) for b in stated["inputs"]] == [
        ("a", [2], 0.0, 1.0), ("b", [1], -1.0, 0.4)]
    assert "a: box [0, 1]^2" in stated["description"] and "b: box [-1, 0.4]^1" in stated["description"]


def test_domain_parsing_per_input(tmp_path, rng):
    specs = input_specs(model_from_proto(two_input_model(rng, "concat")).graph)
    d = parse_domain(["0,1", "b=-1,0.4"], specs)
    assert d.lower.tolist() == [0, 0, -1] and d.upper.tolist() == [1, 1, 0.4]
    d = parse_domain(["a=0,2", "b=0,1", "b=-3,3"], specs)  # later values replace earlier ones
    assert d.upper.tolist() == [2, 2, 3] and d.lower.tolist() == [0, 0, -3]
    np.savez(tmp_path / "both.npz", a_lower=[0, -1], a_upper=[1, 2], b_lower=[-1], b_upper=[0.5])
    d = parse_domain([str(tmp_path / "both.npz")], specs)
    assert d.lower.tolist() == [0, -1, -1] and d.upper.tolist() == [1, 2, 0.5]
    assert d.as_dict()["inputs"][0]["lower"] == "per-feature" and d.as_dict()["inputs"][0]["lower_range"] == [-1, 0]
    np.savez(tmp_path / "plain.npz", lower=[-2], upper=[2])
    d = parse_domain(["0,1", f"b={tmp_path / 'plain.npz'}"], specs)  # a file named for one input may be plain
    assert d.lower.tolist() == [0, 0, -2]
    x = {"a": rng.random((40, 2)).astype(np.float32), "b": -rng.random((40, 1)).astype(np.float32)}
    calib = CalibrationSource(specs, arrays=x, description="two arrays")
    d = parse_domain(["from-calib"], specs, calib=calib)
    np.testing.assert_allclose(d.lower, np.concatenate([x["a"].min(0), x["b"].min(0)]))
    np.testing.assert_allclose(d.upper, np.concatenate([x["a"].max(0), x["b"].max(0)]))
    np.testing.assert_allclose(d.flatten(x), np.concatenate([x["a"], x["b"]], axis=1))
    feeds = d.feeds(d.flatten(x))
    assert feeds["a"].shape == (40, 2) and feeds["b"].shape == (40, 1) and feeds["a"].dtype == np.float32
    for bad, msg in ((["b=0,1"], "no box for input 'a'"), (["c=0,1"], "names input 'c'"),
                     ([str(tmp_path / "plain.npz")], "'a_lower' and 'a_upper'"), (["0,0"], "single point")):
        with pytest.raises(CalibrationDataError, match=msg):
            parse_domain(bad, specs)


def test_a_non_float_input_is_refused(rng):
    model = two_input_model(rng, "concat")
    model.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.INT64
    with pytest.raises(CalibrationDataError, match="all float tensors"):
        parse_domain(["0,1"], input_specs(model_from_proto(model).graph))


def test_cli_certify_two_inputs(tmp_path, rng):
    onnx.save(two_input_model(rng, "add"), tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["certify", str(tmp_path / "m.onnx"), "--input-range", "0,1", "--input-range",
                                    "b=-1,0.4", "--json", "-"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["complete"] and [b["input"] for b in data["domain"]["inputs"]] == ["a", "b"]
    assert data["domain"]["inputs"][1]["lower"] == -1.0 and data["layers"][0]["stably_inactive_channels"] >= 1
