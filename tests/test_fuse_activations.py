"""Hard-sigmoid / hard-swish chains fused into HardSigmoid / HardSwish: the same outputs in onnxruntime, fewer
ops; chains that differ anywhere (constants, a second reader, a graph output in the middle) are left alone."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import init, make_model, run, vinfo
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.fuse_activations import fuse_hard_activations
from onnx_lincomp.model_io import model_from_proto, to_model_proto


def _chain(kind: str, three: float = 3.0, six: float = 6.0, clip_max: float = 6.0) -> list[onnx.NodeProto]:
    """x -> Conv -> the activation written out -> y."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "clip_max"], ["r6"], name="clip")]
    if kind == "hsigmoid_div":
        nodes.append(helper.make_node("Div", ["r6", "six"], ["y"], name="div"))
    elif kind == "hsigmoid_mul":
        nodes.append(helper.make_node("Mul", ["sixth", "r6"], ["y"], name="mul"))
    elif kind == "hswish_div_after":  # Paddle: x * clip / 6
        nodes += [helper.make_node("Mul", ["c", "r6"], ["m"], name="mul"),
                  helper.make_node("Div", ["m", "six"], ["y"], name="div")]
    elif kind == "hswish_div_before":  # x * (clip / 6)
        nodes += [helper.make_node("Div", ["r6", "six"], ["h"], name="div"),
                  helper.make_node("Mul", ["h", "c"], ["y"], name="mul")]
    return nodes


def _model(rng, kind: str, opset: int = 13, **consts) -> onnx.ModelProto:
    values = {"three": 3.0, "six": 6.0, "clip_max": 6.0, **consts}
    inits = [init("w", rng.normal(0, 1, (4, 2, 3, 3)).astype(np.float32)),
             init("three", np.array([values["three"]], np.float32)), init("zero", np.array(0.0, np.float32)),
             init("clip_max", np.array(values["clip_max"], np.float32)),
             init("six", np.array(values["six"], np.float32)), init("sixth", np.array(1 / 6, np.float32))]
    return make_model(_chain(kind), [vinfo("x", ["N", 2, 8, 8])], [vinfo("y", ["N", 4, 6, 6])], inits, opset=opset)


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    loaded = model_from_proto(model)
    report = canonicalize(loaded.graph)
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, report.activations_fused


@pytest.mark.parametrize("kind,opset,ops", [
    ("hsigmoid_div", 13, ["Conv", "HardSigmoid"]),
    ("hsigmoid_mul", 13, ["Conv", "HardSigmoid"]),
    ("hswish_div_after", 13, ["Conv", "HardSigmoid", "Mul"]),
    ("hswish_div_before", 13, ["Conv", "HardSigmoid", "Mul"]),
    ("hswish_div_after", 14, ["Conv", "HardSwish"]),
    ("hswish_div_before", 14, ["Conv", "HardSwish"]),
])
def test_chains_fuse_and_compute_the_same(rng, kind, opset, ops):
    model = _model(rng, kind, opset)
    out, fused = _fused(model)
    assert fused == 1
    assert sorted(n.op_type for n in out.graph.node) == sorted(ops)
    x = rng.normal(0, 2, (3, 2, 8, 8)).astype(np.float32)  # both clip bounds are reached
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("consts", [{"three": 2.0}, {"six": 5.0}, {"clip_max": 5.0}])
def test_other_constants_are_not_fused(rng, consts):
    out, fused = _fused(_model(rng, "hswish_div_after", **consts))
    assert fused == 0 and "HardSigmoid" not in {n.op_type for n in out.graph.node}


def test_a_second_reader_or_graph_output_in_the_chain_blocks_it(rng):
    model = _model(rng, "hswish_div_after")
    model.graph.output.append(vinfo("r6", ["N", 4, 6, 6]))  # the clipped value is also an output
    out, fused = _fused(model)
    assert fused == 0
    model = _model(rng, "hsigmoid_div")
    model.graph.node.append(helper.make_node("Relu", ["a"], ["z"], name="second_reader"))
    model.graph.output.append(vinfo("z", ["N", 4, 6, 6]))
    out, fused = _fused(model)
    assert fused == 0
    x = rng.normal(0, 2, (2, 2, 8, 8)).astype(np.float32)
    for got, want in zip(run(out, {"x": x}), run(model, {"x": x}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_constant_wider_than_x_is_not_a_scalar(rng):
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(_model(rng, "hsigmoid_div"))
    g.tensors()["six"].values = np.full((1, 1, 1, 1, 1), 6.0, np.float32)  # rank 5 against x's 4: broadcasts up
    assert fuse_hard_activations(g) == 0


def _typed(rng, dtype, six_op: str = "Div") -> onnx.ModelProto:
    """Gemm then hard-swish (x * Clip(x + 3, 0, 6), then / 6 or * 1/6) in ``dtype`` throughout."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    scale = ("six", 6.0) if six_op == "Div" else ("sixth", 1 / 6)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["c"], name="gemm"),
             helper.make_node("Add", ["c", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "six_max"], ["r6"], name="clip"),
             helper.make_node("Mul", ["c", "r6"], ["m"], name="mul"),
             helper.make_node(six_op, ["m", scale[0]], ["y"], name="scale")]
    inits = [init("w", rng.normal(size=(5, 4)).astype(dtype)), init("three", np.array(3.0, dtype)),
             init("zero", np.array(0.0, dtype)), init("six_max", np.array(6.0, dtype)),
             init(scale[0], np.array(scale[1], dtype))]
    return make_model(nodes, [vinfo("x", ["N", 5], elem)], [vinfo("y", ["N", 4], elem)], inits)


@pytest.mark.parametrize("dtype,six_op,fused", [(np.float16, "Mul", 1), (np.float16, "Div", 1),
                                                (np.float64, "Div", 0)])
def test_float16_fuses_and_double_does_not(rng, dtype, six_op, fused):
    """1/6 in float16 is 0.16663 and still fuses; onnxruntime has no double HardSigmoid, so float64 stays."""
    model = _typed(rng, dtype, six_op)
    out, count = _fused(model)
    assert count == fused
    x = rng.normal(0, 2, (6, 5)).astype(dtype)
    np.testing.assert_allclose(run(out, {"x": x})[0].astype(np.float32), run(model, {"x": x})[0].astype(np.float32),
                               rtol=2e-2 if dtype == np.float16 else 1e-7, atol=2e-2 if dtype == np.float16 else 1e-7)


def test_clip_bounds_as_attributes_and_a_missing_bound(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a"], ["r6"], name="clip", min=0.0, max=6.0),  # opset < 11: attributes
             helper.make_node("Div", ["r6", "six"], ["y"], name="div")]
    inits = [init("w", rng.normal(0, 1, (4, 2, 3, 3)).astype(np.float32)), init("three", np.array(3.0, np.float32)),
             init("six", np.array(6.0, np.float32))]
    model = make_model(nodes, [vinfo("x", ["N", 2, 8, 8])], [vinfo("y", ["N", 4, 6, 6])], inits, opset=10)
    out, fused = _fused(model)
    assert fused == 1 and "HardSigmoid" in {n.op_type for n in out.graph.node}
    x = rng.normal(0, 2, (2, 2, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    nodes[2] = helper.make_node("Clip", ["a", "zero"], ["r6"], name="clip")  # no upper bound: not relu6
    inits.append(init("zero", np.array(0.0, np.float32)))
    _, fused = _fused(make_model(nodes, [vinfo("x", ["N", 2, 8, 8])], [vinfo("y", ["N", 4, 6, 6])], inits))
    assert fused == 0
