"""prune-magnitude: exact sparsity per layer and globally, biases untouched, SparseGPT lowers the output error
against plain magnitude, grouped Convs by magnitude only, options validate, storage sizes, and the CLI."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from conftest import cnn_model, init, make_model, mlp_model, run, vinfo
from onnx_lincomp.analysis.storage import storage_sizes, with_sparse_initializers
from onnx_lincomp.calibration.activations import CalibrationData
from onnx_lincomp.calibration.moments import collect_layer_moments
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.cli import main
from onnx_lincomp.errors import OptionError, PassError
from onnx_lincomp.examples import example_paths
from onnx_lincomp.linear_layer import match_linear_layer
from onnx_lincomp.model_io import model_from_proto, to_model_proto
from onnx_lincomp.passes import PassContext, PruneMagnitudeOptions
from onnx_lincomp.passes.base import node_named
from onnx_lincomp.passes.prune_magnitude import inverse_hessian_factor, magnitude_prune, refit_rows, sparsegpt
from onnx_lincomp.pipeline import plan_pipeline, run_pipeline
from onnx_lincomp.recipe import PassSpec
from test_passes import _array_source


def prune(model, x, with_data=True, **options):
    """(pruned model, the pass's result); the output passes the full checker."""
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    data = CalibrationData(_array_source(loaded, x), loaded.ctx, len(x)) if with_data else None
    records = run_pipeline(loaded.graph, (PassSpec.of("prune-magnitude", options),), PassContext(None, data))
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, records[0].result


def weights(model, names):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n] for n in names]


def rel_error(a, b, x):
    ya, yb = run(a, {"x": x})[0], run(b, {"x": x})[0]
    return float(np.linalg.norm(yb - ya) / np.linalg.norm(ya))


def low_rank_data(rng, n, features, rank=4):
    mix = np.random.default_rng(7).normal(size=(rank, features))
    return (rng.normal(size=(n, rank)) @ mix + 0.05 * rng.normal(size=(n, features))).astype(np.float32)


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
@pytest.mark.parametrize("correct", [True, False])
def test_exact_sparsity_per_layer_biases_untouched(rng, kind, correct):
    model = mlp_model(rng, [16, 24, 20, 5], kind=kind)
    x = rng.random((64, 16), dtype=np.float32)
    out, res = prune(model, x, sparsity=0.6, correct=correct)
    names = [f"w{i}" for i in range(3)]
    for w in weights(out, names):
        assert int((w == 0).sum()) == int(np.floor(0.6 * w.size + 1e-9))  # the last layer writes the graph output
    bias = [f"b{i}" for i in range(3)]
    for b0, b1 in zip(weights(model, bias), weights(out, bias), strict=True):
        np.testing.assert_array_equal(b0, b1)
    assert res.count("layers_pruned") == 3 and res.approximate and res.changed
    assert res.count("weights_zeroed") == sum(int(np.floor(0.6 * w.size + 1e-9)) for w in weights(model, names))
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]
    assert rel_error(model, out, x) < 1.0


def test_global_scope_one_threshold(rng):
    model = mlp_model(rng, [16, 24, 20, 5])
    x = rng.random((64, 16), dtype=np.float32)
    names = [f"w{i}" for i in range(3)]
    before = weights(model, names)
    out, res = prune(model, x, sparsity=0.7, scope="global", correct=False)
    after = weights(out, names)
    total = sum(w.size for w in before)
    assert sum(int((w == 0).sum()) for w in after) == int(np.floor(0.7 * total + 1e-9))
    gone = np.concatenate([np.abs(b[a == 0]) for b, a in zip(before, after, strict=True)])
    kept = np.concatenate([np.abs(b[a != 0]) for b, a in zip(before, after, strict=True)])
    assert gone.max() <= kept.min()
    assert len({round(float((a == 0).mean()), 3) for a in after}) > 1  # layers lose different fractions
    corrected, _ = prune(model, x, sparsity=0.7, scope="global")  # SparseGPT prunes the same count per layer
    assert [int((w == 0).sum()) for w in weights(corrected, names)] == [int((a == 0).sum()) for a in after]


def test_sparsity_zero_leaves_the_model_equal(rng):
    model = mlp_model(rng, [8, 12, 3])
    x = rng.random((32, 8), dtype=np.float32)
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    reference = to_model_proto(loaded.graph, loaded.ctx)
    out, res = prune(model, x, sparsity=0.0)
    assert not res.changed and res.count("weights_zeroed") == 0
    assert out.SerializeToString() == reference.SerializeToString()


