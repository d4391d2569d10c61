import os
import tempfile
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import assert_same_outputs, cnn_model, init, make_model, mlp_model, vinfo
from onnx_lincomp.analysis.unit_sets import UnitEvidence
from onnx_lincomp.calibration import CollectOptions, collect_relu_stats, input_specs, open_calibration
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.model_io import model_from_proto, to_model_proto
from onnx_lincomp.passes import PassContext
from onnx_lincomp.pipeline import run_pipeline
from onnx_lincomp.recipe import PassSpec

OPTION_OF = {"dead_rate": "remove-dead", "channel_multiple": "remove-dead", "linear_rate": "fold-linear",
             "layer_threshold": "fold-linear"}


def specs(passes, **options):
    """Pass specs for ``passes`` with each option given to the pass that owns it."""
    return tuple(PassSpec.of(p, {k: v for k, v in options.items() if OPTION_OF[k] == p}) for p in passes)


def run_passes(graph, passes, stats, **options):
    return run_pipeline(graph, specs(passes, **options), PassContext(UnitEvidence.from_stats(stats)))


def compress(model, x, passes=("remove-dead", "fold-linear", "merge-affine"), layer_threshold="auto", **options):
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    stats = collect_relu_stats(loaded.graph, loaded.ctx, _array_source(loaded, x), CollectOptions(batch_size=16))
    records = run_passes(loaded.graph, tuple(passes), stats, layer_threshold=layer_threshold, **options)
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, totals(records), stats


def totals(records):
    """Per pass name, the results of all rounds added up."""
    merged = {}
    for r in records:
        res = r.result
        if res.name in merged:
            m = merged[res.name]
            skipped = dict(m.skipped)
            for k, v in res.skipped.items():
                skipped[k] = skipped.get(k, 0) + v
            counts = {k: m.count(k) + res.count(k) for k in set(m.counts) | set(res.counts)}
            res = replace(m, changed=m.changed or res.changed, rewritten=m.rewritten + res.rewritten,
                          counts=counts, skipped=skipped)
        merged[res.name] = res
    return merged


def _array_source(loaded, x):
    d = tempfile.mkdtemp()
    np.save(os.path.join(d, "x.npy"), x)
    return open_calibration(os.path.join(d, "x.npy"), input_specs(loaded.graph))


def ops(model):
    return [n.op_type for n in model.graph.node]


def weight_shapes(model):
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_remove_dead_mlp_exact(rng, kind):
    model = mlp_model(rng, [8, 12, 10, 3], kind=kind, dead={0: [1, 5, 7], 1: [0, 9]})
    x = rng.random((64, 8), dtype=np.float32)
    out, res, stats = compress(model, x, passes=("remove-dead",))
    assert res["remove-dead"].neurons_removed == int(sum(s.dead.sum() for s in stats.layers)) >= 5
    dims = sorted(s for s in weight_shapes(out).values() if len(s) == 2)
    assert sum(np.prod(s) for s in dims) < sum(np.prod(s) for s in weight_shapes(model).values() if len(s) == 2)
    assert_same_outputs(model, out, {"x": x})


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
@pytest.mark.parametrize("pool", [True, False])
def test_remove_dead_conv_through_pool_and_flatten(rng, flatten, pool):
    model = cnn_model(rng, dead=[0, 3], flatten=flatten, pool=pool)
    x = rng.random((40, 1, 6, 6), dtype=np.float32)
    out, res, _ = compress(model, x, passes=("remove-dead",))
    assert res["remove-dead"].neurons_removed >= 2
    conv1 = next(i for i in out.graph.initializer if tuple(i.dims)[1:] == (1, 3, 3))
    assert conv1.dims[0] <= 4
    assert_same_outputs(model, out, {"x": x})
    assert_same_outputs(model, out, {"x": rng.random((3, 1, 6, 6), dtype=np.float32)})


