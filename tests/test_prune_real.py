"""prune-channels on real graphs: UltraFace (../shared, skipped when absent) and a ResNet-style graph built here.

Each pruned model must pass the full checker, run in onnxruntime with the original's output shapes, cost fewer
MACs, report a finite output error, and keep every residual / concat stream consistent: the producers of one
channel group lose the same channels (they are pruned together, never one without the others).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import init, make_model, run, shared_path, vinfo
from onnx_lincomp.analysis.channel_groups import find_channel_groups
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.model_io import model_from_proto, to_model_proto
from onnx_lincomp.optimize import OptimizeOptions, Result, optimize
from onnx_lincomp.passes import PruneChannelsOptions
from onnx_lincomp.recipe import CalibrationSettings, PassSpec, Recipe

ULTRAFACE = ("models", "real", "ortexamples_ultraface_RFB-320_bnfolded.onnx")


def _prune(model, calib: str, **prune) -> Result:
    options = OptimizeOptions(Recipe((PassSpec.of("prune-channels", prune),), CalibrationSettings(0.0)),
                              latency=False, min_samples=1, batch_size=8)
    return optimize(model, calib, options)


def _canonical(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[int, tuple[str, ...]]]]:
    """The canonical model (the node names the pass sees and keeps: UltraFace's own nodes are unnamed) and the
    (width, producer node names) of every channel group with several producers (a residual stream)."""
    loaded = model_from_proto(model)
    canonicalize(loaded.graph, ctx=loaded.ctx)
    groups = [(g.width, tuple(p.nodes[0].name for p in g.producers))
              for g in find_channel_groups(loaded.graph).groups if len(g.producers) > 1]
    return to_model_proto(loaded.graph, loaded.ctx), groups


def _multi_producer_groups(model: onnx.ModelProto) -> list[tuple[int, tuple[str, ...]]]:
    return _canonical(model)[1]


def _out_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels (weight rows) of every Conv / Gemm node, by node name."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            out[node.name] = int(inits[node.input[1]].dims[0])
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out[node.name] = int(inits[node.input[1]].dims[0 if trans_b else 1])
    return out


def _check_pruned(original: onnx.ModelProto, result: Result, feeds: dict) -> list[np.ndarray]:
    onnx.checker.check_model(result.model, full_check=True)
    before, after = run(original, feeds), run(result.model, feeds)
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all(np.isfinite(a).all() for a in after)
    report = result.report
    assert report.after.macs < report.before.macs and report.after.params < report.before.params
    held = report.on_heldout
    assert held is not None and held.samples > 0 and held.non_finite == 0 and np.isfinite(held.rel_max)
    return after


def _assert_streams_pruned_together(groups, widths: dict[str, int]) -> None:
    for width, producers in groups:
        kept = {widths[p] for p in producers}
        assert len(kept) == 1, f"residual stream {producers} kept different widths {kept}"
        assert kept.pop() < width, f"residual stream {producers} (width {width}) was not pruned"


def _concat_widths(model: onnx.ModelProto) -> list[tuple[list[int], int]]:
    """(input channels, output channels) of every channel-axis Concat, from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    out = []
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if node.op_type == "Concat" and axis == 1 and all(len(shapes.get(t, [])) == 4 for t in node.input):
            out.append(([shapes[t][1] for t in node.input], shapes[node.output[0]][1]))
    return out


# ---- UltraFace (../shared) -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ultraface():
    path = shared_path(*ULTRAFACE)
    original = onnx.load(path)
    # channel_multiple 1: these tests follow the streams, which the 16- and 32-wide groups would hide at the
    # NCHWc block (test_ultraface_latency_target_keeps_whole_blocks checks the default)
    return original, _prune(path, "random:2", sparsity=0.3, channel_multiple=1)


@pytest.mark.real
def test_ultraface_pruned_runs_verifies_and_costs_less(ultraface):
    original, result = ultraface
    x = np.random.default_rng(0).random((1, 3, 240, 320), dtype=np.float32)
    _check_pruned(original, result, {"input": x})
    counts = result.report.passes[0].result.counts
    assert counts["groups_pruned"] >= 20 and counts["units_removed"] > 0
    assert result.report.after.macs < 0.8 * result.report.before.macs


@pytest.mark.real
def test_ultraface_residual_and_concat_streams_pruned_together(ultraface):
    original, result = ultraface
    canonical, groups = _canonical(original)
    assert groups, "UltraFace's RFB block (ConvLinear + shortcut Add) should form a group with two producers"
    widths, full = _out_channels(result.model), _out_channels(canonical)
    assert set(widths) == set(full)
    pruned = sum(widths[name] < w for name, w in full.items())
    # each group counts once however many producers it has: more layers shrank than groups were pruned
    counts = result.report.passes[0].result.counts
    assert pruned > counts["groups_pruned"], (pruned, counts)
    _assert_streams_pruned_together(groups, widths)
    skipped = result.report.passes[0].result.skipped
    assert "site changed since it was planned" not in skipped, skipped
    # the RFB branches meet in a channel Concat: each branch is pruned, the Concat and its reader follow
    before, after = _concat_widths(canonical), _concat_widths(result.model)
    assert len(before) == len(after) > 0
    assert all(sum(ins) == out for ins, out in after)
    assert any(a[1] < b[1] for a, b in zip(after, before, strict=True)), (before, after)


@pytest.mark.real
def test_ultraface_latency_target_keeps_whole_blocks():
    """At the default channel multiple (the CPU's NCHWc block) every pruned Conv keeps a whole number of blocks,
    so no layer leaves onnxruntime's blocked kernels; the modelled-latency target costs real MACs."""
    path = shared_path(*ULTRAFACE)
    original = onnx.load(path)
    result = _prune(path, "random:2", target_latency=0.5, importance="l1", reconstruct=False)
    x = np.random.default_rng(0).random((1, 3, 240, 320), dtype=np.float32)
    _check_pruned(original, result, {"input": x})
    full, widths = _out_channels(_canonical(original)[0]), _out_channels(result.model)
    block = PruneChannelsOptions().multiple
    shrunk = {n: (full[n], w) for n, w in widths.items() if w < full[n]}
    odd = {n: (w0, w) for n, (w0, w) in shrunk.items() if w % block and w0 >= block}  # narrower: exact counts
    assert shrunk and not odd, odd
    assert result.report.after.macs < 0.6 * result.report.before.macs


# ---- a ResNet-style graph built here --------------------------------------------------------------------------
class _ResNet:
    """Conv-BN-Relu blocks with identity shortcuts and a strided 1x1 projection shortcut, GAP + Gemm head.

    Residual streams: {stem, b1b} (16 channels), {b2b, b2p, b3b} (32 channels). With ``batchnorm`` False the
    Convs carry biases instead, and the projection is listed after the deeper branch it is added to.
    """

    def __init__(self, rng: np.random.Generator, batchnorm: bool = True):
        self.rng, self.batchnorm = rng, batchnorm
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv(self, x: str, cin: int, cout: int, k: int, name: str, stride: int = 1, relu: bool = True) -> str:
        w = self.rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
        self.inits.append(init(f"{name}_w", w))
        inputs = [x, f"{name}_w"]
        if not self.batchnorm:
            self.inits.append(init(f"{name}_bias", self.rng.normal(0, 0.1, cout).astype(np.float32)))
            inputs.append(f"{name}_bias")
        self.nodes.append(helper.make_node("Conv", inputs, [f"{name}_c"], name=name, kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4))
        y = f"{name}_c"
        if self.batchnorm:
            stats = (self.rng.uniform(0.5, 1.5, cout), self.rng.normal(0, 0.1, cout), self.rng.normal(0, 0.1, cout),
                     self.rng.uniform(0.5, 1.5, cout))
            self.inits += [init(f"{name}_{p}", v.astype(np.float32)) for p, v in zip("sbmv", stats, strict=True)]
            self.nodes.append(helper.make_node("BatchNormalization", [y] + [f"{name}_{p}" for p in "sbmv"],
                                               [f"{name}_bn"], name=f"{name}_bn"))
            y = f"{name}_bn"
        if relu:
            self.nodes.append(helper.make_node("Relu", [y], [f"{name}_r"], name=f"{name}_relu"))
            y = f"{name}_r"
        return y

    def block(self, x: str, cin: int, cout: int, name: str, stride: int = 1) -> str:
        h = self.conv(self.conv(x, cin, cout, 3, f"{name}a", stride), cout, cout, 3, f"{name}b", relu=False)
        short = x if cin == cout and stride == 1 else self.conv(x, cin, cout, 1, f"{name}p", stride, relu=False)
        self.nodes += [helper.make_node("Add", [h, short], [f"{name}_sum"], name=f"{name}_add"),
                       helper.make_node("Relu", [f"{name}_sum"], [f"{name}_out"], name=f"{name}_relu")]
        return f"{name}_out"

    def model(self) -> onnx.ModelProto:
        x = self.conv("x", 3, 16, 3, "stem")
        x = self.block(self.block(self.block(x, 16, 16, "b1"), 16, 32, "b2", stride=2), 32, 32, "b3")
        self.inits += [init("fc_w", self.rng.normal(0, 0.3, (10, 32)).astype(np.float32)),
                       init("fc_b", np.zeros(10, np.float32))]
        self.nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
                       helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
                       helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
        return make_model(self.nodes, [vinfo("x", ["N", 3, 16, 16])], [vinfo("y", ["N", 10])], self.inits,
                          ir_version=8)


RESIDUAL_STREAMS = {(16, ("stem", "b1b")), (32, ("b2b", "b2p", "b3b"))}


@pytest.mark.parametrize("batchnorm", [True, False], ids=["conv-bn-relu", "conv-bias-relu"])
def test_resnet_residual_streams_pruned_together(batchnorm):
    model = _ResNet(np.random.default_rng(0), batchnorm).model()
    onnx.checker.check_model(model, full_check=True)
    groups = _multi_producer_groups(model)
    assert {(w, tuple(sorted(p))) for w, p in groups} == {(w, tuple(sorted(p))) for w, p in RESIDUAL_STREAMS}
    x = np.random.default_rng(1).random((4, 3, 16, 16), dtype=np.float32)
    for reconstruct in (True, False):
        result = _prune(model, "random:32", sparsity=0.5, reconstruct=reconstruct, channel_multiple=1)
        _check_pruned(model, result, {"x": x})
        assert result.report.on_heldout.rel_max < 1.0
        widths = _out_channels(result.model)
        _assert_streams_pruned_together(groups, widths)
        assert widths["fc"] == 10  # the head's outputs are the model's: never pruned
        assert result.report.passes[0].result.counts["groups_pruned"] == 5  # 2 streams + b1a, b2a, b3a
        assert "site changed since it was planned" not in result.report.passes[0].result.skipped


def test_resnet_at_sparsity_zero_is_unchanged_with_or_without_reconstruction():
    model = _ResNet(np.random.default_rng(0)).model()
    x = np.random.default_rng(1).random((4, 3, 16, 16), dtype=np.float32)
    outs = []
    for reconstruct in (True, False):
        result = _prune(model, "random:16", sparsity=0.0, reconstruct=reconstruct)
        assert result.report.passes[0].result.counts["units_removed"] == 0
        assert _out_channels(result.model) == _out_channels(model)
        outs.append(run(result.model, {"x": x})[0])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_resnet_mac_target_is_met_and_error_finite():
    model = _ResNet(np.random.default_rng(2)).model()
    result = _prune(model, "random:32", target_macs=0.5, channel_multiple=1)
    x = np.random.default_rng(3).random((2, 3, 16, 16), dtype=np.float32)
    _check_pruned(model, result, {"x": x})
    assert result.report.after.macs <= 0.55 * result.report.before.macs  # linear layers are nearly all the MACs
    _assert_streams_pruned_together(_multi_producer_groups(model), _out_channels(result.model))
    assert all(np.isfinite(numpy_helper.to_array(i)).all() for i in result.model.graph.initializer)
