"""refresh_shapes: new shapes after a rewrite, old shapes kept (and said so) when inference fails, and the
weightless path for models too large to infer in memory."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from conftest import init, make_model, run, vinfo
from onnx_lincomp.graph_edit import ShapeRefresh, refresh_shapes
from onnx_lincomp.model_io import model_from_proto


def mlp(rng: np.random.Generator, hidden: int = 8) -> onnx.ModelProto:
    """x[N,4] -> Gemm(hidden) -> Relu -> Reshape([-1, hidden]) -> Gemm(3) -> y."""
    inits = [init("w1", rng.standard_normal((hidden, 4)).astype(np.float32)),
             init("b1", rng.standard_normal(hidden).astype(np.float32)),
             init("shape", np.array([-1, hidden], np.int64)),
             init("w2", rng.standard_normal((3, hidden)).astype(np.float32)),
             init("b2", rng.standard_normal(3).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc2")]
    return make_model(nodes, [vinfo("x", ["N", 4])], [vinfo("y", ["N", 3])], inits)


def narrow(graph: gs.Graph, keep: int) -> None:
    """Keep the first ``keep`` hidden units: the rewrite a dead-neuron removal makes."""
    fc1, flat, fc2 = (next(n for n in graph.nodes if n.name == name) for name in ("fc1", "flat", "fc2"))
    for node, index, value in ((fc1, 1, fc1.inputs[1].values[:keep]), (fc1, 2, fc1.inputs[2].values[:keep]),
                               (flat, 1, np.array([-1, keep], np.int64)), (fc2, 1, fc2.inputs[1].values[:, :keep])):
        node.inputs[index] = gs.Constant(node.inputs[index].name + "_narrow", np.ascontiguousarray(value))
    graph.cleanup()


def shape_of(graph: gs.Graph, name: str):
    return graph.tensors()[name].shape


def test_narrowed_layer_gets_new_shapes():
    graph = model_from_proto(mlp(np.random.default_rng(0))).graph
    assert shape_of(graph, "h") == ["N", 8]
    narrow(graph, 5)
    result = refresh_shapes(graph)
    assert result == ShapeRefresh(True, "", False, 3)
    assert shape_of(graph, "h") == shape_of(graph, "r") == ["N", 5]
    assert shape_of(graph, "f")[1] == 5


@pytest.mark.parametrize("failure", ["export", "inference"])
def test_failed_inference_keeps_old_shapes(failure, monkeypatch, caplog):
    graph = model_from_proto(mlp(np.random.default_rng(1))).graph
    narrow(graph, 5)
    if failure == "export":  # graphsurgeon cannot export this attribute: export raises TypeError
        next(n for n in graph.nodes if n.name == "relu").attrs["bad"] = object()
    else:
        def boom(*args, **kwargs):
            raise RuntimeError("[ShapeInferenceError] simulated")
        monkeypatch.setattr(onnx.shape_inference, "infer_shapes", boom)
    with caplog.at_level(logging.WARNING, logger="onnx_lincomp.graph_edit"):
        result = refresh_shapes(graph)
    assert not result.inferred
    assert ("TypeError" if failure == "export" else "simulated") in result.reason
    assert shape_of(graph, "h") == ["N", 8]  # the old shapes stay, stale but not silently dropped
    assert any("keeping the previous shapes" in r.getMessage() for r in caplog.records)


def test_big_model_goes_through_the_weightless_copy(monkeypatch):
    graph = model_from_proto(mlp(np.random.default_rng(2), hidden=128)).graph
    narrow(graph, 100)
    seen: list[onnx.ModelProto] = []
    infer = onnx.shape_inference.infer_shapes

    def recording(model, *args, **kwargs):
        seen.append(model)
        return infer(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", recording)
    result = refresh_shapes(graph, weightless_above=1000)  # the weights take 4 * (100*4 + 100 + 3*100 + 3) bytes
    assert result.inferred and result.weightless and result.reason == "weightless copy"
    inferred_on = seen[0].graph
    assert {"w1_narrow", "w2_narrow"} <= {i.name for i in inferred_on.input}  # large weights: typed inputs
    assert "shape_narrow" in {t.name for t in inferred_on.initializer}  # small constants stay for data propagation
    assert shape_of(graph, "h") == ["N", 100]
    assert shape_of(graph, "f")[1] == 100
    assert [t.name for t in graph.inputs] == ["x"]  # the graph itself is untouched
    assert all(isinstance(n.inputs[1], gs.Constant) for n in graph.nodes if n.op == "Gemm")
    model = gs.export_onnx(graph, do_type_check=False)
    onnx.checker.check_model(model, full_check=True)
    assert run(model, {"x": np.ones((2, 4), np.float32)})[0].shape == (2, 3)


def test_small_model_does_not_take_the_weightless_path():
    graph = model_from_proto(mlp(np.random.default_rng(4))).graph
    assert not refresh_shapes(graph).weightless