def test_fold_linear_skip_path_is_exact_on_calibration_data(rng):
    # 20 of 24 units linear in layer 0: the skip pays (k(n_in + n_out + 1) > n_in n_out)
    model = mlp_model(rng, [6, 24, 5, 3], linear={0: list(range(20))})
    x = rng.random((50, 6), dtype=np.float32)
    out, res, _ = compress(model, x, passes=("fold-linear",))
    assert res["fold-linear"].neurons_folded >= 20
    assert "Sum" in ops(out) and ops(out).count("Relu") == 2
    assert_same_outputs(model, out, {"x": x})


def test_fold_linear_chained_skips(rng):
    model = mlp_model(rng, [5, 16, 16, 16, 3], linear={0: list(range(14)), 1: list(range(14)), 2: list(range(13))})
    x = rng.random((40, 5), dtype=np.float32)
    out, res, _ = compress(model, x, passes=("fold-linear",))
    assert res["fold-linear"].neurons_folded >= 40
    assert_same_outputs(model, out, {"x": x})


def test_whole_linear_layer_is_merged(rng):
    model = mlp_model(rng, [6, 30, 4], linear={0: list(range(30))})
    x = rng.random((20, 6), dtype=np.float32)
    out, res, _ = compress(model, x)
    assert ops(out) == ["Gemm"]
    assert_same_outputs(model, out, {"x": x})


def test_dependent_linear_units_fold(rng):
    # 10 always-active units over a 3-wide input: at most 3 independent
    model = mlp_model(rng, [3, 12, 4], linear={0: list(range(10))})
    x = rng.random((30, 3), dtype=np.float32)
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    stats = collect_relu_stats(loaded.graph, loaded.ctx, _array_source(loaded, x))
    run_passes(loaded.graph, ("fold-linear",), stats, layer_threshold=10**6)  # no skip: dependent fold
    out = to_model_proto(loaded.graph, loaded.ctx)
    w0 = next(i for i in out.graph.initializer if i.dims[1] == 3)
    assert w0.dims[0] == 12 - 7
    assert_same_outputs(model, out, {"x": x})


def test_threshold_int_and_float(rng):
    model = mlp_model(rng, [6, 24, 5, 3], linear={0: list(range(20))})
    x = rng.random((50, 6), dtype=np.float32)
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    stats = collect_relu_stats(loaded.graph, loaded.ctx, _array_source(loaded, x))
    for threshold, folds in ((25, False), (5, True), (0.9, False), (0.5, True)):
        g = loaded.graph.copy()
        recs = run_passes(g, ("fold-linear",), stats, layer_threshold=threshold)
        assert (recs[0].result.neurons_folded >= 20) == folds, threshold


