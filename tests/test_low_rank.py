"""low-rank: the factorised layers equal the original at full rank (Conv attributes, Gemm attributes, MatMul,
groups k), the measured operator-norm error matches the SVD prediction at reduced rank, budgets are met,
data-aware beats weight space on correlated inputs, the must-not-fire cases and bad options."""
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import cnn_model, init, make_model, mlp_model, run, vinfo
from onnx_lincomp.analysis.low_rank_alloc import Allocator, Spectrum, choices, divisors
from onnx_lincomp.analysis.model_report import graph_figures
from onnx_lincomp.calibration.activations import CalibrationData
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.cli import main
from onnx_lincomp.errors import OptionError, PassError
from onnx_lincomp.graph_edit import NameSource
from onnx_lincomp.linear_layer import LinearLayer, match_linear_layer
from onnx_lincomp.model_io import load_model, model_from_proto, to_model_proto
from onnx_lincomp.passes import LowRankOptions, PassContext
from onnx_lincomp.passes.low_rank import write_factorised
from onnx_lincomp.pipeline import run_pipeline
from onnx_lincomp.recipe import PassSpec
from test_passes import _array_source


def _low_rank(model, x=None, **options):
    """Run low-rank (data-aware when ``x`` is given); the checked output model and the pass record."""
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    data = CalibrationData(_array_source(loaded, x), loaded.ctx, len(x)) if x is not None else None
    options.setdefault("data_aware", x is not None)
    records = run_pipeline(loaded.graph, (PassSpec.of("low-rank", options),), PassContext(None, data))
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, records[0]


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _conv_model(rng, c, f, kernel, strides, pads, dilations, bias=True, side=9):
    w = rng.normal(0, 0.3, (f, c, *kernel)).astype(np.float32)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", rng.normal(0, 0.1, f).astype(np.float32))] if bias else [])
    node = helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=list(kernel), strides=list(strides),
                            pads=list(pads), dilations=list(dilations))
    shape = ["N", c] + [side] * len(kernel)
    return make_model([node], [vinfo("x", shape)], [vinfo("y", None)], inits), shape


def _factorise_fully(model, k, cov_rng=None):
    """Write the single layer of ``model`` at full rank with ``k`` groups (optionally whitened factors)."""
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    layer = next(lay for n in loaded.graph.nodes if isinstance(lay := match_linear_layer(loaded.graph, n), LinearLayer))
    w = layer.weight.reshape(layer.out_features, -1)
    cov = None
    if cov_rng is not None:
        a = cov_rng.normal(size=(w.shape[1], w.shape[1]))
        cov = a @ a.T / w.shape[1] + 0.1 * np.eye(w.shape[1])
    sp = Spectrum(w, int(layer.weight.shape[1]), cov)
    enc, dec = sp.factors(k, sp.rank_max(k))
    write_factorised(loaded.graph, NameSource(loaded.graph), layer, enc, dec, layer.bias, k)
    loaded.graph.cleanup().toposort()
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    return out


