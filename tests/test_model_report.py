"""The one model counter: the parameter rule (weights of any dtype, quantization parameters apart, shape
constants left out), non-zeros, bytes, MACs, and the graph and proto entry points agreeing."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import init, make_model, run, shared_path, vinfo
from onnx_lincomp.analysis.model_report import Figures, graph_figures, model_report
from onnx_lincomp.model_io import load_model

EXAMPLES = Path(__file__).resolve().parents[1] / "onnx_lincomp" / "examples"
FLOATS = ("float32", "float16", "float64", "bfloat16")


def same_params(report, figures: Figures) -> None:
    assert (figures.params, figures.params_by_dtype, figures.quant_params, figures.nonzeros, figures.param_bytes) == (
        report.params, report.params_by_dtype, report.quant_params, report.nonzeros, report.param_bytes)


def qdq_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> Q/DQ -> MatMul(DQ(int8 W)) + b -> Reshape(shape constant): an INT8 QDQ model."""
    w = rng.integers(-127, 128, size=(8, 4)).astype(np.int8)
    w[0, :] = 0
    w[3, 1] = 0
    inits = [init("x_scale", np.float32(0.02)), init("x_zp", np.int8(0)),
             init("w_q", w), init("w_scale", np.full(4, 0.01, np.float32)), init("w_zp", np.zeros(4, np.int8)),
             init("b", np.array([0.5, 0.0, -1.0, 2.0], np.float32)), init("shape", np.array([-1, 2, 2], np.int64))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["z"]),
             helper.make_node("Reshape", ["z", "shape"], ["y"])]
    model = make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 2, 2])], inits, opset=17)
    return model, w


def test_int8_qdq_weights_are_parameters():
    model, w = qdq_model(np.random.default_rng(0))
    onnx.checker.check_model(model, full_check=True)
    run(model, {"x": np.ones((2, 8), np.float32)})  # a valid model onnxruntime runs
    rep = model_report(model)
    assert rep.params_by_dtype == {"float32": 4, "int8": 32}
    assert rep.params == 36
    assert rep.quant_params == 1 + 1 + 4 + 4  # x scale/zero point, per-channel w scale/zero point
    assert rep.nonzeros == int(np.count_nonzero(w)) + 3
    assert rep.param_bytes == 32 + 4 * 4
    assert rep.macs == 8 * 4 and rep.nodes_without_shapes == 0
    assert sum(n.params for n in rep.nodes) == rep.params
    d = rep.as_dict()
    assert {"params_by_dtype", "quant_params", "nonzeros", "param_bytes"} <= d.keys()


def test_graph_figures_match_model_report_on_qdq():
    model, _ = qdq_model(np.random.default_rng(1))
    rep = model_report(model)
    figures = graph_figures(gs.import_onnx(model))
    same_params(rep, figures)
    assert figures.macs == rep.macs == 32
    assert figures.as_dict()["params_by_dtype"] == {"float32": 4, "int8": 32}


def test_shape_constants_are_not_parameters():
    """Reshape shape, Slice starts/ends/axes, Unsqueeze axes, Gather indices, Resize scales, Expand shape and
    a Shape -> Gather -> Unsqueeze -> Concat([-1]) chain feeding Reshape are not parameters; a float Mul
    constant and a Constant-node weight are."""
    rng = np.random.default_rng(2)
    inits = [init("w", rng.standard_normal((4, 4)).astype(np.float32)),
             init("i0", np.array(0, np.int64)), init("ax0", np.array([0], np.int64)),
             init("minus1", np.array([-1], np.int64)), init("starts", np.array([0], np.int64)),
             init("ends", np.array([2], np.int64)), init("axes1", np.array([1], np.int64)),
             init("scales", np.array([1, 1, 2], np.float32)), init("eshape", np.array([1, 1, 1], np.int64)),
             init("unused", np.ones(7, np.float32))]
    const_w = helper.make_tensor("cw", TensorProto.FLOAT, [2], [3.0, 0.0])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Shape", ["h"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["h", "shape"], ["r"]),
             helper.make_node("Slice", ["r", "starts", "ends", "axes1"], ["sl"]),
             helper.make_node("Constant", [], ["cwt"], value=const_w),
             helper.make_node("Mul", ["sl", "cwt"], ["m"]),
             helper.make_node("Unsqueeze", ["m", "axes1"], ["u"]),
             helper.make_node("Expand", ["u", "eshape"], ["e"]),
             helper.make_node("Resize", ["e", "", "scales"], ["y"], mode="nearest")]
    model = make_model(nodes, [vinfo("x", ["N", 4])], [vinfo("y", ["N", 1, 4])], inits, opset=17)
    onnx.checker.check_model(model, full_check=True)
    run(model, {"x": np.ones((3, 4), np.float32)})
    rep = model_report(model)
    assert rep.params_by_dtype == {"float32": 16 + 2}
    assert rep.nonzeros == int(np.count_nonzero(numpy_helper.to_array(inits[0]))) + 1
    assert rep.quant_params == 0
    const_node = next(n for n in rep.nodes if n.op == "Constant")
    assert const_node.params == 2
    same_params(rep, graph_figures(gs.import_onnx(model)))


