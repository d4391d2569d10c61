"""prune-channels: numeric checks in onnxruntime (original vs pruned on the same inputs), the refit against
plain removal, exactly-dead channels against remove-dead, widths and targets, and the must-not-fire and
bad-input cases."""
import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import cnn_model, init, make_model, mlp_model, run, vinfo
from onnx_lincomp.analysis.channel_importance import greedy_order
from onnx_lincomp.analysis.model_report import model_report
from onnx_lincomp.calibration.activations import CalibrationData
from onnx_lincomp.calibration.moments import Moments, conv_rows, refit, target_rows
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.cli import main
from onnx_lincomp.errors import OptionError, PassError
from onnx_lincomp.linear_layer import LinearLayer
from onnx_lincomp.model_io import model_from_proto, to_model_proto
from onnx_lincomp.passes import PassContext, PruneChannels, PruneChannelsOptions
from onnx_lincomp.pipeline import run_pipeline
from onnx_lincomp.recipe import PassSpec, Recipe, load_recipe
from test_passes import _array_source


def _prune(model: onnx.ModelProto, x: np.ndarray, passes=(("prune-channels", {}),)):
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    data = CalibrationData(_array_source(loaded, x), loaded.ctx, len(x))
    from onnx_lincomp.analysis.unit_sets import UnitEvidence
    from onnx_lincomp.calibration import collect_relu_stats

    stats = collect_relu_stats(loaded.graph, loaded.ctx, _array_source(loaded, x))
    records = run_pipeline(loaded.graph, tuple(PassSpec.of(n, o) for n, o in passes),
                           PassContext(UnitEvidence.from_stats(stats), data))
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, records


def _correlated(rng, n, d, rank=3):
    """Inputs on a low-dimensional subspace plus noise: removed units are predictable from kept ones."""
    z = rng.random((n, rank))
    return np.clip(z @ rng.random((rank, d)) / rank + 0.02 * rng.random((n, d)), 0, 1).astype(np.float32)


def test_conv_rows_reproduce_the_convolution(rng):
    w = rng.normal(size=(5, 3, 3, 2))
    b = rng.normal(size=5)
    attrs = {"kernel_shape": [3, 2], "strides": [2, 1], "dilations": [1, 2], "pads": [0, 1, 2, 0], "group": 1}
    layer = LinearLayer("conv", w.shape, lambda: w, b, None, None, (), True, attrs)
    x = rng.normal(size=(2, 3, 9, 8)).astype(np.float32)
    import onnx.helper as h

    from conftest import init, make_model, vinfo
    node = h.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 2], strides=[2, 1], dilations=[1, 2],
                       pads=[0, 1, 2, 0])
    m = make_model([node], [vinfo("x", [2, 3, 9, 8])], [vinfo("y", None)],
                   [init("w", w.astype(np.float32)), init("b", b.astype(np.float32))])
    y = run(m, {"x": x})[0]
    rows, pick = conv_rows(layer, x, rng, positions=11)
    assert rows.shape == (22, 18)
    np.testing.assert_allclose(rows @ w.reshape(5, -1).T + b, target_rows(y, pick), atol=1e-5)


