"""Silent wrong results become errors or gates: degraded models, too few samples, mismatched statistics,
labels that are not labels, guessed shapes, NaN weights, batch axes that are not axis 0."""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import init, make_model, mlp_model, vinfo
from onnx_lincomp.calibration import CalibrationSource, input_specs, open_calibration
from onnx_lincomp.cli import main
from onnx_lincomp.errors import CalibrationDataError, InvalidModelError, VerificationGateError
from onnx_lincomp.examples import example_paths
from onnx_lincomp.model_io import model_from_proto
from onnx_lincomp.optimize import OptimizeOptions, optimize
from onnx_lincomp.recipe import CalibrationSettings, PassSpec, Recipe
from onnx_lincomp.runtime.feeds import iterate_feeds


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_degraded_model_fails_the_default_output_gate(tmp_path):
    out = tmp_path / "o.onnx"
    res = _run("optimize", "--example", "digits-mlp", "-o", out, "--dead-rate", "0.9", "--no-latency")
    assert res.exit_code == 4 and "outputs changed by up to" in res.output and not out.exists()
    res = _run("optimize", "--example", "digits-mlp", "-o", out, "--dead-rate", "0.9", "--no-latency",
               "--max-abs-error", "100")  # an explicit gate says what change is acceptable
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args", [["--max-samples", "1"], ["--verify-split", "0.999"]])
def test_statistics_on_too_few_samples_fail(tmp_path, args):
    out = tmp_path / "o.onnx"
    res = _run("optimize", "--example", "digits-mlp", "-o", out, "--no-latency", *args)
    assert res.exit_code == 4 and "fewer than the minimum of 32" in res.output and not out.exists()


def test_min_samples_can_be_lowered_in_the_library():
    model, calib = example_paths("digits-mlp")
    options = OptimizeOptions(Recipe(calibration=CalibrationSettings(0.2, max_samples=8)), labels="y",
                              latency=False, min_samples=4, max_output_change=None)
    assert optimize(model, calib, options).report.calibration_samples == 6


def test_statistics_of_another_model_are_refused(tmp_path, rng):
    _run("analyze", "--example", "digits-cnn", "--save-stats", tmp_path / "cnn.npz")
    res = _run("optimize", "--example", "digits-mlp", "-o", tmp_path / "o.onnx", "--stats", tmp_path / "cnn.npz",
               "--no-latency")
    assert res.exit_code == 3 and "collected on another model" in res.output


def test_float_input_array_as_labels_is_refused(tmp_path):
    model, calib = example_paths("digits-mlp")
    data = dict(np.load(calib))
    np.savez(tmp_path / "d.npz", **data, feats=data["input"][:, 20])  # pixel intensities, not class ids
    res = _run("optimize", model, "--calib", tmp_path / "d.npz", "--labels", "feats", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 3 and "labels 'feats' are not class ids" in res.output


def test_float64_data_is_said_in_the_report(tmp_path):
    model, calib = example_paths("digits-mlp")
    data = dict(np.load(calib))
    np.savez(tmp_path / "d.npz", input=data["input"].astype(np.float64), y=data["y"])
    res = optimize(model, tmp_path / "d.npz", OptimizeOptions(labels="y", latency=False))
    assert any("float64; it was cast to float32" in m for m in res.report.messages)


def test_random_data_refuses_to_guess_image_sizes(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vinfo("x", ["N", 3, "H", "W"])], [vinfo("y", None)],
                       [init("w", rng.normal(size=(4, 3, 3, 3)).astype(np.float32))])
    specs = input_specs(model_from_proto(model).graph)
    source = open_calibration("random:4", specs)
    with pytest.raises(CalibrationDataError, match="input 'x' has dynamic dimension 2 \\('H'\\)"):
        next(iter(source.batches(2)))
    sized = open_calibration("random:4", specs, shape_overrides={"x": (1, 3, 8, 8)})
    assert next(iter(sized.batches(2)))["x"].shape == (2, 3, 8, 8)


def test_state_input_gets_its_batch_on_the_right_axis(rng, tmp_path):
    """A recurrent state [2, N, 4] next to an input [N, 4]: samples go on axis 1 of the state, not axis 0."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceSum", ["state", "axes"], ["s"], keepdims=0),
             helper.make_node("Add", ["r", "s"], ["y"])]
    model = make_model(nodes, [vinfo("x", ["N", 4]), vinfo("state", [2, "N", 4])], [vinfo("y", ["N", 4])],
                       [init("w", rng.normal(size=(4, 4)).astype(np.float32)), init("axes", np.array([0], np.int64))])
    graph = model_from_proto(model).graph
    source = CalibrationSource(input_specs(graph), random_samples=5)
    feeds, batch = next(iter(iterate_feeds(graph, source, 5)))
    assert batch["state"].shape == (5, 2, 4) and feeds["state"].shape == (2, 5, 4)
    onnx.save(model, tmp_path / "m.onnx")
    res = _run("analyze", tmp_path / "m.onnx", "--calib", "random:40")
    assert res.exit_code == 0, res.output
    assert "40 samples" in res.output


def test_nan_weights_are_an_invalid_model(rng, tmp_path):
    model = mlp_model(rng, [4, 6, 2])
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    onnx.save(model, tmp_path / "nan.onnx")
    with pytest.raises(InvalidModelError, match="holds NaN or Inf"):
        optimize(tmp_path / "nan.onnx", "random:64", OptimizeOptions(latency=False))


def test_fixed_batch_with_too_few_samples_is_an_error(rng, tmp_path):
    model = mlp_model(rng, [4, 6, 2])
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_value = 8
    graph = model_from_proto(model).graph
    np.save(tmp_path / "x.npy", rng.random((5, 4), dtype=np.float32))
    source = open_calibration(tmp_path / "x.npy", input_specs(graph))
    with pytest.raises(CalibrationDataError, match="fixed batch of 8"):
        list(iterate_feeds(graph, source, 16))


def test_budget_gate_uses_the_upper_bound(tmp_path):
    model, calib = example_paths("digits-mlp")
    options = OptimizeOptions(Recipe((PassSpec.of("remove-dead"), PassSpec.of("fold-linear", {"linear_rate": 0.3}))),
                              labels="y", max_accuracy_drop=1.0, gate_on="all", latency=False, allow_larger=True)
    with pytest.raises(VerificationGateError, match="at its upper bound"):
        optimize(model, calib, options)


def test_input_shape_for_a_missing_input_is_a_usage_error(tmp_path):
    res = _run("optimize", "--example", "digits-mlp", "-o", tmp_path / "o.onnx", "--input-shape", "nope=1,64")
    assert res.exit_code == 2 and "--input-shape names input 'nope'" in res.output