def _same(a, b, feeds, tol=1e-4):
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        scale = max(float(np.abs(x).max()), 1.0)
        np.testing.assert_allclose(y, x, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("c,f,kernel,strides,pads,dilations,k", [
    (4, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    (4, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    (6, 5, (3, 2), (2, 1), (0, 1, 2, 0), (1, 2), 3),
    (8, 4, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4),
    (6, 7, (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 2),
    (4, 3, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 4),
    (4, 6, (3,), (2,), (1, 0), (1,), 2),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_full_rank_equals_original(rng, c, f, kernel, strides, pads, dilations, k, bias):
    model, shape = _conv_model(rng, c, f, kernel, strides, pads, dilations, bias)
    out = _factorise_fully(model, k, cov_rng=rng if k % 2 == 0 else None)
    assert _ops(out) == ["Conv", "Conv"]
    enc = next(n for n in out.graph.node if any(a.name == "group" for a in n.attribute))
    assert helper.get_attribute_value(next(a for a in enc.attribute if a.name == "group")) == k
    x = rng.normal(size=[3] + shape[1:]).astype(np.float32)
    _same(model, out, {"x": x})


@pytest.mark.parametrize("trans_b,alpha,beta,bias", [(1, 1.0, 1.0, True), (0, 1.0, 1.0, True), (1, 0.5, 2.0, True),
                                                      (0, 1.7, 0.3, True), (1, 1.0, 1.0, False)])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_gemm_full_rank_equals_original(rng, trans_b, alpha, beta, bias, k):
    n, f = 10, 7
    w = rng.normal(size=(f, n) if trans_b else (n, f)).astype(np.float32)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", rng.normal(size=f).astype(np.float32))] if bias else [])
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([node], [vinfo("x", ["N", n])], [vinfo("y", ["N", f])], inits)
    out = _factorise_fully(model, k, cov_rng=rng if k == 2 else None)
    assert ("Split" in _ops(out)) == (k > 1) and _ops(out).count("MatMul") == (2 if k == 1 else k + 1)
    _same(model, out, {"x": rng.normal(size=(4, n)).astype(np.float32)})


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_full_rank_equals_original(rng, opset, k, bias):
    n, f = 12, 9
    w = rng.normal(size=(n, f)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm" if bias else "y"], name="mm")]
    inits = [init("w", w)]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["y"], name="add"))
        inits.append(init("b", rng.normal(size=f).astype(np.float32)))
    model = make_model(nodes, [vinfo("x", ["N", 5, n])], [vinfo("y", ["N", 5, f])], inits, opset=opset)
    out = _factorise_fully(model, k)
    _same(model, out, {"x": rng.normal(size=(2, 5, n)).astype(np.float32)})


def _effective_matrix(model, n):
    """``W`` as onnxruntime computes it: outputs on the identity minus outputs on zero."""
    eye, zero = np.eye(n, dtype=np.float32), np.zeros((n, n), np.float32)
    return (run(model, {"x": eye})[0] - run(model, {"x": zero})[0]).T.astype(np.float64)


def test_reduced_rank_error_matches_the_svd(rng):
    n, f = 20, 12
    w = rng.normal(size=(f, n)).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
                       [vinfo("x", ["N", n])], [vinfo("y", ["N", f])],
                       [init("w", w), init("b", rng.normal(size=f).astype(np.float32))])
    out, rec = _low_rank(model, method="uniform", rank_ratio=0.25, min_rank_out=0.0)
    assert rec.result.rewritten == 1 and _ops(out) == ["MatMul", "MatMul", "Add"]
    w64 = w.astype(np.float64)
    measured = np.linalg.norm(w64 - _effective_matrix(out, n), 2) / np.linalg.norm(w64, 2)
    s = np.linalg.svd(w64, compute_uv=False)
    assert measured == pytest.approx(s[3] / s[0], rel=1e-4)  # rank ceil(0.25 * 12) = 3
    assert "rank 3" in rec.result.notes[0] and f"op-norm error {measured:.3g}" in rec.result.notes[0]


@pytest.mark.parametrize("k", [2, 4])
def test_grouped_error_lies_between_the_bounds(rng, k):
    w = rng.normal(size=(10, 24))
    sp = Spectrum(w, 24)
    for j in (1, 3, 5):
        bound = sp.errors(k)[j]
        true, _ = sp.true_errors(sp.approximation(k, j))
        assert bound - 1e-9 <= true <= np.sqrt(k) * bound + 1e-9


@pytest.mark.parametrize("aware", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_exact_grouped_errors_match_the_factorised_layer(rng, k, aware):
    w = rng.normal(size=(9, 30))
    a = rng.normal(size=(30, 30))
    sp = Spectrum(w, 30, a @ a.T / 30 + 0.1 * np.eye(30) if aware else None)
    exact = sp.errors(k, "exact")
    for j in range(1, sp.rank_max(k)):
        weight_err, data_err = sp.true_errors(sp.approximation(k, j))
        assert exact[j] == pytest.approx(data_err if aware else weight_err, rel=1e-6)
        assert exact[j] >= sp.errors(k, "bound")[j] - 1e-9 or aware  # the refit decoder may beat the bound


def _correlated(rng, n, d, rank=4):
    z = rng.normal(size=(n, rank))
    return (z @ rng.normal(size=(rank, d)) + 0.05 * rng.normal(size=(n, d))).astype(np.float32)


def test_data_aware_beats_weight_space_on_correlated_inputs(rng):
    model = mlp_model(rng, [16, 24, 6])
    data = _correlated(rng, 600, 16)
    x, held = data[:400], data[400:]
    ref = run(model, {"x": held})[0]
    errs = {}
    for aware in (False, True):
        out, rec = _low_rank(model, x, method="uniform", rank_ratio=0.3, data_aware=aware, min_rank_out=0.0)
        assert rec.result.rewritten == 2
        errs[aware] = float(np.abs(run(out, {"x": held})[0] - ref).max())
    assert errs[True] < 0.5 * errs[False]


def test_whitening_from_fewer_rows_than_inputs_is_said(rng):
    """A covariance estimated from fewer calibration rows than the layer has inputs is rank-deficient: each such
    layer's note says so; with enough rows it must not."""
    model = mlp_model(rng, [16, 24, 6])
    for n, said in ((10, True), (400, False)):
        _, rec = _low_rank(model, _correlated(rng, n, 16), method="uniform", rank_ratio=0.3, min_rank_out=0.0)
        notes = [x for x in rec.result.notes if not x.startswith("allocation: ")]
        assert notes and all(("rank-deficient" in x) == said for x in notes)
        if said:
            assert "whitened from 10 calibration rows for 16 inputs" in notes[0]


@pytest.mark.parametrize("method", ["alds", "uniform", "energy"])
@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_parameter_budget_is_met(rng, method, keep):
    model = mlp_model(rng, [48, 64, 56, 10])
    before = graph_figures(model_from_proto(model).graph).params
    out, rec = _low_rank(model, method=method, keep_params=keep)
    after = graph_figures(model_from_proto(out).graph).params
    assert after <= keep * before and after >= keep * before - 0.06 * before
    assert rec.result.count("weights_after") < rec.result.count("weights_before")


def test_mac_budget_is_met_on_a_cnn(rng):
    model = _two_conv_model(rng)
    before = graph_figures(model_from_proto(model).graph).macs
    x = rng.normal(size=(64, 8, 10, 10)).astype(np.float32)
    out, rec = _low_rank(model, x, keep_macs=0.5)
    after = graph_figures(model_from_proto(out).graph).macs
    assert 0.4 * before <= after <= 0.5 * before
    _bounded_change(model, out, x)


def test_mac_budget_on_dynamic_sides_counts_macs_at_the_data_size(rng):
    """Sides unknown in the graph: the MACs are counted at the calibration data's size, so the budget is met
    exactly as on the static twin (with every side taken as 1 the model would seem to have no MACs)."""
    x = rng.normal(size=(64, 8, 10, 10)).astype(np.float32)
    static, _ = _low_rank(_two_conv_model(np.random.default_rng(5)), x, keep_macs=0.5)
    dynamic, rec = _low_rank(_two_conv_model(np.random.default_rng(5), side="side"), x, keep_macs=0.5)
    assert [tuple(i.dims) for i in static.graph.initializer] == [tuple(i.dims) for i in dynamic.graph.initializer]
    assert rec.after.macs == graph_figures(model_from_proto(static).graph).macs > 0


def _two_conv_model(rng, side: int | str = 10):
    w1 = rng.normal(0, 0.2, (24, 8, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (16, 24, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    inits = [init("w1", w1), init("b1", np.zeros(24, np.float32)), init("w2", w2),
             init("b2", np.zeros(16, np.float32))]
    return make_model(nodes, [vinfo("x", ["N", 8, side, side])], [vinfo("y", ["N", 16, side, side])], inits)


def _bounded_change(model, out, x):
    a, b = run(model, {"x": x})[0], run(out, {"x": x})[0]
    assert np.isfinite(b).all() and np.abs(a - b).max() < 2 * np.abs(a).max()


def test_alds_has_the_lowest_worst_layer_error(rng):
    model = _two_conv_model(rng)
    worst = {}
    for method in ("alds", "uniform"):
        _, rec = _low_rank(model, method=method, keep_params=0.5)
        bounds = [float(note.split("predicted ")[1].split(")")[0]) for note in rec.result.notes]
        worst[method] = max(bounds)
    assert worst["alds"] <= worst["uniform"] + 1e-9


def _decaying_gemm(rng, f, n, decay=0.8):
    """A Gemm + Relu whose weight has singular values ``decay ** i``."""
    u, _ = np.linalg.qr(rng.normal(size=(f, f)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    r = min(f, n)
    w = (u[:, :r] * decay ** np.arange(r)) @ v[:, :r].T
    return make_model([helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
                       helper.make_node("Relu", ["h"], ["y"], name="relu")],
                      [vinfo("x", ["N", n])], [vinfo("y", ["N", f])], [init("w", w.astype(np.float32))]), w


def test_energy_threshold_keeps_the_energy(rng):
    model, w = _decaying_gemm(rng, 40, 30)
    _, rec = _low_rank(model, method="energy", energy=0.9, min_rank_out=0.0)
    s2 = np.linalg.svd(w, compute_uv=False) ** 2
    rank = int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.9 - 1e-9) + 1)
    assert f"rank {rank}:" in rec.result.notes[0]


def test_output_layer_guard_and_layers_that_would_grow(rng):
    model = mlp_model(rng, [40, 50, 10])
    _, rec = _low_rank(model, keep_params=0.8, max_groups=1)  # k = 1: rank 10 of 10 saves nothing
    assert any("output width" in r for r in rec.result.skipped)
    assert rec.result.rewritten == 1
    tiny = make_model([helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
                       helper.make_node("Relu", ["h"], ["y"], name="relu")],
                      [vinfo("x", ["N", 2])], [vinfo("y", ["N", 2])], [init("w", rng.normal(size=(2, 2)).astype(
                          np.float32))])
    out, rec = _low_rank(tiny, keep_params=1.0, min_rank_out=0.0)
    assert not rec.result.changed and any("no factorised form" in r for r in rec.result.skipped)


def test_grouped_conv_is_skipped(rng):
    w = rng.normal(size=(8, 2, 3, 3)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="gconv", group=4, pads=[1, 1, 1, 1]),
                        helper.make_node("Relu", ["c"], ["y"], name="relu")],
                       [vinfo("x", ["N", 8, 6, 6])], [vinfo("y", ["N", 8, 6, 6])], [init("w", w)])
    out, rec = _low_rank(model, keep_params=0.9)
    assert not rec.result.changed and rec.result.skipped.get("grouped or depthwise Conv") == 1
    assert _ops(out) == ["Conv", "Relu"]


def test_classifier_is_cut_only_to_meet_the_budget_and_says_so(rng):
    model = cnn_model(rng)  # the Gemm classifier holds most weights
    out, rec = _low_rank(model, keep_params=0.6, max_groups=1)
    assert any("output layer cut below its 4 outputs" in n for n in rec.result.notes)


def test_per_layer_override(rng):
    model = mlp_model(rng, [30, 40, 30, 10])
    _, rec = _low_rank(model, method="uniform", rank_ratio=0.5, layers={"fc0": 0.0, "fc1": 0.2})
    assert rec.result.rewritten == 1 and rec.result.notes[0].startswith("fc1: k=1 rank 6:")
    with pytest.raises(PassError, match="overrides"):
        _low_rank(model, layers={"nope": 0.5})


@pytest.mark.parametrize("options,message", [
    ({"keep_params": 0.0}, "fraction"), ({"keep_params": 1.5}, "fraction"), ({"keep_macs": -1.0}, "fraction"),
    ({"keep_params": 0.5, "keep_macs": 0.5}, "not both"), ({"rank_ratio": 0.5}, "method uniform"),
    ({"method": "energy", "energy": 0.9, "keep_params": 0.5}, "not both"), ({"method": "svd"}, "method"),
    ({"max_groups": 0}, "max_groups"), ({"layers": {"fc0": 2.0}}, "fc0"),
])
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        LowRankOptions(**options)


def test_infeasible_budget_and_missing_data_are_usage_errors(rng):
    model = mlp_model(rng, [40, 50, 30, 10])
    with pytest.raises(PassError, match="keep_params 0.05 cannot be met") as info:
        _low_rank(model, keep_params=0.05)
    assert info.value.exit_code == 2
    loaded = model_from_proto(model)
    with pytest.raises(PassError, match="needs calibration data"):
        run_pipeline(loaded.graph, (PassSpec.of("low-rank", {}),), PassContext(None, None))


def test_allocation_of_fifty_layers_takes_seconds(rng):
    tables = []
    for _ in range(50):
        sp = Spectrum(rng.normal(size=(16, 16 * 9)), 16)
        tables.append({k: choices(sp.errors(k, "exact"), k, 16, 144, 1.0, 1) for k in divisors(16, 8)})
    dense = 50 * 16 * 144
    start = time.perf_counter()
    alloc = Allocator(tables, 0.3 * dense).alds((2, 3, 4, 5, 8), 4)
    assert time.perf_counter() - start < 5.0
    assert alloc is not None and 0.29 * dense <= alloc.size <= 0.3 * dense


def test_composes_after_pruning(rng):
    model = _two_conv_model(rng)
    x = np.abs(rng.normal(size=(64, 8, 10, 10))).astype(np.float32)
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    data = CalibrationData(_array_source(loaded, x), loaded.ctx, len(x))
    specs = (PassSpec.of("prune-channels", {"sparsity": 0.25, "channel_multiple": 1}),  # 16 wide: below one block
             PassSpec.of("low-rank", {"keep_params": 0.6}))
    records = run_pipeline(loaded.graph, specs, PassContext(None, data))
    assert [r.result.name for r in records] == ["prune-channels", "low-rank"]
    assert records[1].after.params < records[1].before.params < records[0].before.params
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    _bounded_change(model, out, x)


def test_cli_low_rank_on_the_example(tmp_path):
    out = str(tmp_path / "lr.onnx")
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "--passes", "low-rank", "--keep-params",
                                    "0.6", "-o", out, "--no-latency"])
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert "low-rank" in res.output and "k=" in res.output
    bad = str(tmp_path / "bad.onnx")
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "--passes", "low-rank", "--keep-params",
                                    "0.01", "-o", bad, "--no-latency"])
    assert res.exit_code == 2 and "cannot be met" in res.output and not os.path.exists(bad)


def test_latency_check_limits_slow_layers_to_k1_then_dense(rng, monkeypatch):
    import onnx_lincomp.passes.low_rank as low_rank

    model = mlp_model(rng, [64, 96, 64, 10])
    calls = []

    def grouped_slow(site, k, rank, timings):  # grouped forms and fc0 are "slower"
        calls.append((site.name, k))
        return k > 1 or site.name == "fc0"

    monkeypatch.setattr(low_rank, "_slower", grouped_slow)
    _, rec = _low_rank(model, keep_params=0.7, check_latency=True)
    assert calls and all(" k=1 " in n for n in rec.result.notes)
    assert not any(n.startswith("fc0:") for n in rec.result.notes)
    # fc2 (the classifier) may not go to k = 1 below its 10 outputs: dense as well
    assert rec.result.skipped.get("the factorised form ran slower in onnxruntime (latency check)") == 2
    # when the budget needs a slow layer it stays, and the report says so
    monkeypatch.setattr(low_rank, "_slower", lambda site, k, rank, timings: True)
    _, rec = _low_rank(model, keep_params=0.5, check_latency=True)
    assert any("kept to meet the budget" in n for n in rec.result.notes)


def test_single_layer_timing_models_are_valid(rng):
    from onnx_lincomp.passes.low_rank import _single_layer_models

    loaded = model_from_proto(_two_conv_model(rng))
    layer = match_linear_layer(loaded.graph, next(n for n in loaded.graph.nodes if n.name == "conv2"))
    dense, factorised = _single_layer_models(layer, 4, 3)
    assert _ops(factorised) == ["Conv", "Conv"]
    x = rng.normal(size=(2, 24, 10, 10)).astype(np.float32)
    assert run(dense, {"x": x})[0].shape == run(factorised, {"x": x})[0].shape == (2, 16, 10, 10)


def _factorise_in_form(model, k, form, rank=None):
    """Write the single layer of ``model`` with ``k`` groups in ``form`` (full rank unless ``rank``)."""
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    layer = next(lay for n in loaded.graph.nodes if isinstance(lay := match_linear_layer(loaded.graph, n), LinearLayer))
    sp = Spectrum(layer.weight.reshape(layer.out_features, -1), int(layer.weight.shape[1]))
    enc, dec = sp.factors(k, rank or sp.rank_max(k))
    write_factorised(loaded.graph, NameSource(loaded.graph), layer, enc, dec, layer.bias, k, form)
    loaded.graph.cleanup().toposort()
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    return out


@pytest.mark.parametrize("form", ["split", "batched"])
@pytest.mark.parametrize("trans_b,alpha,beta,bias", [(1, 1.0, 1.0, True), (0, 0.5, 2.0, True), (1, 1.0, 1.0, False)])
@pytest.mark.parametrize("k", [2, 5])
def test_grouped_gemm_forms_equal_the_original_at_full_rank(rng, form, trans_b, alpha, beta, bias, k):
    n, f = 20, 7
    w = rng.normal(size=(f, n) if trans_b else (n, f)).astype(np.float32)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", rng.normal(size=f).astype(np.float32))] if bias else [])
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([node], [vinfo("x", ["N", n])], [vinfo("y", ["N", f])], inits)
    out = _factorise_in_form(model, k, form)
    ops = _ops(out)
    assert ("Split" in ops) == (form == "split") and ops.count("Transpose") == (2 if form == "batched" else 0)
    assert ops.count("MatMul") == (k + 1 if form == "split" else 2)
    for batch in (1, 6):
        _same(model, out, {"x": rng.normal(size=(batch, n)).astype(np.float32)}, tol=1e-5)


@pytest.mark.parametrize("form", ["split", "batched"])
@pytest.mark.parametrize("lead", [[5], [3, 4]])
def test_grouped_matmul_forms_equal_the_original_at_full_rank(rng, form, lead):
    n, f, k = 12, 9, 3
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="add")]
    inits = [init("w", rng.normal(size=(n, f)).astype(np.float32)), init("b", rng.normal(size=f).astype(np.float32))]
    model = make_model(nodes, [vinfo("x", ["N", *lead, n])], [vinfo("y", ["N", *lead, f])], inits)
    out = _factorise_in_form(model, k, form)
    _same(model, out, {"x": rng.normal(size=(2, *lead, n)).astype(np.float32)}, tol=1e-5)


