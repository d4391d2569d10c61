import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import assert_same_outputs, init, make_model, vinfo
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.linear_layer import LinearLayer, Skip, match_linear_layer
from onnx_lincomp.model_io import model_from_proto, to_model_proto


def _bn(rng, c, name="bn", x="z", y="y"):
    inits = [init(f"{name}_s", rng.uniform(0.5, 2, c).astype(np.float32)),
             init(f"{name}_b", rng.normal(size=c).astype(np.float32)),
             init(f"{name}_m", rng.normal(size=c).astype(np.float32)),
             init(f"{name}_v", rng.uniform(0.5, 2, c).astype(np.float32))]
    node = helper.make_node("BatchNormalization", [x] + [i.name for i in inits], [y], name=name, epsilon=1e-3)
    return node, inits


def _canon(model):
    loaded = model_from_proto(model)
    report = canonicalize(loaded.graph, ctx=loaded.ctx)
    return to_model_proto(loaded.graph, loaded.ctx), report, loaded


@pytest.mark.parametrize("group,pads,strides,dilations,bias", [
    (1, [0, 0, 0, 0], [1, 1], [1, 1], True), (1, [1, 2, 1, 0], [2, 1], [1, 1], False),
    (2, [1, 1, 1, 1], [1, 1], [2, 2], True), (4, [0, 0, 0, 0], [1, 1], [1, 1], False)])
def test_batchnorm_folds_into_conv(rng, group, pads, strides, dilations, bias):
    w = rng.normal(size=(4, 4 // group, 3, 3)).astype(np.float32)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", rng.normal(size=4).astype(np.float32))] if bias else [])
    bn, bn_inits = _bn(rng, 4)
    conv = helper.make_node("Conv", inputs, ["z"], group=group, pads=pads, strides=strides, dilations=dilations)
    model = make_model([conv, bn], [vinfo("x", ["N", 4, 9, 9])], [vinfo("y", None)], inits + bn_inits)
    out, report, _ = _canon(model)
    assert report.batchnorms_folded == 1
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(model, out, {"x": rng.normal(size=(2, 4, 9, 9)).astype(np.float32)})


@pytest.mark.parametrize("trans_b,alpha,beta,bias_shape", [
    (1, 1.0, 1.0, (5,)), (0, 0.5, 2.0, (5,)), (1, 2.0, 0.3, (1, 5)), (0, 1.0, 1.0, None)])
def test_gemm_attributes_normalised_and_bn_folded(rng, trans_b, alpha, beta, bias_shape):
    w = rng.normal(size=(5, 3) if trans_b else (3, 5)).astype(np.float32)
    inputs, inits = ["x", "w"], [init("w", w)]
    if bias_shape:
        inputs.append("c")
        inits.append(init("c", rng.normal(size=bias_shape).astype(np.float32)))
    gemm = helper.make_node("Gemm", inputs, ["z"], transB=trans_b, alpha=alpha, beta=beta)
    bn, bn_inits = _bn(rng, 5)
    model = make_model([gemm, bn], [vinfo("x", ["N", 3])], [vinfo("y", ["N", 5])], inits + bn_inits)
    out, report, _ = _canon(model)
    assert report.batchnorms_folded == 1 and [n.op_type for n in out.graph.node] == ["Gemm"]
    assert_same_outputs(model, out, {"x": rng.normal(size=(4, 3)).astype(np.float32)})


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_view_and_bn_fold(rng, bias_first):
    w = rng.normal(size=(3, 6)).astype(np.float32)
    add_inputs = ["b", "mm"] if bias_first else ["mm", "b"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", add_inputs, ["z"])]
    bn, bn_inits = _bn(rng, 6)
    model = make_model(nodes + [bn], [vinfo("x", ["N", 3])], [vinfo("y", ["N", 6])],
                       [init("w", w), init("b", rng.normal(size=6).astype(np.float32))] + bn_inits)
    out, report, loaded = _canon(model)
    assert report.batchnorms_folded == 1
    layer = match_linear_layer(loaded.graph, next(n for n in loaded.graph.nodes if n.op == "MatMul"))
    assert (isinstance(layer, LinearLayer) and layer.kind == "matmul" and layer.weight.shape == (6, 3)
            and len(layer.nodes) == 2)
    assert_same_outputs(model, out, {"x": rng.normal(size=(4, 3)).astype(np.float32)})


def test_batchnorm_after_relu_is_kept(rng):
    conv = helper.make_node("Conv", ["x", "w"], ["c"])
    relu = helper.make_node("Relu", ["c"], ["z"])
    bn, bn_inits = _bn(rng, 2)
    model = make_model([conv, relu, bn], [vinfo("x", ["N", 2, 4, 4])], [vinfo("y", None)],
                       [init("w", rng.normal(size=(2, 2, 1, 1)).astype(np.float32))] + bn_inits)
    out, report, _ = _canon(model)
    assert report.batchnorms_folded == 0
    assert report.skipped == {"BatchNormalization after Relu (not a linear layer)": 1}
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "BatchNormalization"]


def test_batchnorm_not_folded_when_conv_output_has_another_reader(rng):
    conv = helper.make_node("Conv", ["x", "w"], ["z"])
    bn, bn_inits = _bn(rng, 2)
    model = make_model([conv, bn, helper.make_node("Relu", ["z"], ["r"])], [vinfo("x", ["N", 2, 4, 4])],
                       [vinfo("y", None), vinfo("r", None)],
                       [init("w", rng.normal(size=(2, 2, 1, 1)).astype(np.float32))] + bn_inits)
    out, report, _ = _canon(model)
    assert report.batchnorms_folded == 0 and "BatchNormalization input has other readers" in report.skipped
    assert_same_outputs(model, out, {"x": rng.normal(size=(1, 2, 4, 4)).astype(np.float32)})


def _layer_of(model, op):
    loaded = model_from_proto(model)
    return match_linear_layer(loaded.graph, next(n for n in loaded.graph.nodes if n.op == op))


def test_linear_layer_skips(rng):
    w = rng.normal(size=(3, 3)).astype(np.float32)
    trans_a = make_model([helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)], [vinfo("x", [3, "N"])],
                         [vinfo("y", None)], [init("w", w)])
    assert isinstance(_layer_of(trans_a, "Gemm"), Skip) and "transA" in _layer_of(trans_a, "Gemm").reason
    shared = make_model([helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])],
                        [vinfo("x", ["N", 3])], [vinfo("y", None)], [init("w", w)])
    assert "shared" in _layer_of(shared, "MatMul").reason
    as_input = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vinfo("x", ["N", 3]), vinfo("w", [3, 3])],
                          [vinfo("y", None)], [])
    assert "not a constant" in _layer_of(as_input, "MatMul").reason
