"""runtime/: sessions and their errors, feeds, latency measurement and interleaved comparisons."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_lincomp
from conftest import make_model, mlp_model, run, vinfo
from onnx_lincomp import model_io
from onnx_lincomp.calibration import CalibrationSource, input_specs
from onnx_lincomp.errors import CalibrationDataError, InvalidModelError, OptionError, UnsupportedModelError
from onnx_lincomp.model_io import model_from_proto
from onnx_lincomp.runtime.feeds import benchmark_feeds, fixed_batch, iterate_feeds
from onnx_lincomp.runtime.latency import (
    CompareOptions,
    Latency,
    LatencyOptions,
    RatioEstimate,
    compare_latency,
    measure,
    median_interval,
    pinned_options,
)
from onnx_lincomp.runtime.session import SessionOptions, SessionScope, open_session, ort_message, run_session

PACKAGE = Path(onnx_lincomp.__file__).parent


def _relu(shape=("N", 4)) -> onnx.ModelProto:
    relu = helper.make_node("Relu", ["x"], ["y"])
    return make_model([relu], [vinfo("x", list(shape))], [vinfo("y", list(shape))], [])


def test_only_runtime_session_creates_inference_sessions():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "InferenceSession(" in p.read_text() and p != PACKAGE / "runtime" / "session.py"]
    assert offenders == []


def test_session_options_reach_onnxruntime():
    so = SessionOptions(threads=2, inter_threads=1, spinning=False, optimize=False, log_level=4).to_ort()
    assert (so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level) == (2, 1, 4)
    assert so.graph_optimization_level.name == "ORT_DISABLE_ALL"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(OptionError):
        SessionOptions(threads=-1)
    assert pinned_options(0).threads == 1 and pinned_options(3).threads == 3


def test_open_session_from_proto_and_path(tmp_path, rng):
    model = mlp_model(rng, [5, 4, 3])
    x = rng.random((2, 5), dtype=np.float32)
    onnx.save(model, str(tmp_path / "m.onnx"))
    for source in (model, tmp_path / "m.onnx", str(tmp_path / "m.onnx")):
        (y,) = open_session(source).run(None, {"x": x})
        np.testing.assert_allclose(y, run(model, {"x": x})[0], rtol=1e-6)


def test_big_models_go_by_file_in_the_scope(monkeypatch, rng):
    monkeypatch.setattr(model_io, "PROTO_LIMIT_BYTES", 0)  # every model counts as big
    model = mlp_model(rng, [5, 4, 3])
    x = rng.random((2, 5), dtype=np.float32)
    with SessionScope() as scope:
        sess = scope.open(model)
        assert [p.name for p in scope.path.rglob("*.onnx")] == ["model.onnx"]
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-6)
        folder = scope.path
    assert not folder.exists()
    sess = open_session(model)  # no workdir: a temporary folder lives as long as the session
    assert Path(sess._lincomp_workdir.name, "model.onnx").exists()


def test_onnxruntime_messages_become_one_line():
    text = ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x for the following "
            "indices\n index: 1 Got: 5 Expected: 4\n Please fix either the inputs/outputs or the model.")
    assert ort_message(RuntimeError(text)) == ("Got invalid dimensions for input: x for the following indices; "
                                               "index: 1 Got: 5 Expected: 4")


def test_load_and_run_errors_are_typed():
    with pytest.raises(InvalidModelError, match="(?i)protobuf parsing failed"):
        open_session(Path(__file__))  # not a model
    foo = helper.make_node("Foo", ["x"], ["y"], domain="my.domain")
    custom = make_model([foo], [vinfo("x", [2])], [vinfo("y", [2])], [])
    custom.opset_import.append(helper.make_opsetid("my.domain", 1))
    with pytest.raises(UnsupportedModelError, match="not a registered function/op"):
        open_session(custom)
    sess = open_session(_relu((2, 4)))
    with pytest.raises(CalibrationDataError, match=r"index: 1 Got: 5 Expected: 4"):
        run_session(sess, None, {"x": np.zeros((2, 5), np.float32)}, "data.npz")


def test_feeds_move_keeps_old_imports_working():
    from onnx_lincomp.calibration.collector import fixed_batch as old_fixed
    from onnx_lincomp.calibration.collector import iterate_feeds as old_iterate

    assert old_fixed is fixed_batch and old_iterate is iterate_feeds


def test_iterate_feeds_accepts_input_specs_and_drops_partial_fixed_batches(rng):
    graph = model_from_proto(_relu((4, 3))).graph
    specs = input_specs(graph)
    source = CalibrationSource(specs, arrays={"x": rng.random((10, 3), dtype=np.float32)}, description="a")
    assert fixed_batch(specs) == 4
    sizes = [len(f["x"]) for f, _ in iterate_feeds(specs, source, 64)]
    assert sizes == [4, 4] == [len(f["x"]) for f, _ in iterate_feeds(graph, source, 64)]


def test_benchmark_feeds_fill_the_batch(rng):
    graph = model_from_proto(_relu()).graph
    source = CalibrationSource(input_specs(graph), arrays={"x": rng.random((3, 4), dtype=np.float32)}, description="a")
    feeds, used = benchmark_feeds(graph, source, 8, 1)
    assert used == 8 and feeds["x"].shape == (8, 4)
    feeds, used = benchmark_feeds(model_from_proto(_relu((2, 4))).graph, source, 8)
    assert used == 2 and feeds["x"].shape == (2, 4)


def test_measure_reports_compatible_figures(rng):
    sess = open_session(mlp_model(rng, [8, 8, 2]))
    lat = measure(sess, {"x": rng.random((1, 8), dtype=np.float32)}, LatencyOptions(runs=20, warmup=2, min_seconds=0.0))
    assert lat.runs == 20 and 0 < lat.median_ms <= lat.p90_ms and lat.iqr_ms >= 0
    assert {"median_ms", "p90_ms", "batch_size", "threads", "runs", "throughput_per_s"} <= set(lat.as_dict())


def test_old_latency_module_still_exports_its_names():
    from onnx_lincomp.runtime.latency import Latency as L
    from onnx_lincomp.runtime.latency import LatencyOptions, make_session, measure_latency, measure_session

    assert L is Latency and callable(make_session) and callable(measure_latency) and callable(measure_session)
    assert LatencyOptions().runs == 50


def test_median_interval_uses_binomial_order_statistics():
    # R = 21, 95%: P(Bin(21, 1/2) <= 5) = 0.013 <= 0.025 < P(<= 6) = 0.039, so the 6th and 16th values
    assert median_interval(np.arange(1.0, 22.0), 0.95) == (6.0, 16.0)
    assert median_interval([3.0, 1.0, 2.0], 0.95) == (1.0, 3.0)  # too few rounds: the whole range


def test_verdict_text():
    assert RatioEstimate(2.0, 1.9, 2.1, "slower", 0.05).verdict == "2.00× slower"
    assert RatioEstimate(0.5, 0.45, 0.55, "faster", 0.05).verdict == "2.00× faster"
    assert RatioEstimate(1.01, 0.99, 1.02, "no change", 0.05).verdict == "no change"


def test_same_model_twice_is_no_change(rng):
    model = mlp_model(rng, [64, 128, 10])
    feeds = {"x": rng.random((1, 64), dtype=np.float32)}
    sessions = [open_session(model, options=pinned_options(1)) for _ in range(2)]
    cmp = compare_latency(sessions, feeds, CompareOptions(round_ms=3.0))
    assert [r.change for r in cmp.ratios] == ["no change", "no change"]
    assert cmp.ratios[0].ratio == 1.0 and 0.5 < cmp.ratios[1].ratio < 2.0  # loose: timing goals live in benchmarks/
    assert len(cmp.latencies) == 2 and cmp.as_dict()["models"][1]["verdict"] == "no change"