def test_int4_weights_count_half_a_byte():
    w = np.array([[1, 0, -2, 3, 0], [4, 5, 0, -6, 7], [0, 0, 1, 1, 1]], np.int8)
    weight = helper.make_tensor("w4", TensorProto.INT4, list(w.shape), w.ravel().tolist())
    nodes = [helper.make_node("DequantizeLinear", ["w4", "s"], ["wd"], axis=0),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    model = make_model(nodes, [vinfo("x", ["N", 3])], [vinfo("y", ["N", 5])],
                       [weight, init("s", np.float32(0.1))], opset=21)
    onnx.checker.check_model(model, full_check=True)
    rep = model_report(model)
    assert rep.params_by_dtype == {"int4": 15}
    assert rep.param_bytes == 8  # 15 half bytes, rounded up
    assert rep.nonzeros == int(np.count_nonzero(w))
    assert rep.quant_params == 1
    same_params(rep, graph_figures(gs.import_onnx(model)))


def test_integer_ops_count_macs():
    rng = np.random.default_rng(3)
    inits = [init("w", rng.integers(-5, 5, (6, 3)).astype(np.int8)), init("xzp", np.int8(0)),
             init("k", rng.integers(-5, 5, (2, 1, 3, 3)).astype(np.int8))]
    nodes = [helper.make_node("MatMulInteger", ["x", "w", "xzp"], ["y"]),
             helper.make_node("ConvInteger", ["img", "k", "xzp"], ["c"])]
    model = make_model(nodes, [vinfo("x", ["N", 6], TensorProto.INT8), vinfo("img", ["N", 1, 5, 5], TensorProto.INT8)],
                       [vinfo("y", ["N", 3], TensorProto.INT32), vinfo("c", ["N", 2, 3, 3], TensorProto.INT32)],
                       inits, opset=17)
    rep = model_report(model)
    assert rep.macs == 6 * 3 + (2 * 3 * 3) * 9
    assert rep.params_by_dtype == {"int8": 18 + 18} and rep.quant_params == 1
    figures = graph_figures(gs.import_onnx(model))
    same_params(rep, figures)
    assert figures.macs == rep.macs


def test_matmulnbits_counts_k_times_n():
    k, n, block = 16, 8, 16
    packed = np.full((n, k // block, block // 2), 0x11, np.uint8)
    packed[0, 0, 0] = 0x10  # one zero nibble
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                              K=k, N=n, bits=4, block_size=block)]
    graph = helper.make_graph(nodes, "nbits", [vinfo("x", ["N", k])], [vinfo("y", ["N", n])],
                              [init("B", packed), init("scales", np.ones(n, np.float32))])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    rep = model_report(model)
    assert rep.params_by_dtype == {"uint4": k * n}
    assert rep.param_bytes == packed.size and rep.nonzeros == k * n - 1 and rep.quant_params == n
    assert rep.macs == k * n
    same_params(rep, graph_figures(gs.import_onnx(model)))


def test_subgraph_constants_are_attributed_to_their_node():
    then_w = helper.make_tensor("tw", TensorProto.FLOAT, [3], [1.0, 2.0, 0.0])
    then_g = helper.make_graph([helper.make_node("Add", ["x", "tw"], ["t_out"])], "then", [], [vinfo("t_out", [3])],
                               [then_w])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e_out"], value=helper.make_tensor(
        "ev", TensorProto.FLOAT, [3], [4.0, 5.0, 6.0]))], "else", [], [vinfo("e_out", [3])])
    nodes = [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vinfo("x", [3]), vinfo("c", [], TensorProto.BOOL)], [vinfo("y", [3])], [])
    onnx.checker.check_model(model, full_check=True)
    rep = model_report(model)
    assert rep.params == 6 and rep.nonzeros == 5
    assert [n.params for n in rep.nodes] == [6]
    same_params(rep, graph_figures(gs.import_onnx(model)))