@pytest.mark.parametrize("case", ["kxk_then_1x1", "1x1_then_kxk", "gemm_pair", "kxk_then_kxk"])
def test_merge_affine(rng, case):
    if case == "kxk_then_kxk":  # 1->2->1 channels: a 5x5 kernel (25 weights) beats 18 + 18
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 2, 1, 0], kernel_shape=[3, 3]),
                 helper.make_node("Conv", ["h", "w2", "b2"], ["y"], kernel_shape=[3, 3])]
        inits = [init("w1", rng.normal(size=(2, 1, 3, 3)).astype(np.float32)),
                 init("b1", rng.normal(size=2).astype(np.float32)),
                 init("w2", rng.normal(size=(1, 2, 3, 3)).astype(np.float32)),
                 init("b2", rng.normal(size=1).astype(np.float32))]
        model = make_model(nodes, [vinfo("x", ["N", 1, 8, 9])], [vinfo("y", None)], inits)
        feeds = {"x": rng.normal(size=(2, 1, 8, 9)).astype(np.float32)}
    elif case == "gemm_pair":
        nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1),
                 helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], transB=1)]
        inits = [init("w1", rng.normal(size=(16, 4)).astype(np.float32)),
                 init("w2", rng.normal(size=(3, 16)).astype(np.float32)),
                 init("b2", rng.normal(size=3).astype(np.float32))]
        model = make_model(nodes, [vinfo("x", ["N", 4])], [vinfo("y", ["N", 3])], inits)
        feeds = {"x": rng.normal(size=(5, 4)).astype(np.float32)}
    else:
        first_k, second_k = ((3, 1) if case == "kxk_then_1x1" else (1, 3))
        nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1] * 4 if first_k == 3 else [0] * 4,
                                  strides=[2, 2] if first_k == 3 else [1, 1]),
                 helper.make_node("Conv", ["h", "w2", "b2"], ["y"], pads=[0] * 4)]
        inits = [init("w1", rng.normal(size=(8, 3, first_k, first_k)).astype(np.float32)),
                 init("b1", rng.normal(size=8).astype(np.float32)),
                 init("w2", rng.normal(size=(2, 8, second_k, second_k)).astype(np.float32)),
                 init("b2", rng.normal(size=2).astype(np.float32))]
        model = make_model(nodes, [vinfo("x", ["N", 3, 7, 7])], [vinfo("y", None)], inits)
        feeds = {"x": rng.normal(size=(2, 3, 7, 7)).astype(np.float32)}
    out, res, _ = compress(model, feeds["x"], passes=("merge-affine",))
    assert res["merge-affine"].rewritten == 1 and len(out.graph.node) == 1
    assert out.graph.output[0].name == "y"
    assert_same_outputs(model, out, feeds, rtol=1e-4, atol=1e-5)


def test_merge_skipped_when_second_conv_pads_and_first_has_bias(rng):
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"]),
             helper.make_node("Conv", ["h", "w2"], ["y"], pads=[1] * 4)]
    inits = [init("w1", rng.normal(size=(2, 3, 1, 1)).astype(np.float32)), init("b1", np.ones(2, np.float32)),
             init("w2", rng.normal(size=(2, 2, 3, 3)).astype(np.float32))]
    model = make_model(nodes, [vinfo("x", ["N", 3, 5, 5])], [vinfo("y", None)], inits)
    out, res, _ = compress(model, rng.normal(size=(2, 3, 5, 5)).astype(np.float32), passes=("merge-affine",))
    assert res["merge-affine"].rewritten == 0 and any("pads" in k for k in res["merge-affine"].skipped)
    assert len(out.graph.node) == 2


# ---- must-not-fire ------------------------------------------------------------------------------
def _residual_model(rng):
    w1 = rng.normal(size=(4, 4)).astype(np.float32)
    b1 = np.array([-100, 0.1, 0.2, 0.3], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["z"], transB=1), helper.make_node("Relu", ["z"], ["h"]),
             helper.make_node("Add", ["h", "x"], ["r"]), helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    return make_model(nodes, [vinfo("x", ["N", 4])], [vinfo("y", ["N", 2])],
                      [init("w1", w1), init("b1", b1), init("w2", rng.normal(size=(2, 4)).astype(np.float32))])


def test_residual_add_is_skipped_with_reason(rng):
    model = _residual_model(rng)
    x = rng.random((20, 4), dtype=np.float32)
    out, res, stats = compress(model, x)
    assert stats.layers[0].dead[0]
    assert res["remove-dead"].neurons_removed == 0
    assert any("graph input" in k for k in res["remove-dead"].skipped)  # the residual stream starts at x
    assert_same_outputs(model, out, {"x": x})


def test_relu_output_that_is_graph_output_is_kept(rng):
    model = mlp_model(rng, [4, 6, 2], dead={0: [1]})
    model.graph.output.append(vinfo("h0", ["N", 6]))
    x = rng.random((20, 4), dtype=np.float32)
    out, res, _ = compress(model, x)
    assert res["remove-dead"].neurons_removed == 0
    assert any("graph output" in k for k in res["remove-dead"].skipped)
    assert [tuple(d.dim_value for d in o.type.tensor_type.shape.dim)[1:] for o in out.graph.output][1] == (6,)
    assert_same_outputs(model, out, {"x": x})


