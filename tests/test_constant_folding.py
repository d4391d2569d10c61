"""Constant folding, Conv bias adds and explicit SAME pads during canonicalisation.

Each rewrite: the layer is seen by ``match_linear_layer`` afterwards (structure), the checker passes, and
the model computes the same outputs in onnxruntime (atol 1e-5 of the output scale). Must-not-fire: input-
dependent subgraphs, results over the size limit, random ops, graph outputs, a failing folder.
"""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from conftest import assert_same_outputs, init, make_model, vinfo
from onnx_lincomp.canonicalize import FoldOptions, canonicalize
from onnx_lincomp.linear_layer import LinearLayer, Skip, match_linear_layer
from onnx_lincomp.model_io import model_from_proto, to_model_proto


def _canon(model, fold: FoldOptions | None = None):
    loaded = model_from_proto(model)
    report = canonicalize(loaded.graph, ctx=loaded.ctx, fold=fold or FoldOptions())
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, report, loaded


def _layer(loaded, op):
    node = next(n for n in loaded.graph.nodes if n.op == op)
    return match_linear_layer(loaded.graph, node)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _weight_builder(kind, rng, shape):
    """Nodes and initializers computing a float weight named 'w' of ``shape`` from constants only."""
    if kind == "constant_of_shape":
        noise = rng.normal(size=shape).astype(np.float32)
        fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.5])
        return ([helper.make_node("ConstantOfShape", ["w_shape"], ["w_fill"], value=fill),
                 helper.make_node("Add", ["w_fill", "w_noise"], ["w"])],
                [init("w_shape", np.array(shape, np.int64)), init("w_noise", noise)])
    column = rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1)).astype(np.float32)
    return ([helper.make_node("Expand", ["w_col", "w_shape"], ["w"])],
            [init("w_col", column), init("w_shape", np.array(shape, np.int64))])


@pytest.mark.parametrize("kind", ["constant_of_shape", "expand"])
def test_computed_gemm_weight_is_folded(rng, kind):
    nodes, inits = _weight_builder(kind, rng, [5, 3])
    nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1))
    inits.append(init("b", rng.normal(size=5).astype(np.float32)))
    model = make_model(nodes, [vinfo("x", ["N", 3])], [vinfo("y", ["N", 5])], inits)
    assert isinstance(_layer(model_from_proto(model), "Gemm"), Skip)
    out, report, loaded = _canon(model)
    assert isinstance(_layer(loaded, "Gemm"), LinearLayer)
    assert _ops(out) == ["Gemm"]
    f = report.folding
    assert f.nodes_folded == len(nodes) - 1 and f.tensors_folded == 1 and f.bytes_folded == 5 * 3 * 4
    assert report.as_dict()["constant_folding"]["nodes_folded"] == f.nodes_folded
    assert_same_outputs(model, out, {"x": rng.normal(size=(4, 3)).astype(np.float32)})


def test_transposed_matmul_weight_is_folded(rng):
    nodes = [helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="add")]
    inits = [init("wt", rng.normal(size=(4, 6)).astype(np.float32)), init("b", rng.normal(size=4).astype(np.float32))]
    model = make_model(nodes, [vinfo("x", ["N", 6])], [vinfo("y", ["N", 4])], inits)
    out, report, loaded = _canon(model)
    layer = _layer(loaded, "MatMul")
    assert isinstance(layer, LinearLayer) and layer.has_bias and layer.weight.shape == (4, 6)
    assert _ops(out) == ["MatMul", "Add"] and report.folding.tensors_folded == 1
    assert_same_outputs(model, out, {"x": rng.normal(size=(3, 6)).astype(np.float32)})