# Figures of the bundled examples before the counter was unified (float-only counters of both kinds agreed).
EXAMPLE_FIGURES = {"digits_cnn.onnx": (3818, 25600), "digits_mlp.onnx": (13098, 12928)}


@pytest.mark.parametrize("name", sorted(EXAMPLE_FIGURES))
def test_bundled_examples_keep_their_figures(name):
    path = EXAMPLES / name
    params, macs = EXAMPLE_FIGURES[name]
    rep = model_report(onnx.load(path))
    assert (rep.params, rep.macs, rep.nodes_without_shapes) == (params, macs, 0)
    assert rep.params_by_dtype == {"float32": params}
    assert rep.param_bytes == 4 * params
    assert sum(n.params for n in rep.nodes) == params
    figures = graph_figures(load_model(path).graph)
    same_params(rep, figures)
    assert figures.macs == macs


@pytest.mark.real
@pytest.mark.parametrize("name, float_params", [
    ("trained/own_fmnist_mlp_l1.onnx", 199210),
    ("real/ultraface_version-RFB-320.onnx", 307624),  # anchor priors are float Constant nodes: counted
    ("real/ch_PP-OCRv4_det_infer.onnx", 1171841 - 24),  # Constant-node weights; 6 Resize scales (4 each) left out
    ("real/silero_vad.onnx", 545286),  # the weights sit in If subgraphs
])
def test_real_models_one_counter(name, float_params):
    path = shared_path("models", name)
    rep = model_report(onnx.load(path))
    assert sum(v for k, v in rep.params_by_dtype.items() if k in FLOATS) == float_params
    graph = load_model(path).graph
    start = time.perf_counter()
    figures = graph_figures(graph)
    assert time.perf_counter() - start < 2.0
    same_params(rep, figures)


def _paddle_style_conv(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv 3->4 (3x3, pad 1) on an input written as Paddle exports a dynamic shape: dim_value -1."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vinfo("x", [1, 3, 1, 1])], [vinfo("y", None)],
                       [init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32))])
    for d in model.graph.input[0].type.tensor_type.shape.dim:
        d.Clear()
        d.dim_value = -1
    return model


def test_negative_dims_are_dynamic_and_macs_are_per_sample():
    model = _paddle_style_conv(np.random.default_rng(0))
    run(model, {"x": np.ones((2, 3, 8, 8), np.float32)})  # onnxruntime runs it at any size
    # no size given: the Conv is not counted (no MACs at an invented 1x1 side), and it says so
    rep = model_report(model)
    assert rep.macs == 0 and rep.nodes_without_shapes == 1
    per_conv = 4 * 3 * 9 * 8 * 8
    assert model_report(model, {"x": (1, 3, 8, 8)}).macs == per_conv
    # a batch in the given shape is not multiplied in: the figure is per sample
    assert model_report(model, {"x": (16, 3, 8, 8)}).macs == per_conv
    assert model_report(model, {"x": (1, 3, 16, 16)}).macs == 4 * per_conv


def test_optimize_counts_macs_at_the_calibration_size_of_a_dynamic_model(tmp_path):
    """No --input-shape: a model with dynamic sides is counted at the size its calibration samples have."""
    from onnx_lincomp.optimize import OptimizeOptions, optimize
    from onnx_lincomp.recipe import Recipe

    model = _paddle_style_conv(np.random.default_rng(0))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).random((40, 3, 8, 8), dtype=np.float32))
    result = optimize(model, str(tmp_path / "x.npz"), OptimizeOptions(Recipe(), latency=False, min_samples=1))
    assert result.report.before.macs == result.report.after.macs == 4 * 3 * 9 * 8 * 8