def test_grouped_forms_agree_at_reduced_rank(rng):
    model = mlp_model(rng, [24, 10])
    split, batched = (_factorise_in_form(model, 4, form, rank=2) for form in ("split", "batched"))
    _same(split, batched, {"x": rng.normal(size=(5, 24)).astype(np.float32)}, tol=1e-5)


def test_the_pass_writes_the_form_asked_or_measured(rng, monkeypatch):
    import onnx_lincomp.passes.low_rank as low_rank
    import onnx_lincomp.runtime.latency as latency

    model = mlp_model(rng, [64, 96, 64, 10])
    x = rng.normal(size=(4, 64)).astype(np.float32)
    outs = {}
    for form in ("split", "batched"):
        outs[form], rec = _low_rank(model, keep_params=0.5, max_groups=8, grouped_form=form, choose_on_data=False)
        grouped = [n for n in rec.result.notes if " k=1 " not in n]
        assert grouped and all(f"grouped form: {low_rank._FORM_NAMES[form]} (as asked)" in n for n in grouped)
        assert ("Split" in _ops(outs[form])) == (form == "split")
    _same(outs["split"], outs["batched"], {"x": x}, tol=1e-5)
    calls = []
    real = latency.compare_models_latency
    monkeypatch.setattr(latency, "compare_models_latency", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out, rec = _low_rank(model, keep_params=0.5, max_groups=8)
    grouped = [n for n in rec.result.notes if " k=1 " not in n]
    assert grouped and all("grouped form:" in n and "measured: batched MatMul takes" in n for n in grouped)
    shapes = {n.split(": ")[1].split(":")[0] for n in grouped}
    assert len(calls) == 2 * len(shapes)  # batch 1 and 32, once per layer shape
    _same(outs["split"], out, {"x": x}, tol=1e-5)


def test_grouped_form_of_a_matmul_of_unknown_rank_is_split(rng):
    from onnx_lincomp.passes.low_rank import _grouped_form, _Timings

    w = rng.normal(size=(12, 6)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vinfo("x", None)],
                       [vinfo("y", None)], [init("w", w)])
    loaded = model_from_proto(model)
    layer = match_linear_layer(loaded.graph, loaded.graph.nodes[0])
    form, why = _grouped_form(layer, 3, 2, _Timings("measure"))
    assert form == "split" and "rank is unknown" in why