def test_pre_activation_with_second_reader_is_kept(rng):
    model = mlp_model(rng, [4, 6, 2], dead={0: [1]})
    model.graph.node.append(helper.make_node("Sigmoid", ["z0"], ["s"]))
    model.graph.output.append(vinfo("s", ["N", 6]))
    x = rng.random((20, 4), dtype=np.float32)
    out, res, _ = compress(model, x)
    assert res["remove-dead"].neurons_removed == 0
    assert_same_outputs(model, out, {"x": x})


def test_rate_based_removal_not_across_padding_conv(rng):
    # channel 0 is rarely (not never) active and conv2 pads: the mean fold would be wrong at borders
    w1 = rng.normal(size=(3, 1, 1, 1)).astype(np.float32)
    b1 = np.array([0.0, 0.5, 0.5], np.float32)
    w1[0] = 1.0
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1] * 4)]
    model = make_model(nodes, [vinfo("x", ["N", 1, 4, 4])], [vinfo("y", None)],
                       [init("w1", w1), init("b1", b1), init("w2", rng.normal(size=(2, 3, 3, 3)).astype(np.float32))])
    x = -rng.random((50, 1, 4, 4), dtype=np.float32)
    x[0, 0, 0, 0] = 1.0  # channel 0 active in one sample only
    out, res, _ = compress(model, x, passes=("remove-dead",), dead_rate=0.05)
    assert res["remove-dead"].neurons_removed == 0 and any("pads" in k for k in res["remove-dead"].skipped)


def test_model_without_relu_round_trips(rng):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [vinfo("x", ["N", 3])], [vinfo("y", ["N", 2])],
                       [init("w", rng.normal(size=(3, 2)).astype(np.float32))])
    x = rng.random((5, 3), dtype=np.float32)
    out, res, _ = compress(model, x)
    assert not any(r.changed for r in res.values()) and ops(out) == ["MatMul"]
    assert_same_outputs(model, out, {"x": x})


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17, 21])
def test_opsets_mlp(rng, opset):
    model = mlp_model(rng, [6, 10, 8, 3], dead={0: [1, 2]}, linear={1: list(range(7))})
    model.opset_import[0].version = opset
    x = rng.random((30, 6), dtype=np.float32)
    out, res, _ = compress(model, x)
    assert res["remove-dead"].neurons_removed >= 2
    assert [o.version for o in out.opset_import if o.domain == ""] == [opset]
    assert_same_outputs(model, out, {"x": x})


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_opsets_cnn(rng, opset):
    model = cnn_model(rng, dead=[1])
    model.opset_import[0].version = opset
    x = rng.random((12, 1, 6, 6), dtype=np.float32)
    out, res, stats = compress(model, x)
    assert stats.layers[0].observed == "post" and stats.layers[0].dead[1]
    assert res["remove-dead"].neurons_removed >= 1
    assert_same_outputs(model, out, {"x": x})


@pytest.mark.parametrize("after", ["conv", "flatten"])
def test_remove_dead_through_concat(rng, after):
    w1 = rng.normal(0, 0.5, (3, 1, 3, 3)).astype(np.float32)
    b1 = np.array([-100, 0.1, 0.2], np.float32)
    w2 = rng.normal(0, 0.5, (4, 1, 1, 1)).astype(np.float32)
    b2 = np.array([0.1, -100, 0.3, -100], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Concat", ["r1", "r2"], ["cat"], name="cat", axis=1)]
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)]
    if after == "conv":
        nodes.append(helper.make_node("Conv", ["cat", "w3"], ["y"], name="conv3"))
        inits.append(init("w3", rng.normal(size=(2, 7, 1, 1)).astype(np.float32)))
    else:
        nodes += [helper.make_node("Flatten", ["cat"], ["f"], name="flat"),
                  helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1)]
        inits.append(init("w3", rng.normal(size=(2, 7 * 25)).astype(np.float32)))
    model = make_model(nodes, [vinfo("x", ["N", 1, 5, 5])], [vinfo("y", None)], inits)
    x = rng.random((10, 1, 5, 5), dtype=np.float32)
    out, res, _ = compress(model, x, passes=("remove-dead",))
    assert res["remove-dead"].neurons_removed == 3
    consumer = next(n for n in out.graph.node if n.name in ("conv3", "fc"))
    w3 = next(i for i in out.graph.initializer if i.name == consumer.input[1])
    assert w3.dims[1] == (4 if after == "conv" else 4 * 25)
    assert_same_outputs(model, out, {"x": x})