def test_layer_moments_do_not_depend_on_the_other_layers_collected(rng):
    """A layer's sampled rows depend on its name and the seed only, and its own outputs as targets equal a
    reference run of the same graph: prune-channels' first refit reuses the plan's moments on that basis."""
    from onnx_lincomp.calibration.moments import collect_layer_moments
    from onnx_lincomp.linear_layer import match_linear_layer
    from onnx_lincomp.passes.base import node_named

    loaded = model_from_proto(cnn_model(rng, pool=False))
    canonicalize(loaded.graph)
    x = rng.random((24, 1, 6, 6), dtype=np.float32)
    data = CalibrationData(_array_source(loaded, x), loaded.ctx, len(x), batch_size=7)
    names = [n.name for n in loaded.graph.nodes if n.op in ("Conv", "Gemm")]
    layers = [match_linear_layer(loaded.graph, node_named(loaded.graph, n)) for n in names]
    alone = collect_layer_moments(loaded.graph, data, layers[1:2], to_model_proto(loaded.graph, loaded.ctx))
    together = collect_layer_moments(loaded.graph, data, layers[::-1], own_targets=True)
    a, b = alone[names[1]], together[names[1]]
    assert a.rows == b.rows > 0
    np.testing.assert_array_equal(a.gram, b.gram)
    np.testing.assert_allclose(a.cross, b.cross, rtol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        collect_layer_moments(loaded.graph, data, layers, to_model_proto(loaded.graph, loaded.ctx), own_targets=True)


def test_refit_recovers_a_predictable_column(rng):
    x = rng.normal(size=(500, 4))
    x[:, 3] = 2 * x[:, 0] - x[:, 1] + 0.5  # column 3 is affine in the others
    w, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    m = Moments(4)
    m.add(x)
    w2, b2 = refit(m, np.array([0, 1, 2]), w, b, ridge=1e-9)
    np.testing.assert_allclose(x[:, :3] @ w2.T + b2, x @ w.T + b, atol=1e-5)
    # nothing to correct: the ridge pulls towards the current weights, so they come back unchanged
    w3, b3 = refit(m, np.arange(4), w, b, ridge=0.1)
    np.testing.assert_allclose(w3, w, atol=1e-8)
    np.testing.assert_allclose(b3, b, atol=1e-8)


def test_greedy_order_follows_interactions():
    # items 0 and 1 cancel each other (removing both costs nothing), 2 is cheap alone but not with them
    m = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    assert list(greedy_order(m)) == [2, 0, 1]


def test_refit_beats_plain_removal_and_keeps_shapes(rng):
    model = mlp_model(rng, [12, 32, 24, 5])
    x = _correlated(rng, 400, 12)
    plain, _ = _prune(model, x, (("prune-channels", {"sparsity": 0.5, "reconstruct": False}),))
    fitted, records = _prune(model, x, (("prune-channels", {"sparsity": 0.5}),))
    ref = run(model, {"x": x})[0]
    err_plain = np.square(run(plain, {"x": x})[0] - ref).mean()
    err_fit = np.square(run(fitted, {"x": x})[0] - ref).mean()
    assert err_fit < 0.5 * err_plain
    assert run(fitted, {"x": x})[0].shape == ref.shape  # the output layer keeps its width
    result = records[0].result
    # 32 -> 16; 24 -> 12, rounded up to 16 (a multiple of the CPU's NCHWc block, 8 or 16)
    assert result.approximate and result.count("units_removed") == 16 + 8 and result.count("layers_refit") == 2
    assert model_report(fitted).params < model_report(model).params


def test_exactly_dead_channels_equal_remove_dead(rng):
    model = mlp_model(rng, [6, 12, 8, 3], dead={0: [0, 3, 7], 1: [2, 5]})
    x = rng.random((200, 6), dtype=np.float32)
    by_dead, _ = _prune(model, x, (("remove-dead", {}),))
    kept = sorted((i.dims[0] for i in by_dead.graph.initializer if len(i.dims) == 2), reverse=True)[:2]
    assert kept[0] <= 9 and kept[1] <= 6  # at least the planted units are dead
    levels = {"fc0": (12 - kept[0]) / 12, "fc1": (8 - kept[1]) / 8}
    for importance in ("activation", "reconstruction"):
        pruned, _ = _prune(model, x, (("prune-channels", {"layers": levels, "importance": importance}),))
        assert sorted(tuple(i.dims) for i in pruned.graph.initializer) == \
            sorted(tuple(i.dims) for i in by_dead.graph.initializer)
        np.testing.assert_allclose(run(pruned, {"x": x})[0], run(by_dead, {"x": x})[0], atol=1e-4)
        np.testing.assert_allclose(run(pruned, {"x": x})[0], run(model, {"x": x})[0], atol=1e-4)


def test_conv_model_with_flatten_consumer(rng):
    model = cnn_model(rng)
    x = rng.random((120, 1, 6, 6), dtype=np.float32)
    pruned, records = _prune(model, x, (("prune-channels", {"sparsity": 0.5}),))
    out = run(pruned, {"x": x})[0]
    assert out.shape == (120, 4) and np.all(np.isfinite(out))
    shapes = {tuple(i.dims) for i in pruned.graph.initializer}
    assert (3, 1, 3, 3) in shapes and (4, 3, 1, 1) in shapes and (4, 4 * 9) in shapes
    plain, _ = _prune(model, x, (("prune-channels", {"sparsity": 0.5, "reconstruct": False}),))
    ref = run(model, {"x": x})[0]
    assert np.abs(out - ref).mean() < np.abs(run(plain, {"x": x})[0] - ref).mean()


def test_sparsity_zero_and_must_not_fire(rng):
    model = mlp_model(rng, [6, 10, 3])
    x = rng.random((50, 6), dtype=np.float32)
    out, records = _prune(model, x, (("prune-channels", {"sparsity": 0.0}),))
    assert not records[0].result.changed
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], atol=1e-6)
    # a single layer's output is the graph output: no group, nothing pruned, the reason shown
    single = mlp_model(rng, [6, 3])
    out, records = _prune(single, x, (("prune-channels", {"sparsity": 0.5}),))
    assert not records[0].result.changed and records[0].result.skipped