def test_correction_lowers_the_output_error_at_80_percent(rng):
    model = mlp_model(rng, [32, 48, 32, 6])
    x, held = low_rank_data(rng, 256, 32), low_rank_data(rng, 256, 32)
    plain, _ = prune(model, x, sparsity=0.8, correct=False)
    corrected, res = prune(model, x, sparsity=0.8)
    e_plain, e_corr = rel_error(model, plain, held), rel_error(model, corrected, held)
    assert e_corr < 0.75 * e_plain, (e_plain, e_corr)
    assert any("pruned upstream: 2 data pass(es)" in n for n in res.notes)  # fc1 and fc2 re-collected on pruned inputs
    # the first layer alone (rank-4 inputs): the update compensates in the columns it has not yet taken
    only_first = {"layers": {"fc1": 0.0, "fc2": 0.0}}
    e0_plain = rel_error(model, prune(model, x, sparsity=0.8, correct=False, **only_first)[0], held)
    e0_corr = rel_error(model, prune(model, x, sparsity=0.8, **only_first)[0], held)
    assert e0_corr < 0.8 * e0_plain, (e0_plain, e0_corr)


def test_sequential_hessian_is_taken_on_pruned_inputs(rng):
    model = mlp_model(rng, [12, 16, 10, 3])
    x = rng.random((48, 12), dtype=np.float32)
    both, _ = prune(model, x, sparsity=0.7, layers={"fc2": 0.0})
    first, _ = prune(model, x, sparsity=0.7, layers={"fc1": 0.0, "fc2": 0.0})
    loaded = model_from_proto(first)
    layer = match_linear_layer(loaded.graph, node_named(loaded.graph, "fc1"))
    data = CalibrationData(_array_source(loaded, x), loaded.ctx, len(x))
    h = collect_layer_moments(loaded.graph, data, [layer])["fc1"].gram[:-1, :-1]
    expect = sparsegpt(layer.weight, inverse_hessian_factor(h, 0.01), int(0.7 * layer.weight.size), 128)
    expect = refit_rows(layer.weight, expect, h, 0.01)
    np.testing.assert_allclose(weights(both, ["w1"])[0], expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(weights(both, ["w0"])[0], weights(first, ["w0"])[0])


def test_layer_overrides_and_unknown_names(rng):
    model = mlp_model(rng, [8, 12, 10, 3])
    x = rng.random((32, 8), dtype=np.float32)
    out, res = prune(model, x, sparsity=0.5, layers={"fc1": 0.0, "fc0": 0.9})
    w0, w1, w2 = weights(out, ["w0", "w1", "w2"])
    assert int((w0 == 0).sum()) == int(np.floor(0.9 * w0.size)) and not (w1 == 0).any()
    assert int((w2 == 0).sum()) == 15 and res.count("layers_pruned") == 2
    with pytest.raises(PassError, match="unknown layer 'relu0'"):
        prune(model, x, layers={"relu0": 0.5})


def _grouped_cnn(rng):
    """Conv(1->4, 3x3) - Relu - depthwise Conv(4->4, 3x3, group 4) - Relu - Flatten - Gemm(3), input (N,1,6,6)."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["f"], name="flatten", axis=1),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1)]
    inits = [init("w1", rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)), init("b1", np.zeros(4, np.float32)),
             init("w2", rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)), init("b2", np.zeros(4, np.float32)),
             init("w3", rng.normal(0, 0.2, (3, 144)).astype(np.float32)), init("b3", np.zeros(3, np.float32))]
    return make_model(nodes, [vinfo("x", ["N", 1, 6, 6])], [vinfo("y", ["N", 3])], inits)


def test_conv_layers_and_grouped_conv_by_magnitude(rng):
    model = _grouped_cnn(rng)
    x = rng.random((32, 1, 6, 6), dtype=np.float32)
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    data = CalibrationData(_array_source(loaded, x), loaded.ctx, len(x))
    plan = plan_pipeline(loaded.graph, (PassSpec.of("prune-magnitude", {"sparsity": 0.5}),), PassContext(None, data))[0]
    details = {m.site: m.detail for m in plan.matches}
    assert "SparseGPT" in details["conv1"] and "grouped Conv" in details["dw"] and "SparseGPT" in details["fc"]
    out, res = prune(model, x, sparsity=0.5)
    before, after = weights(model, ["w1", "w2", "w3"]), weights(out, ["w1", "w2", "w3"])
    for w in after:
        assert int((w == 0).sum()) == w.size // 2
    np.testing.assert_array_equal(after[1], magnitude_prune(before[1], 18).astype(np.float32))
    assert rel_error(model, out, x) < 1.0
    out_cnn, _ = prune(cnn_model(rng), rng.random((16, 1, 6, 6), dtype=np.float32), sparsity=0.5)
    assert all(int((w == 0).sum()) == w.size // 2 for w in weights(out_cnn, ["w1", "w2", "w3"]))


@pytest.mark.parametrize("trans_b,alpha", [(0, 1.0), (1, 2.0), (0, 0.5)])
def test_gemm_attributes_keep_their_layout(rng, trans_b, alpha):
    w = rng.normal(size=(6, 5) if trans_b else (5, 6)).astype(np.float32)
    c = rng.normal(size=6).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", transB=trans_b, alpha=alpha, beta=0.5)
    model = make_model([node], [vinfo("x", ["N", 5])], [vinfo("y", ["N", 6])], [init("w", w), init("c", c)])
    x = rng.normal(size=(8, 5)).astype(np.float32)
    out, _ = prune(model, x, sparsity=0.5, correct=False)
    masked = magnitude_prune(w, 15)
    expect = alpha * x @ (masked.T if trans_b else masked) + 0.5 * c
    np.testing.assert_allclose(run(out, {"x": x})[0], expect, rtol=1e-5, atol=1e-5)
    assert {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}["transB"] == trans_b


def test_sparsegpt_exact_count_and_lower_error_than_magnitude(rng):
    x = low_rank_data(rng, 200, 40, rank=12).astype(np.float64)
    h = x.T @ x
    w = rng.normal(size=(7, 40))
    factor = inverse_hessian_factor(h, 0.01)
    for count in (0, 1, 100, 279):
        new = sparsegpt(w, factor, count, block=16)
        assert int((new == 0).sum()) == count
    mag = magnitude_prune(w, 200)
    gpt = sparsegpt(w, factor, 200, block=16)
    cost = lambda v: float(np.trace((w - v) @ h @ (w - v).T))  # noqa: E731
    assert cost(gpt) < 0.9 * cost(mag)
    np.testing.assert_array_equal(sparsegpt(w, factor, 0, 16), w)
    assert inverse_hessian_factor(np.zeros((3, 3)), 0.01) is None


@pytest.mark.parametrize("options,message", [
    ({"sparsity": 1.0}, "sparsity of 'sparsity' must be in"),
    ({"sparsity": -0.1}, "must be in"),
    ({"scope": "model"}, "option 'scope' got 'model'"),
    ({"block": 0}, "block must be"),
    ({"damp": -1.0}, "damp must be"),
    ({"layers": {"fc0": 1.5}}, "sparsity of 'fc0'"),
])
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        PassSpec.of("prune-magnitude", options)
    with pytest.raises(OptionError, match="prune-magnitude: "):
        PruneMagnitudeOptions(**options)


def test_correction_without_data_asks_for_calib(rng):
    model = mlp_model(rng, [8, 12, 3])
    x = rng.random((16, 8), dtype=np.float32)
    with pytest.raises(PassError, match=r"needs calibration data \(--calib\).*--no-correct") as info:
        prune(model, x, with_data=False)
    assert info.value.exit_code == OptionError.exit_code
    out, res = prune(model, x, with_data=False, sparsity=0.5, correct=False)
    assert res.count("layers_pruned") == 2


def test_storage_sizes_and_the_sparse_form_loads(rng):
    model = mlp_model(rng, [64, 96, 10])
    x = rng.random((64, 64), dtype=np.float32)
    out, _ = prune(model, x, sparsity=0.9, correct=False)
    sizes = storage_sizes(out)
    assert sizes.sparse_tensors == 2 and sizes.sparse_loads is True and sizes.sparse_error is None
    assert sizes.sparse_bytes < 0.45 * sizes.dense_bytes and sizes.zipped_bytes < sizes.dense_bytes
    sparse, _ = with_sparse_initializers(out)
    onnx.checker.check_model(sparse)  # full_check's shape inference does not see sparse initializers
    np.testing.assert_array_equal(run(sparse, {"x": x})[0], run(out, {"x": x})[0])
    dense = storage_sizes(model)
    assert dense.sparse_tensors == 0 and dense.sparse_bytes == dense.dense_bytes and dense.sparse_loads is None


def test_cli_on_the_bundled_example(tmp_path):
    model, calib = example_paths("digits-mlp")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["optimize", str(model), "--calib", str(calib), "--labels", "y", "--passes",
                                    "prune-magnitude", "--sparsity", "0.5", "-o", str(out), "--no-latency", "--json",
                                    str(report)])
    assert res.exit_code == 0, res.output
    assert "unstructured sparsity does not make onnxruntime faster" in res.output
    data = json.loads(report.read_text())
    assert data["storage"]["dense_bytes"] > data["storage"]["zipped_bytes"] > 0
    assert data["passes"][0]["counts"]["layers_pruned"] == 3
    for t in onnx.load(out).graph.initializer:
        w = numpy_helper.to_array(t)
        if w.ndim == 2:
            assert int((w == 0).sum()) == w.size // 2
    options = PruneMagnitudeOptions()
    assert options.correct and options.scope == "layer" and options.block == 128