def test_alds_candidates_hold_the_min_max_allocation(rng):
    tables = []
    for f, n in ((16, 48), (24, 32), (10, 24)):
        sp = Spectrum(rng.normal(size=(f, n)), n)
        tables.append({k: choices(sp.errors(k, "exact"), k, f, n, 1.0, 1) for k in divisors(n, 8)})
    allocator = Allocator(tables, 0.5 * sum(f * n for f, n in ((16, 48), (24, 32), (10, 24))))
    found = allocator.alds_candidates((2, 3, 4), 4)
    assert 1 in found and len({(a.ks, a.index) for a in found.values()}) == len(found)
    best = allocator.alds((2, 3, 4), 4)
    assert best.objective == min(a.objective for a in found.values())
    assert allocator.result(list(zip(best.ks, best.index, strict=True))) == best


def _relative_output_error(model, out, x):
    a, b = run(model, {"x": x})[0].astype(np.float64), run(out, {"x": x})[0].astype(np.float64)
    return float(((b - a) ** 2).sum() / ((a - a.mean(axis=0)) ** 2).sum())


@pytest.mark.parametrize("aware", [False, True])
@pytest.mark.parametrize("keep", [0.6, 0.4])
def test_alds_on_data_is_no_worse_than_uniform_on_the_calibration_outputs(rng, aware, keep):
    model = mlp_model(rng, [32, 48, 40, 10])
    x = _correlated(rng, 300, 32, rank=10)
    errors, notes = {}, {}
    for method in ("alds", "uniform"):
        out, rec = _low_rank(model, x, method=method, keep_params=keep, data_aware=aware)
        errors[method], notes[method] = _relative_output_error(model, out, x), rec.result.notes
    assert errors["alds"] <= errors["uniform"] * (1 + 1e-4) + 1e-9
    head = notes["alds"][0]
    assert head.startswith("allocation: ") and "chosen by relative output error on 300 calibration samples" in head
    measured = float(head.split("(")[1].split(";")[0])  # the pass's own figure for the kept allocation
    assert measured == pytest.approx(errors["alds"], rel=1e-2, abs=1e-6)
    assert not any(n.startswith("allocation: ") for n in notes["uniform"])