def test_width_multiple_min_channels_and_targets(rng):
    model = mlp_model(rng, [8, 40, 20, 4])
    x = rng.random((100, 8), dtype=np.float32)
    out, _ = _prune(model, x, (("prune-channels", {"sparsity": 0.5, "channel_multiple": 8}),))
    widths = sorted(i.dims[0] for i in out.graph.initializer if len(i.dims) == 2)
    assert widths == [4, 16, 24]  # 40 -> 20 rounded up to 24; 20 -> 10 rounded up to 16
    out, _ = _prune(model, x, (("prune-channels", {"sparsity": 0.5, "channel_multiple": 1}),))
    assert sorted(i.dims[0] for i in out.graph.initializer if len(i.dims) == 2) == [4, 10, 20]
    out, _ = _prune(model, x, (("prune-channels", {"sparsity": 0.9, "min_channels": 5, "channel_multiple": 1}),))
    assert sorted(i.dims[0] for i in out.graph.initializer if len(i.dims) == 2) == [4, 5, 5]
    out, _ = _prune(model, x, (("prune-channels", {"sparsity": 0.9, "channel_multiple": 16}),))
    assert sorted(i.dims[0] for i in out.graph.initializer if len(i.dims) == 2) == [4, 16, 16]  # 2 kept -> 16
    # a group one block wide cannot lose channels at that multiple: kept whole, and the report says why
    out, records = _prune(model, x, (("prune-channels", {"sparsity": 0.5, "channel_multiple": 20}),))
    assert sorted(i.dims[0] for i in out.graph.initializer if len(i.dims) == 2) == [4, 20, 20]  # 40 -> 20 only
    assert any(w.startswith("kept whole: widths stay at multiples of 20") for w in records[0].result.skipped)
    # must not fire where the multiple lets the group shrink
    _, records = _prune(model, x, (("prune-channels", {"sparsity": 0.5, "channel_multiple": 8}),))
    assert not any(w.startswith("kept whole") for w in records[0].result.skipped)
    # a width between one and two blocks keeps its channels at a small level, and says so at that level
    _, records = _prune(model, x, (("prune-channels", {"sparsity": 0.1, "channel_multiple": 16}),))
    assert records[0].result.skipped.get("kept whole at this level: the width left would round back up to a "
                                         "multiple of 16 (--channel-multiple; 1 prunes to any width)") == 2
    before = model_report(model).macs
    for target in (0.75, 0.5, 0.25):
        out, _ = _prune(model, x, (("prune-channels", {"target_macs": target, "channel_multiple": 1}),))
        macs = model_report(out).macs
        assert macs <= target * before and macs > 0.6 * target * before


def test_every_group_kept_whole_is_named_in_the_plan(rng):
    """The plan names every such group (a sensitivity scan reads its layer's reason there), not the first few."""
    model = mlp_model(rng, [6, 8, 8, 8, 8, 8, 3])
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    plan = PruneChannels(PruneChannelsOptions(sparsity=0.5, channel_multiple=8, importance="l1",
                                              reconstruct=False)).plan(loaded.graph, PassContext(None, None))
    why = next(w for w in plan.skipped if w.startswith("kept whole: widths stay at multiples of 8"))
    assert plan.skipped[why] == 5 and len(plan.examples[why]) == 5 and not plan.matches


