"""prune-channels' latency side: the block-padded layer-time model, width alignment to the NCHWc block, and
``target_latency`` on a depthwise-separable CNN built here (checked in onnxruntime against the original)."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import run
from onnx_lincomp.analysis.channel_groups import ChannelGroup
from onnx_lincomp.analysis.layer_latency import LayerShape, layer_time, nchwc_block, padded
from onnx_lincomp.analysis.model_report import model_report
from onnx_lincomp.optimize import OptimizeOptions, optimize
from onnx_lincomp.passes.prune_channels import PruneChannelsOptions, removal_count
from onnx_lincomp.recipe import CalibrationSettings, PassSpec, Recipe


def _sepconv_model(rng: np.random.Generator, c1: int = 32, c2: int = 48) -> onnx.ModelProto:
    """Conv(3->c1,3x3)-Relu-DWConv(c1)-Relu-Conv(c1->c2,1x1)-Relu-GlobalAveragePool-Flatten-Gemm(10)."""
    def conv(name, x, w, group=1):
        k = w.shape[-1]
        return [numpy_helper.from_array(w.astype(np.float32), f"{name}_w"),
                numpy_helper.from_array(rng.normal(0, 0.1, w.shape[0]).astype(np.float32), f"{name}_b")], [
            helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_y"], name=name, group=group,
                             pads=[k // 2] * 4, kernel_shape=[k, k]),
            helper.make_node("Relu", [f"{name}_y"], [f"{name}_r"], name=f"{name}_relu")]
    inits, nodes = [], []
    for name, x, w, g in (("c1", "x", rng.normal(0, 0.4, (c1, 3, 3, 3)), 1),
                          ("dw", "c1_r", rng.normal(0, 0.4, (c1, 1, 3, 3)), c1),
                          ("pw", "dw_r", rng.normal(0, 1 / np.sqrt(c1), (c2, c1, 1, 1)), 1)):
        i, n = conv(name, x, w, g)
        inits += i
        nodes += n
    inits += [numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(c2), (10, c2)).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", ["pw_r"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "sepconv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                               [None, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_nchwc_block_and_padding():
    assert nchwc_block() in (8, 16)
    assert padded(17, 64, 16) == 32 and padded(16, 64, 16) == 16 and padded(5, 12, 16) == 5  # below a block
    dense = LayerShape(1000.0, 64, 64, False, False, False, "conv")
    assert layer_time(dense, 64, 64, 16) == 1000.0
    assert layer_time(dense, 33, 64, 16) == layer_time(dense, 48, 64, 16) == 750.0  # a started block costs whole
    dw = LayerShape(1000.0, 64, 64, True, True, False, "conv")
    assert layer_time(dw, 32, 32, 16) == pytest.approx(0.5 * 4.5 * 1000.0)


@pytest.mark.parametrize("width, multiple, level, removed", [
    (16, 16, 0.5, 0), (16, 16, 0.99, 0), (32, 16, 0.5, 16), (48, 16, 0.3, 0), (48, 16, 0.34, 16), (24, 16, 0.5, 8),
    (12, 16, 0.5, 6), (40, 8, 0.5, 16), (40, 1, 0.5, 20)])
def test_removal_count_keeps_whole_blocks(width, multiple, level, removed):
    group = ChannelGroup(width, (), (), (), (), (), (), width)  # free: any channel may go alone
    assert removal_count(group, level, 1, multiple) == removed


def test_auto_multiple_is_the_cpu_block():
    assert PruneChannelsOptions().multiple == nchwc_block()
    assert PruneChannelsOptions(channel_multiple=4).multiple == 4


@pytest.mark.parametrize("prune", [{"target_latency": 0.5, "channel_multiple": 16},
                                   {"target_latency": 0.5, "channel_multiple": 16, "reconstruct": False},
                                   {"target_macs": 0.5, "channel_multiple": 16}])
def test_target_latency_prunes_to_whole_blocks_and_verifies(tmp_path, prune):
    rng = np.random.default_rng(7)
    model = _sepconv_model(rng)
    path = tmp_path / "sep.onnx"
    onnx.save(model, path)
    x = rng.random((64, 3, 12, 12), dtype=np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    options = OptimizeOptions(Recipe((PassSpec.of("prune-channels", prune),), CalibrationSettings(0.0)),
                              latency=False, min_samples=1, batch_size=16)
    result = optimize(str(path), str(tmp_path / "calib.npz"), options)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    widths = {n.name: next(i.dims[0] for i in out.graph.initializer if i.name == n.input[1])
              for n in out.graph.node if n.op_type == "Conv"}
    assert widths["c1"] == widths["dw"] and all(w % 16 == 0 for w in widths.values())
    assert widths["c1"] < 32 or widths["pw"] < 48
    assert model_report(out).macs < model_report(model).macs
    ref, got = run(model, {"x": x})[0], run(out, {"x": x})[0]
    assert got.shape == ref.shape and np.isfinite(got).all()
    rel = float(np.abs(got - ref).mean() / np.abs(ref).mean())
    assert rel < 0.5, rel  # approximate: pruned half the time of a random net; a bound, not exactness
