"""Tensors an If / Loop / Scan body reads from the outer scope are a fixed interface: no pass may narrow,
reroute or fold them (graphsurgeon lists the body's nodes among their consumers, so an analysis that follows
consumers used to rewrite one branch and leave the other reading the old width)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnx_lincomp.cli import main
from onnx_lincomp.graph_edit import is_graph_output, subgraph_reads


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def if_model(rng: np.random.Generator) -> onnx.ModelProto:
    """``r1 = Relu(Gemm(X))`` with dead and always-active units; an If reads r1 in both branches (then: a
    MatMul+Add+Relu layer, else: Identity) and a Gemm reads the If's output. The branch is chosen by the sign of
    ``sum(X)``."""
    b1 = rng.normal(0, 0.1, 32)
    b1[:8], b1[8:16] = -50.0, 50.0  # dead, always active
    inits = {"W1": rng.normal(0, 0.25, (16, 32)), "b1": b1, "W2": rng.normal(0, 0.2, (32, 32)),
             "b2": rng.normal(0, 0.1, 32), "W3": rng.normal(0, 0.2, (32, 10)), "b3": rng.normal(0, 0.1, 10),
             "zero": np.array(0.0)}
    then_g = h.make_graph([h.make_node("MatMul", ["r1", "W2"], ["tm"]), h.make_node("Add", ["tm", "b2"], ["ta"]),
                           h.make_node("Relu", ["ta"], ["t_out"])], "then", [], [_vi("t_out", ["N", 32])])
    else_g = h.make_graph([h.make_node("Identity", ["r1"], ["e_out"])], "else", [], [_vi("e_out", ["N", 32])])
    nodes = [h.make_node("Gemm", ["X", "W1", "b1"], ["g1"], name="gemm1"), h.make_node("Relu", ["g1"], ["r1"]),
             h.make_node("ReduceSum", ["X"], ["s"], keepdims=0), h.make_node("Greater", ["s", "zero"], ["cond"]),
             h.make_node("If", ["cond"], ["hif"], then_branch=then_g, else_branch=else_g, name="branch"),
             h.make_node("Gemm", ["hif", "W3", "b3"], ["g3"], name="gemm3"), h.make_node("Relu", ["g3"], ["Y"])]
    graph = h.make_graph(nodes, "if_reads_r1", [_vi("X", ["N", 16])], [_vi("Y", ["N", 10])],
                         [nh.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_subgraph_reads_names_the_captured_tensors(rng):
    g = gs.import_onnx(if_model(rng))
    assert subgraph_reads(g) == {"r1", "W2", "b2"}
    tensors = g.tensors()
    assert is_graph_output(g, tensors["r1"]) and not is_graph_output(g, tensors["g1"])


@pytest.mark.parametrize("args", [[], ["--passes", "prune-channels", "--sparsity", "0.3", "--channel-multiple", "1"],
                                  ["--passes", "quantize-int8", "--keep-slower"]])
def test_passes_keep_what_a_branch_reads(tmp_path, rng, args):
    src, out, data = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "d.npz"
    onnx.save(if_model(rng), src)
    x = rng.random((128, 16), dtype=np.float32)
    np.savez(data, X=np.where((np.arange(128) % 2 == 0)[:, None], x, -x))  # both branches calibrate
    res = CliRunner().invoke(main, ["optimize", str(src), "--calib", str(data), "-o", str(out), "--no-latency",
                                    *args])
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(str(out), full_check=True)
    before, after = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, out))
    x = np.random.default_rng(1).random((8, 16), dtype=np.float32)
    for feed in (x, -x):  # sum > 0 takes the then branch, sum < 0 the else branch
        want, got = (s.run(None, {"X": feed})[0] for s in (before, after))
        tol = 0.05 * float(np.abs(want).max()) if "quantize-int8" in args else 1e-4
        np.testing.assert_allclose(got, want, atol=tol)
    if not args:  # the exact passes leave r1 at full width and say why
        assert "read inside an If/Loop/Scan body" in res.output
        assert "Relu -> t_out" in res.output  # a Relu in a branch is named though the node has no name