def _transpose_head_model(rng, side: int | str = 8) -> onnx.ModelProto:
    """Conv(1->16)-Relu-Conv(16->16)-Relu-ConvTranspose(16->16, 3x3, stride 2): the head is no linear layer, so
    its MACs (half of the model's) stay whatever is pruned."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("ConvTranspose", ["r2", "wt"], ["y"], name="up", strides=[2, 2])]
    inits = [init("w1", rng.normal(0, 0.5, (16, 1, 3, 3)).astype(np.float32)),
             init("b1", rng.normal(0, 0.1, 16).astype(np.float32)),
             init("w2", rng.normal(0, 0.2, (16, 16, 3, 3)).astype(np.float32)),
             init("b2", rng.normal(0, 0.1, 16).astype(np.float32)),
             init("wt", rng.normal(0, 0.2, (16, 16, 3, 3)).astype(np.float32))]
    out = 2 * side + 1 if isinstance(side, int) else "side_out"
    return make_model(nodes, [vinfo("x", ["N", 1, side, side])], [vinfo("y", ["N", 16, out, out])], inits)


def test_targets_count_the_layers_that_cannot_be_pruned(rng):
    model = _transpose_head_model(rng)
    x = rng.random((64, 1, 8, 8), dtype=np.float32)
    before = model_report(model)
    fixed = 64 * 16 * 16 * 9  # the ConvTranspose: every input position times its 16 x 16 x 3 x 3 weights
    assert 0.45 * before.macs < fixed < 0.5 * before.macs
    out, _ = _prune(model, x, (("prune-channels", {"target_macs": 0.6, "channel_multiple": 1}),))
    after = model_report(out)
    assert after.macs <= 0.6 * before.macs and after.macs > 0.5 * before.macs  # of the whole model's MACs
    assert [i.dims[0] for i in out.graph.initializer if i.name.startswith("wt")] == [16]  # the head is whole
    assert np.abs(run(out, {"x": x})[0] - run(model, {"x": x})[0]).max() < 10  # it runs on the same inputs
    out, _ = _prune(model, x, (("prune-channels", {"target_params": 0.8, "channel_multiple": 1}),))
    assert model_report(out).params <= 0.8 * before.params
    with pytest.raises(PassError, match="cannot reach 0.4 of the MACs"):  # below the head's share: refused
        _prune(model, x, (("prune-channels", {"target_macs": 0.4, "channel_multiple": 1}),))


def test_targets_on_dynamic_sides_count_macs_at_the_data_size(rng):
    """A model with dynamic sides has MACs only at an input size: the pass counts them at the calibration
    data's, so it prunes exactly as its static twin does (not by parameters, which a MAC count with every
    side taken as 1 would amount to) and the per-pass table knows the MACs."""
    x = rng.random((64, 1, 8, 8), dtype=np.float32)
    spec = (("prune-channels", {"target_macs": 0.6, "channel_multiple": 1}),)
    static, _ = _prune(_transpose_head_model(np.random.default_rng(3)), x, spec)
    dynamic, records = _prune(_transpose_head_model(np.random.default_rng(3), side="side"), x, spec)
    widths = [[tuple(i.dims) for i in m.graph.initializer if i.name.startswith("w")] for m in (static, dynamic)]
    assert widths[0] == widths[1]
    assert records[-1].after.macs == model_report(static).macs > 0
    fixed = _transpose_head_model(np.random.default_rng(3))  # a fixed batch of 4: counted per run, four samples
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    batch4, _ = _prune(fixed, x, spec)
    assert [tuple(i.dims) for i in batch4.graph.initializer if i.name.startswith("w")] == widths[0]


@pytest.mark.parametrize("values, words", [
    ({"sparsity": 1.0}, "[0, 1)"), ({"sparsity": -0.1}, "[0, 1)"), ({"target_macs": 0.0}, "(0, 1]"),
    ({"importance": "random"}, "importance"), ({"layers": {"fc0": 1.5}}, "fc0"),
    ({"target_macs": 0.5, "target_params": 0.5}, "one of"), ({"target_latency": 1.5}, "(0, 1]"),
    ({"target_latency": 0.5, "target_macs": 0.5}, "one of"), ({"channel_multiple": -1}, "channel_multiple")])
def test_bad_options(values, words):
    with pytest.raises(OptionError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        PruneChannelsOptions(**values)


def test_target_that_would_empty_a_layer_and_unknown_layer(rng):
    model = mlp_model(rng, [8, 10, 4])
    x = rng.random((60, 8), dtype=np.float32)
    with pytest.raises(PassError, match="cannot reach") as info:
        _prune(model, x, (("prune-channels", {"target_macs": 0.01}),))
    assert info.value.exit_code == 2
    with pytest.raises(PassError, match="unknown layer 'nope'") as info:
        _prune(model, x, (("prune-channels", {"layers": {"nope": 0.5}}),))
    assert info.value.exit_code == 2
    with pytest.raises(PassError, match="cannot be pruned") as info:  # the output layer: its group is skipped
        _prune(model, x, (("prune-channels", {"layers": {"fc1": 0.5}}),))


def test_needs_data_unless_weights_only(rng):
    model = mlp_model(rng, [6, 10, 3])
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    with pytest.raises(OptionError, match="needs calibration data"):
        PruneChannels(PruneChannelsOptions(sparsity=0.5)).plan(loaded.graph, PassContext())
    weights_only = PruneChannels(PruneChannelsOptions(sparsity=0.5, importance="l1", reconstruct=False))
    result = weights_only.run(loaded.graph, PassContext())
    assert result.changed and result.count("units_removed") == 5


def test_recipe_with_per_layer_levels_round_trips(tmp_path):
    recipe = Recipe((PassSpec.of("prune-channels", {"layers": {"fc0": 0.25, "conv/1": 0.5}, "sparsity": 0.1}),))
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    assert load_recipe(path) == recipe


def test_cli_prune_channels_on_the_example(tmp_path):
    out, rep = str(tmp_path / "p.onnx"), str(tmp_path / "r.json")
    args = ["optimize", "--example", "digits-cnn", "-o", out, "--passes", "remove-dead,fold-linear,prune-channels",
            "--sparsity", "0.5", "--no-reconstruct", "--importance", "l1", "--no-latency", "--json", rep]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    with open(rep) as fh:
        report = json.load(fh)
    passes = {p["name"]: p for p in report["passes"]}
    assert passes["prune-channels"]["counts"]["units_removed"] > 0
    assert passes["prune-channels"]["after"]["params"] < passes["prune-channels"]["before"]["params"]
    spec = next(p for p in report["recipe"]["passes"] if p["name"] == "prune-channels")
    assert spec["reconstruct"] is False and spec["importance"] == "l1"
    assert any("lossy" in m for m in report["messages"])
    # a bad value is a usage error and writes nothing
    bad = str(tmp_path / "bad.onnx")
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", bad, "--passes", "prune-channels",
                                    "--sparsity", "1.5", "--no-latency"])
    assert res.exit_code == 2 and "[0, 1)" in res.output and not os.path.exists(bad)
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", bad, "--sparsity", "0.5"])
    assert res.exit_code == 2 and "not in --passes" in res.output and not os.path.exists(bad)


def test_consumer_of_two_pruned_groups_through_concat(rng):
    """A Conv reading a channel Concat of two pruned groups loses columns twice, with or without the refit."""
    import onnx.helper as h

    from conftest import init, make_model, vinfo

    nodes = [h.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             h.make_node("Conv", ["x", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["b"], ["rb"], name="relu_b"),
             h.make_node("Concat", ["ra", "rb"], ["c"], name="cat", axis=1),
             h.make_node("Conv", ["c", "wc", "bc"], ["y"], name="conv_c")]
    inits = [init("wa", rng.normal(0, 0.5, (8, 2, 3, 3)).astype(np.float32)), init("ba", np.zeros(8, np.float32)),
             init("wb", rng.normal(0, 0.5, (8, 2, 3, 3)).astype(np.float32)), init("bb", np.zeros(8, np.float32)),
             init("wc", rng.normal(0, 0.5, (4, 16, 1, 1)).astype(np.float32)), init("bc", np.zeros(4, np.float32))]
    model = make_model(nodes, [vinfo("x", ["N", 2, 5, 5])], [vinfo("y", ["N", 4, 5, 5])], inits)
    x = rng.random((60, 2, 5, 5), dtype=np.float32)
    for reconstruct in (True, False):
        out, records = _prune(model, x, (("prune-channels", {"sparsity": 0.5, "reconstruct": reconstruct}),))
        assert records[0].result.count("groups_pruned") == 2
        assert run(out, {"x": x})[0].shape == (60, 4, 5, 5)
        assert (4, 8, 1, 1) in {tuple(i.dims) for i in out.graph.initializer}


def _se_model(rng):
    """Conv a (4->16) - Relu - [squeeze-excitation: GAP - Conv b (16->12) - Relu - Conv c (12->16) - HardSigmoid]
    - Mul - Conv d (16->8) - Relu - GAP - Flatten - Gemm fc (3), input (N, 4, 6, 6). Conv d reads the gated main
    path, so pruning the gate branch (group b, after group a) changes d's input after d was refit."""
    import onnx.helper as h

    from conftest import init, make_model, vinfo
    w = {"wa": (16, 4, 1, 1), "wb": (12, 16, 1, 1), "wc": (16, 12, 1, 1), "wd": (8, 16, 1, 1)}
    inits = [init(k, rng.normal(0, 0.6, s).astype(np.float32)) for k, s in w.items()]
    inits += [init("b" + k[1], rng.normal(0, 0.1, s[0]).astype(np.float32)) for k, s in w.items()]
    inits += [init("wf", rng.normal(0, 0.5, (3, 8)).astype(np.float32)), init("bf", np.zeros(3, np.float32))]
    nodes = [h.make_node("Conv", ["x", "wa", "ba"], ["ca"], name="a"), h.make_node("Relu", ["ca"], ["ra"], name="ra"),
             h.make_node("GlobalAveragePool", ["ra"], ["ga"], name="ga"),
             h.make_node("Conv", ["ga", "wb", "bb"], ["cb"], name="b"), h.make_node("Relu", ["cb"], ["rb"], name="rb"),
             h.make_node("Conv", ["rb", "wc", "bc"], ["cc"], name="c"),
             h.make_node("HardSigmoid", ["cc"], ["gate"], name="hs"),
             h.make_node("Mul", ["ra", "gate"], ["m"], name="m"),
             h.make_node("Conv", ["m", "wd", "bd"], ["cd"], name="d"), h.make_node("Relu", ["cd"], ["rd"], name="rd"),
             h.make_node("GlobalAveragePool", ["rd"], ["gd"], name="gd"),
             h.make_node("Flatten", ["gd"], ["f"], name="flatten"),
             h.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    return make_model(nodes, [vinfo("x", ["N", 4, 6, 6])], [vinfo("y", None)], inits)


def test_a_consumer_whose_input_a_later_group_changes_is_refit_again(rng):
    from onnx_lincomp.calibration.moments import collect_layer_moments
    from onnx_lincomp.linear_layer import match_linear_layer
    from onnx_lincomp.passes.base import node_named

    model = _se_model(rng)
    x = rng.random((300, 4, 6, 6), dtype=np.float32)
    # d keeps its outputs (its group at level 0), so its target is the original's whole output
    out, records = _prune(model, x, (("prune-channels", {"sparsity": 0.5, "channel_multiple": 1,
                                                         "layers": {"d": 0.0}, "ridge": 0.0}),))
    result = records[0].result
    assert result.count("layers_refit_again") == 1 and result.count("groups_pruned") == 2
    # d's weights are the least-squares refit (no ridge) on what d reads in the final graph, against the
    # original's output
    loaded = model_from_proto(out)
    d = match_linear_layer(loaded.graph, node_named(loaded.graph, "d"))
    data = CalibrationData(_array_source(loaded, x), loaded.ctx, len(x))
    m = collect_layer_moments(loaded.graph, data, [d], _canonical(model))["d"]
    w, b = refit(m, np.arange(m.cols), d.weight.reshape(d.out_features, -1), d.bias, 0.0)
    np.testing.assert_allclose(d.weight.reshape(d.out_features, -1), w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d.bias, b, rtol=1e-4, atol=1e-5)
    # with d pruned too, fc (fit on d's first refit) is refit again after d is
    _, records = _prune(model, x, (("prune-channels", {"sparsity": 0.5, "channel_multiple": 1}),))
    assert records[0].result.count("layers_refit_again") == 2
    # must not fire: a plain chain has no side branch
    _, chain = _prune(mlp_model(rng, [6, 16, 12, 3]), rng.random((200, 6), dtype=np.float32),
                      (("prune-channels", {"sparsity": 0.5, "channel_multiple": 1}),))
    assert chain[0].result.count("layers_refit_again") == 0


def _canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    return to_model_proto(loaded.graph, loaded.ctx)