def test_float16_weight_behind_cast_is_folded(rng):
    w16 = rng.normal(size=(4, 3, 3, 3)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    inits = [init("w16", w16), init("b", rng.normal(size=4).astype(np.float32))]
    model = make_model(nodes, [vinfo("x", ["N", 3, 6, 6])], [vinfo("y", None)], inits)
    out, report, loaded = _canon(model)
    layer = _layer(loaded, "Conv")
    assert isinstance(layer, LinearLayer)
    np.testing.assert_array_equal(layer.weight, w16.astype(np.float64))
    assert _ops(out) == ["Conv"] and report.folding.bytes_folded == w16.size * 4
    assert_same_outputs(model, out, {"x": rng.normal(size=(2, 3, 6, 6)).astype(np.float32)})


def _dequantized_matmul(rng):
    wq = rng.integers(-127, 128, size=(6, 4)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"], name="dq", axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    inits = [init("wq", wq), init("scale", rng.uniform(0.01, 0.05, 4).astype(np.float32)),
             init("zp", rng.integers(-3, 4, 4).astype(np.int8))]
    return make_model(nodes, [vinfo("x", ["N", 6])], [vinfo("y", ["N", 4])], inits)


def test_dequantized_int8_weight_is_folded(rng):
    model = _dequantized_matmul(rng)
    out, report, loaded = _canon(model)
    assert isinstance(_layer(loaded, "MatMul"), LinearLayer)
    assert _ops(out) == ["MatMul"] and report.folding.nodes_folded == 1 and report.folding.bytes_folded == 6 * 4 * 4
    assert_same_outputs(model, out, {"x": rng.normal(size=(5, 6)).astype(np.float32)})


def test_dequantize_folding_can_be_turned_off(rng):
    model = _dequantized_matmul(rng)
    out, report, loaded = _canon(model, FoldOptions(dequantize=False))
    assert isinstance(_layer(loaded, "MatMul"), Skip)
    assert _ops(out) == ["DequantizeLinear", "MatMul"]
    reason = "constant folding: DequantizeLinear kept (dequantize folding is off)"
    assert report.skipped == {reason: 1} and report.examples[reason] == ("dq",)


@pytest.mark.parametrize("bias_shape", [[1, 4, 1, 1], [4, 1, 1], [1]])
def test_paddle_style_conv_bias_add_becomes_the_conv_bias(rng, bias_shape):
    """Paddle: Add(conv, Reshape(b, [1, C, 1, 1])) with b and the shape in Constant nodes."""
    b = rng.normal(size=int(np.prod(bias_shape))).astype(np.float32)
    const = helper.make_tensor
    nodes = [helper.make_node("Constant", [], ["w"], value=const("w_v", TensorProto.FLOAT, [4, 2, 3, 3],
                                                                  rng.normal(size=72).astype(np.float32))),
             helper.make_node("Constant", [], ["b"], value=const("b_v", TensorProto.FLOAT, [b.size], b)),
             helper.make_node("Constant", [], ["b_shape"], value=const("s_v", TensorProto.INT64, [len(bias_shape)],
                                                                        bias_shape)),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["b", "b_shape"], ["b4"], name="reshape"),
             helper.make_node("Add", ["c", "b4"], ["z"], name="bias_add"),
             helper.make_node("Relu", ["z"], ["y"], name="relu")]
    model = make_model(nodes, [vinfo("x", ["N", 2, 5, 5])], [vinfo("y", None)], [], opset=11)
    out, report, loaded = _canon(model)
    assert report.conv_bias_adds_fused == 1 and report.folding.nodes_folded == 1
    assert _ops(out) == ["Conv", "Relu"]
    layer = _layer(loaded, "Conv")
    assert isinstance(layer, LinearLayer) and layer.has_bias
    np.testing.assert_allclose(layer.bias, np.broadcast_to(b, 4), rtol=1e-7)
    assert_same_outputs(model, out, {"x": rng.normal(size=(2, 2, 5, 5)).astype(np.float32)})


@pytest.mark.parametrize("case", ["spatial_constant", "second_reader"])
def test_conv_add_that_is_not_a_bias_stays(rng, case):
    w = init("w", rng.normal(size=(4, 2, 1, 1)).astype(np.float32))
    shape = [1, 1, 3, 3] if case == "spatial_constant" else [1, 4, 1, 1]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "k"], ["y"], name="add")]
    outputs = [vinfo("y", None)]
    if case == "second_reader":
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        outputs.append(vinfo("r", None))
    model = make_model(nodes, [vinfo("x", ["N", 2, 3, 3])], outputs,
                       [w, init("k", rng.normal(size=shape).astype(np.float32))])
    out, report, _ = _canon(model)
    assert report.conv_bias_adds_fused == 0 and "Add" in _ops(out)
    assert len(report.skipped) == 1 and report.examples[next(iter(report.skipped))] == ("add",)
    assert_same_outputs(model, out, {"x": rng.normal(size=(2, 2, 3, 3)).astype(np.float32)})


