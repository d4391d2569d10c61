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


def test_write_external_leaves_the_model_alone_and_runs(tmp_path, rng):
    from onnx_lincomp.model_io import write_external

    model = mlp_model(rng, [64, 64, 8])
    before = model.SerializeToString()
    write_external(model, tmp_path / "m.onnx", "m.onnx.data")
    assert model.SerializeToString() == before  # no tensor moved out of the caller's proto
    assert (tmp_path / "m.onnx.data").stat().st_size >= 64 * 64 * 4
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    assert_same_outputs(model, onnx.load(tmp_path / "m.onnx"), {"x": rng.random((2, 64), dtype=np.float32)})