def test_optimize_reports_heldout_error_per_factorised_layer(tmp_path):
    """optimize measures each factorised layer's output on the held-out split (never seen by the pass) against the
    canonical model: the figures in the report equal an independent onnxruntime run, and a weaker budget errs more."""
    from onnx_lincomp.examples import example_paths
    from onnx_lincomp.optimize import OptimizeOptions, optimize
    from onnx_lincomp.recipe import CalibrationSettings, Recipe

    model, calib = (str(p) for p in example_paths("digits-mlp"))
    errors = {}
    for keep in (0.8, 0.5):
        recipe = Recipe((PassSpec.of("low-rank", {"keep_params": keep}),), CalibrationSettings(0.3))
        result = optimize(model, calib, OptimizeOptions(recipe, latency=False, max_output_change=None))
        per = result.report.layer_errors["low-rank"]
        assert per and all(v >= 0 for v in per.values())
        assert result.report.as_dict()["layer_errors_heldout"] == result.report.layer_errors
        assert any("held-out samples" in m for m in result.report.messages)
        errors[keep] = per
    assert max(errors[0.5].values()) > max(errors[0.8].values())
    # independent check of one layer on the held-out rows of the data file
    data = np.load(calib)
    x = data[[k for k in data.files if k != "y"][0]]
    held = x[len(x) - int(round(len(x) * 0.3)):].astype(np.float32)
    loaded = load_model(model)
    canonicalize(loaded.graph)
    site = next(iter(errors[0.5]))
    recipe = Recipe((PassSpec.of("low-rank", {"keep_params": 0.5}),), CalibrationSettings(0.3))
    result = optimize(model, calib, OptimizeOptions(recipe, latency=False, max_output_change=None))
    name = next(n.output[0] for n in onnx.load(model).graph.node if n.name == site)
    outs = []
    for m in (to_model_proto(loaded.graph, loaded.ctx), result.model):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        m.graph.output.extend([onnx.helper.make_empty_tensor_value_info(name)])
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(sess.run([name], {sess.get_inputs()[0].name: held})[0].astype(np.float64))
    expected = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
    assert abs(result.report.layer_errors["low-rank"][site] - expected) <= 1e-4 * max(expected, 1e-6) + 1e-6