def test_residual_group_removes_only_channels_dead_in_every_member(rng):
    w1, w2 = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    b1 = np.array([-100, -100, 0.1, 0.2, -100, 0.3], np.float32)  # dead: 0, 1, 4
    b2 = np.array([-100, 0.1, 0.2, -100, -100, 0.3], np.float32)  # dead: 0, 3, 4
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], name="fc1", transB=1),
             helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
             helper.make_node("Gemm", ["x", "w2", "b2"], ["z2"], name="fc2", transB=1),
             helper.make_node("Relu", ["z2"], ["h2"], name="relu2"),
             helper.make_node("Add", ["h1", "h2"], ["s"], name="res"),
             helper.make_node("Gemm", ["s", "w3"], ["y"], name="fc3", transB=1)]
    model = make_model(nodes, [vinfo("x", ["N", 4])], [vinfo("y", ["N", 3])],
                       [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2),
                        init("w3", rng.normal(size=(3, 6)).astype(np.float32))])
    x = rng.random((40, 4), dtype=np.float32)
    out, res, stats = compress(model, x, passes=("remove-dead",))
    common = stats.layers[0].dead & stats.layers[1].dead
    assert common[[0, 4]].all()
    assert res["remove-dead"].neurons_removed == 2 * int(common.sum())
    w3 = next(i for i in out.graph.initializer if i.name == next(n for n in out.graph.node if n.name == "fc3").input[1])
    assert w3.dims[1] == 6 - int(common.sum())
    assert_same_outputs(model, out, {"x": x})


def test_channel_multiple_keeps_aligned_widths(rng):
    model = cnn_model(rng, dead=[0, 1, 3])
    x = rng.random((20, 1, 6, 6), dtype=np.float32)
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    stats = collect_relu_stats(loaded.graph, loaded.ctx, _array_source(loaded, x))
    run_passes(loaded.graph, ("remove-dead",), stats, channel_multiple=2)
    out = to_model_proto(loaded.graph, loaded.ctx)
    conv1 = next(i for i in out.graph.initializer
                 if i.name == next(n for n in out.graph.node if n.name == "conv1").input[1])
    assert conv1.dims[0] % 2 == 0 and conv1.dims[0] < 6
    assert_same_outputs(model, out, {"x": x})


@pytest.mark.parametrize("fold_bn", [True, False])
def test_remove_dead_through_residual_streams(rng, fold_bn):
    """ResNet-style graph (Relu after each Add, identity and 1x1 projection shortcuts) with planted dead
    channels: every channel dead across its stream goes, the outputs stay identical."""
    from test_channel_groups import _resnet

    model = _resnet(rng)
    x = rng.random((16, 3, 6, 6), dtype=np.float32)
    loaded = model_from_proto(model)
    if fold_bn:
        canonicalize(loaded.graph)
    stats = collect_relu_stats(loaded.graph, loaded.ctx, _array_source(loaded, x))
    records = run_passes(loaded.graph, ("remove-dead",), stats)
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    assert sum(r.result.neurons_removed for r in records) > 0
    shapes = weight_shapes(out)
    widths = sorted({d[0] for d in shapes.values() if len(d) == 4})
    assert widths == [4, 6, 7] if fold_bn else widths[0] <= 6  # 8-stream -> 6, 6-stream -> 4, b1a 8 -> 7
    assert_same_outputs(model, out, {"x": x}, rtol=1e-5, atol=1e-5)
