import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import assert_same_outputs, init, make_model, mlp_model, run, vinfo
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.errors import InvalidModelError, LincompError
from onnx_lincomp.model_io import load_model, save_model, save_model_proto, to_model_proto


def _with_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    model.producer_name = "unit-test"
    model.producer_version = "9.9"
    model.model_version = 7
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    model.metadata_props.add(key="author", value="tests")
    return model


def test_round_trip_keeps_metadata_and_outputs(tmp_path, rng):
    model = _with_metadata(mlp_model(rng, [5, 7, 3]))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    loaded = load_model(src)
    out = save_model(loaded.graph, loaded.ctx, tmp_path / "out.onnx")
    back = onnx.load(out)
    onnx.checker.check_model(back, full_check=True)
    assert (back.producer_name, back.producer_version, back.model_version) == ("unit-test", "9.9", 7)
    assert back.doc_string == "model doc" and back.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in back.metadata_props} == {"author": "tests"}
    assert [(o.domain, o.version) for o in back.opset_import] == [("", 17)]
    assert_same_outputs(model, back, {"x": rng.random((4, 5), dtype=np.float32)})


def test_external_data_round_trip(tmp_path, rng):
    model = mlp_model(rng, [64, 64, 8])
    src = tmp_path / "ext.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    loaded = load_model(src)
    assert loaded.ctx.external_data
    (tmp_path / "out").mkdir()  # folders are never created by the writer
    out = save_model(loaded.graph, loaded.ctx, tmp_path / "out" / "copy.onnx")
    assert (tmp_path / "out" / "copy.onnx.data").is_file()
    back = onnx.load(out)
    assert_same_outputs(model, back, {"x": rng.random((2, 64), dtype=np.float32)})


def test_refuses_to_overwrite_input(tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(mlp_model(rng, [3, 4, 2]), src)
    loaded = load_model(src)
    before = src.read_bytes()
    with pytest.raises(LincompError, match="refusing to overwrite"):
        save_model(loaded.graph, loaded.ctx, src)
    assert src.read_bytes() == before
    save_model(loaded.graph, loaded.ctx, src, overwrite=True)


def test_failed_check_leaves_no_file(tmp_path, rng):
    model = mlp_model(rng, [3, 4, 2])
    model.graph.node[0].input[1] = "does_not_exist"
    with pytest.raises(LincompError, match="checker"):
        save_model_proto(model, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"not a model at all \x00\x01"])
def test_invalid_file_is_one_line_error(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(InvalidModelError) as err:
        load_model(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidModelError, match="no such model file"):
        load_model(tmp_path / "nope.onnx")


def test_constant_nodes_are_lifted_and_initializer_inputs_dropped(tmp_path, rng):
    w = rng.normal(size=(4, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(w)),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    # IR 3 style: the initializer b is also listed as a graph input
    model = make_model(nodes + [helper.make_node("Add", ["y", "b"], ["z"])],
                       [vinfo("x", ["N", 4]), vinfo("b", [3])], [vinfo("z", ["N", 3])],
                       [init("b", rng.normal(size=3).astype(np.float32))], ir_version=7)
    src = tmp_path / "c.onnx"
    onnx.save(model, src)
    loaded = load_model(src)
    report = canonicalize(loaded.graph, ctx=loaded.ctx)
    assert report.constants_lifted == 1 and report.initializer_inputs_dropped == 1
    back = to_model_proto(loaded.graph, loaded.ctx)
    assert [n.op_type for n in back.graph.node] == ["MatMul", "Add"]
    assert [i.name for i in back.graph.input] == ["x"]
    x = rng.random((2, 4), dtype=np.float32)
    b = onnx.numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(run(back, {"x": x})[0], run(model, {"x": x, "b": b})[0], rtol=1e-6)
    # the interface change is said, not silent
    from click.testing import CliRunner

    from onnx_lincomp.cli import main
    res = CliRunner().invoke(main, ["optimize", str(src), "--calib", "random:16", "-o", str(tmp_path / "o.onnx"),
                                    "--no-latency"])
    assert res.exit_code == 0, res.output
    assert "1 initializer(s) the input also lists as graph inputs" in res.output


def test_write_external_leaves_the_model_alone_and_runs(tmp_path, rng):
    from onnx_lincomp.model_io import write_external

    model = mlp_model(rng, [64, 64, 8])
    before = model.SerializeToString()
    write_external(model, tmp_path / "m.onnx", "m.onnx.data")
    assert model.SerializeToString() == before  # no tensor moved out of the caller's proto
    assert (tmp_path / "m.onnx.data").stat().st_size >= 64 * 64 * 4
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    assert_same_outputs(model, onnx.load(tmp_path / "m.onnx"), {"x": rng.random((2, 64), dtype=np.float32)})


def test_external_data_in_subgraphs_is_read_and_outer_weights_run(tmp_path, rng):
    """External data mapped on load: a weight inside an If branch is read into the proto, a top-level weight
    that only a branch reads still runs in onnxruntime, with references kept or not, and saves to a valid file."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_lincomp.runtime.session import open_session

    big = rng.random((64, 64), dtype=np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "wt"], ["yt"])], "then", [],
                               [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [1, 64])],
                               [numpy_helper.from_array(big * 2, "wt")])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["ye"])], "else", [],
                               [helper.make_tensor_value_info("ye", TensorProto.FLOAT, [1, 64])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
                               helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(big, "w")])
    src = tmp_path / "if.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src,
                    save_as_external_data=True, location="if.data", size_threshold=0)
    loaded = load_model(src)
    x = rng.random((1, 64), dtype=np.float32)
    for keep in (False, True):
        session = open_session(to_model_proto(loaded.graph, loaded.ctx, keep_mapped=keep))
        for c in (True, False):
            y = session.run(None, {"x": x, "c": np.array(c)})[0]
            np.testing.assert_allclose(y, x @ (big * 2 if c else big), rtol=1e-5, atol=1e-5)
    (tmp_path / "out").mkdir()
    out = save_model(loaded.graph, loaded.ctx, tmp_path / "out" / "if.onnx")
    onnx.checker.check_model(str(out))
    y = open_session(str(out)).run(None, {"x": x, "c": np.array(False)})[0]
    np.testing.assert_allclose(y, x @ big, rtol=1e-5, atol=1e-5)


def test_optimize_counts_an_external_data_input_at_its_size_on_disk(tmp_path, rng):
    # dead units give remove-dead something to remove; the not-worse gate must compare the output with the
    # input's bytes on disk (data file included), not with the proto that only references them
    import json

    from click.testing import CliRunner

    from onnx_lincomp.cli import main
    from onnx_lincomp.model_io import size_on_disk

    src = tmp_path / "ext.onnx"
    onnx.save_model(mlp_model(rng, [32, 64, 8], dead={0: list(range(32))}), src, save_as_external_data=True,
                    location="ext.onnx.data", size_threshold=0)
    np.savez(tmp_path / "d.npz", x=rng.random((64, 32), dtype=np.float32))  # [0, 1): the planted units are dead
    res = CliRunner().invoke(main, ["optimize", str(src), "--calib", str(tmp_path / "d.npz"), "-o",
                                    str(tmp_path / "o.onnx"), "--no-latency", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    before = json.loads((tmp_path / "r.json").read_text())["before"]["size_bytes"]
    assert abs(before - size_on_disk(src)) < 1024