def test_data_aware_on_a_deep_net_whose_inputs_hardly_vary(tmp_path, rng):
    """Always-active units with a large bias carry a constant through 40 layers: deep inputs vary by about 1e-6
    of their mean, the code covariances are rounding noise of either sign, and a plain Cholesky failed
    (LinAlgError, exit 1). Both error measures now factorise it, and the output is verified."""
    nodes, inits, x = [], [], "x"
    for i in range(40):
        b = rng.normal(0, 0.1, 32)
        b[:4], b[4:8] = -50.0, 50.0  # dead, always active
        inits += [init(f"w{i}", rng.normal(0, 1 / np.sqrt(32 if i else 16), (32, 32 if i else 16)).astype(np.float32)),
                  init(f"b{i}", b.astype(np.float32))]
        nodes += [helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], name=f"gemm{i}", transB=1),
                  helper.make_node("Relu", [f"g{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    inits.append(init("wo", rng.normal(0, 0.2, (4, 32)).astype(np.float32)))
    nodes.append(helper.make_node("Gemm", [x, "wo"], ["y"], name="head", transB=1))
    onnx.save(make_model(nodes, [vinfo("x", ["N", 16])], [vinfo("y", ["N", 4])], inits), tmp_path / "deep.onnx")
    for measure in ("exact", "bound"):
        res = CliRunner().invoke(main, ["optimize", str(tmp_path / "deep.onnx"), "--calib", "random:64", "-o",
                                        str(tmp_path / f"{measure}.onnx"), "--passes", "low-rank", "--keep-params",
                                        "0.6", "--rank-error", measure, "--no-latency", "--max-output-change", "off"])
        assert res.exit_code == 0, res.output
        assert "held-out:" in res.output