def test_subgraph_reading_a_graph_input_is_not_folded(rng):
    """Shape of an input with a static shape, and a weight computed from a second input, stay computed."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("ConstantOfShape", ["s"], ["ones"], name="ones",
                              value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Mul", ["ones", "c"], ["xc"], name="scale"),
             helper.make_node("Mul", ["v", "c2"], ["w"], name="weight"),
             helper.make_node("MatMul", ["xc", "w"], ["y"], name="mm")]
    inits = [init("c", np.float32(3.0)), init("c2", rng.normal(size=(4, 2)).astype(np.float32))]
    model = make_model(nodes, [vinfo("x", [2, 4]), vinfo("v", [4, 2])], [vinfo("y", [2, 2])], inits)
    out, report, loaded = _canon(model)
    assert _ops(out) == _ops(model)
    assert report.folding.nodes_folded == 0 and report.folding.tensors_folded == 0 and not report.skipped
    assert isinstance(_layer(loaded, "MatMul"), Skip)
    assert_same_outputs(model, out, {"x": rng.normal(size=(2, 4)).astype(np.float32),
                                     "v": rng.normal(size=(4, 2)).astype(np.float32)})


def test_result_over_the_size_limit_stays_computed_with_a_reason(rng):
    nodes, inits = _weight_builder("constant_of_shape", rng, [64, 64])
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"))
    model = make_model(nodes, [vinfo("x", ["N", 64])], [vinfo("y", ["N", 64])], inits)
    out, report, loaded = _canon(model, FoldOptions(size_limit_bytes=8192))
    assert _ops(out) == ["ConstantOfShape", "Add", "MatMul"]
    reason = "constant folding: result larger than the size limit of 8 KiB (stays computed)"
    assert report.skipped == {reason: 1} and report.folding.nodes_folded == 0
    assert len(report.examples[reason]) == 1 and report.examples[reason][0].startswith("ConstantOfShape")
    assert isinstance(_layer(loaded, "MatMul"), Skip)
    assert_same_outputs(model, out, {"x": rng.normal(size=(2, 64)).astype(np.float32)})
    _, folded, loaded = _canon(model, FoldOptions(size_limit_bytes=64 * 64 * 4))
    assert folded.folding.tensors_folded == 1 and isinstance(_layer(loaded, "MatMul"), LinearLayer)


def test_random_ops_and_graph_outputs_are_not_folded(rng):
    nodes = [helper.make_node("RandomUniform", [], ["r"], name="rand", shape=[2, 3], seed=1.0),
             helper.make_node("Add", ["x", "r"], ["y"], name="add"),
             helper.make_node("Transpose", ["k"], ["kt"], name="transpose", perm=[1, 0])]
    model = make_model(nodes, [vinfo("x", [2, 3])], [vinfo("y", [2, 3]), vinfo("kt", [3, 2])],
                       [init("k", rng.normal(size=(2, 3)).astype(np.float32))])
    out, report, _ = _canon(model)
    assert _ops(out) == ["RandomUniform", "Add", "Transpose"]
    assert report.skipped == {"constant folding: random op (folding would freeze one draw)": 1,
                              "constant folding: result is a graph output": 1}


def test_a_failing_folder_does_not_stop_canonicalisation(rng, monkeypatch):
    nodes, inits = _weight_builder("expand", rng, [5, 3])
    nodes.append(helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1))
    model = make_model(nodes, [vinfo("x", ["N", 3])], [vinfo("y", ["N", 5])], inits)

    def boom(self, *args, **kwargs):
        raise RuntimeError("folder exploded\nsecond line")

    monkeypatch.setattr(gs.Graph, "fold_constants", boom)
    out, report, loaded = _canon(model)
    assert report.folding.error == "RuntimeError: folder exploded" and report.folding.nodes_folded == 0
    assert report.skipped == {"constant folding: onnxruntime could not evaluate it (see the folding error)": 1}
    assert isinstance(_layer(loaded, "Gemm"), Skip)
    assert_same_outputs(model, out, {"x": rng.normal(size=(2, 3)).astype(np.float32)})


def test_folding_goes_part_by_part_when_one_piece_fails(rng, monkeypatch):
    nodes, inits = _weight_builder("constant_of_shape", rng, [5, 3])
    nodes.append(helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1))
    model = make_model(nodes, [vinfo("x", ["N", 3])], [vinfo("y", ["N", 5])], inits)
    real, calls = gs.Graph.fold_constants, []

    def first_fails(self, *args, **kwargs):
        calls.append(kwargs["partitioning"])
        if len(calls) == 1:
            raise RuntimeError("one piece failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gs.Graph, "fold_constants", first_fails)
    out, report, loaded = _canon(model)
    assert calls == [None, "recursive"] and report.folding.error == "RuntimeError: one piece failed"
    assert report.folding.tensors_folded == 1 and not report.skipped
    assert isinstance(_layer(loaded, "Gemm"), LinearLayer)
    assert_same_outputs(model, out, {"x": rng.normal(size=(2, 3)).astype(np.float32)})


def test_skip_reasons_are_grouped_without_names(rng):
    nodes, inputs = [], [vinfo("x0", ["N", 2, 4, 4])]
    inits = []
    for i in range(4):
        nodes.append(helper.make_node("Conv", [f"x{i}", f"w{i}"], [f"z{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"z{i}", "s", "b", "m", "v"], [f"x{i + 1}"],
                                      name=f"bn{i}"))
        inputs.append(vinfo(f"w{i}", [2, 2, 1, 1]))
    inits = [init(n, np.ones(2, np.float32)) for n in "sbmv"]
    model = make_model(nodes, inputs, [vinfo("x4", None)], inits)
    _, report, _ = _canon(model)
    reason = ("BatchNormalization after a layer that cannot be rewritten: weight is not a constant (graph input or "
              "computed)")
    assert report.skipped == {reason: 4}
    assert report.examples == {reason: ("bn0", "bn1", "bn2")}
    assert report.as_dict()["examples"] == {reason: ["bn0", "bn1", "bn2"]}


@pytest.mark.parametrize("auto_pad,kernel,strides,size", [
    ("SAME_UPPER", [3, 3], [1, 1], ["N", 2, 7, 7]), ("SAME_UPPER", [2, 4], [1, 1], ["N", 2, 7, 6]),
    ("SAME_LOWER", [2, 2], [1, 1], ["N", 2, 5, 5]), ("SAME_UPPER", [3, 3], [2, 2], [2, 2, 7, 8]),
    ("SAME_LOWER", [4, 3], [2, 3], [2, 2, 9, 7])])
def test_same_auto_pad_becomes_explicit_pads(rng, auto_pad, kernel, strides, size):
    """CNTK exports (onnx model zoo mnist-8) use auto_pad=SAME_UPPER, which the linear-layer view skips."""
    w = rng.normal(size=[3, 2] + kernel).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad=auto_pad, strides=strides,
                            kernel_shape=kernel)
    model = make_model([conv], [vinfo("x", size)], [vinfo("y", None)], [init("w", w)])
    assert isinstance(_layer(model_from_proto(model), "Conv"), Skip)
    out, report, loaded = _canon(model)
    assert report.conv_pads_made_explicit == 1 and isinstance(_layer(loaded, "Conv"), LinearLayer)
    shape = [2 if isinstance(d, str) else d for d in size]
    assert_same_outputs(model, out, {"x": rng.normal(size=shape).astype(np.float32)})


def test_same_auto_pad_with_stride_and_unknown_size_stays():
    w = np.ones((3, 2, 3, 3), np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2])
    model = make_model([conv], [vinfo("x", ["N", 2, "H", "W"])], [vinfo("y", None)], [init("w", w)])
    out, report, _ = _canon(model)
    assert report.conv_pads_made_explicit == 0
    assert helper.get_attribute_value(next(a for a in out.graph.node[0].attribute if a.name == "auto_pad")) == \
        b"SAME_UPPER"


def test_unchanged_model_reserialises_no_larger(rng):
    """Shapes inferred on load are not written into a model that listed none (it grew 5-15 % before)."""
    from conftest import cnn_model

    model = cnn_model(rng)
    assert len(model.graph.value_info) == 0
    out = to_model_proto(*_loaded_pair(model))
    assert len(out.graph.value_info) == 0 and out.ByteSize() <= model.ByteSize() * 1.01
    inferred = onnx.shape_inference.infer_shapes(model)
    assert len(inferred.graph.value_info) > 0
    again = to_model_proto(*_loaded_pair(inferred))
    assert {v.name for v in again.graph.value_info} == {v.name for v in inferred.graph.value_info}
    assert again.ByteSize() <= inferred.ByteSize() * 1.01
    assert len(to_model_proto(*_loaded_pair(model), infer_shapes=True).graph.value_info) > 0


def _loaded_pair(model):
    loaded = model_from_proto(model)
    return loaded.graph, loaded.ctx
