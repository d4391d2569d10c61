"""The onnxruntime-backed quantizers (quantize-int8, quantize-dynamic, quantize-weights-4bit) and their shared
helpers: structure (QDQ / MatMulInteger / MatMulNBits nodes, excluded nodes kept float), the full ONNX checker,
numerics against the float model in onnxruntime (bounded, the figure in the assertion message), the CLI's usage
errors (exit 2, nothing written), composition after the float passes, an already quantized model, and the
decline when the quantized graph is slower.

Timing is replaced by a fixed verdict (``fixed_latency``) except in the one test that measures it: the passes'
own decision logic is tested with both verdicts."""
import copy
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import cnn_model, init, make_model, mlp_model, run, vinfo
from onnx_lincomp.calibration.activations import CalibrationData
from onnx_lincomp.calibration.data_source import CalibrationSource, input_specs
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.cli import main
from onnx_lincomp.errors import OptionError, PassError
from onnx_lincomp.examples import example_paths
from onnx_lincomp.model_io import model_from_proto, to_model_proto
from onnx_lincomp.passes import PASSES, PassContext, QuantizeInt8, QuantizeInt8Options
from onnx_lincomp.pipeline import run_pipeline
from onnx_lincomp.recipe import PassSpec, Recipe
from onnx_lincomp.rewrite import ort_quantize
from onnx_lincomp.rewrite.ort_quantize import (
    FeedReader,
    LatencyCheck,
    Workspace,
    calibrate_ranges,
    export_context,
    export_float,
    gemm_to_matmul,
)
from onnx_lincomp.runtime.latency import RatioEstimate


def _verdict(change: str, ratio: float) -> LatencyCheck:
    return LatencyCheck(RatioEstimate(ratio, ratio * 0.98, ratio * 1.02, change, 0.05), 1, 1)


@pytest.fixture
def fixed_latency(monkeypatch):
    """Replace the timing by a verdict the test chooses (default: no change)."""
    state = {"check": _verdict("no change", 1.0)}
    monkeypatch.setattr("onnx_lincomp.passes.quantize_int8.latency_check", lambda *a, **k: state["check"])
    return state


def _data(loaded, x: np.ndarray, batch: int = 32) -> CalibrationData:
    specs = input_specs(loaded.graph)
    source = CalibrationSource(specs, arrays={specs[0].name: x})
    return CalibrationData(source, loaded.ctx, len(x), batch_size=batch)


def _quantize(model: onnx.ModelProto, x: np.ndarray, passes) -> tuple[onnx.ModelProto, list]:
    """Canonicalise, run ``passes`` ((name, options) pairs) with ``x`` as calibration data, export, check."""
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    records = run_pipeline(loaded.graph, tuple(PassSpec.of(n, o) for n, o in passes),
                           PassContext(None, _data(loaded, x)))
    out = to_model_proto(loaded.graph, export_context(loaded.ctx, loaded.graph))
    onnx.checker.check_model(out, full_check=True)
    return out, records


def _errors(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray, name: str) -> tuple[float, float]:
    """(top-1 agreement, largest error relative to the output scale) of ``b`` against ``a`` on ``x``."""
    ya, yb = run(a, {name: x})[0], run(b, {name: x})[0]
    return float((ya.argmax(1) == yb.argmax(1)).mean()), float(np.abs(ya - yb).max() / np.abs(ya).max())


def _example(name: str) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    model_path, calib = example_paths(name)
    d = np.load(calib)
    return onnx.load(model_path), d["input"], d["y"]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _weight_from_dequantize(model: onnx.ModelProto, node_name: str) -> bool:
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return node.input[1] in dq


# ---- quantize-int8 ------------------------------------------------------------------------------------------
def test_int8_bundled_cnn_is_qdq_checked_and_close(fixed_latency):
    model, x, y = _example("digits-cnn")
    out, records = _quantize(model, x, [("quantize-int8", {})])
    ops = _ops(out)
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 7
    assert all(_weight_from_dequantize(out, n) for n in ("conv1", "conv2", "fc"))
    agreement, rel = _errors(model, out, x, "input")
    acc_float = float((run(model, {"input": x})[0].argmax(1) == y).mean())
    acc_int8 = float((run(out, {"input": x})[0].argmax(1) == y).mean())
    assert agreement >= 0.98 and rel < 0.05, f"agreement {agreement:.4f}, relative error {rel:.4f}"
    assert acc_int8 >= acc_float - 0.01, f"accuracy {acc_float:.4f} -> {acc_int8:.4f}"
    res = records[-1].result
    assert res.changed and res.count("layers_quantized") == 3 and res.count("calibration_samples") == len(x)
    scales = [i for i in out.graph.initializer if i.name.endswith("_scale") and "conv1" in i.name.lower()]
    assert any(len(s.dims) == 1 and s.dims[0] == 8 for s in scales) or any(
        onnx.numpy_helper.to_array(s).size > 1 for s in out.graph.initializer if s.name.endswith("_scale"))


def test_int8_per_tensor_has_one_scale_per_weight(fixed_latency):
    model, x, _ = _example("digits-cnn")
    out, _ = _quantize(model, x[:64], [("quantize-int8", {"per_tensor": True})])
    scales = [onnx.numpy_helper.to_array(i) for i in out.graph.initializer if i.name.endswith("_scale")]
    assert scales and all(s.size == 1 for s in scales)


def test_int8_excluded_node_stays_float(fixed_latency):
    model, x, _ = _example("digits-cnn")
    out, records = _quantize(model, x[:128], [("quantize-int8", {"exclude": "conv2"})])
    assert not _weight_from_dequantize(out, "conv2")
    assert _weight_from_dequantize(out, "conv1") and _weight_from_dequantize(out, "fc")
    res = records[-1].result
    assert res.count("layers_excluded") == 1 and res.count("layers_quantized") == 2
    assert any("exclude" in why for why in res.skipped)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_int8_histogram_methods(fixed_latency, rng, method):
    model = cnn_model(rng)
    x = rng.random((96, 1, 6, 6), dtype=np.float32)
    out, records = _quantize(model, x, [("quantize-int8", {"calib_method": method})])
    agreement, rel = _errors(model, out, x, "x")
    assert rel < 0.15, f"{method}: relative error {rel:.4f}"
    assert f"{method} on 96 samples" in " ".join(records[-1].result.notes)


def test_int8_ranges_streamed_batch_by_batch_equal_whole_data(rng):
    """MinMax ranges collected one batch at a time are the min/max over all samples (the merge is exact)."""
    model = mlp_model(rng, [5, 7, 3])
    loaded = model_from_proto(model)
    x = rng.normal(size=(100, 5)).astype(np.float32)
    x[77, 2] = 40.0  # an outlier in a late batch
    with Workspace() as ws:
        path = ws.file("m.onnx")
        onnx.save(export_float(loaded.graph, loaded.ctx), str(path))
        from onnxruntime.quantization.calibrate import load_tensors_data

        ranges = load_tensors_data(calibrate_ranges(path, FeedReader(_data(loaded, x, batch=16), loaded.graph.inputs),
                                                    "minmax", ws))
    lo, hi = (np.asarray(v).reshape(-1)[0] for v in ranges["x"].range_value)
    assert float(lo) == pytest.approx(float(x.min())) and float(hi) == pytest.approx(40.0)


def test_kl_threshold_matches_onnxruntime(rng):
    """Our vectorised Entropy threshold is onnxruntime's ``get_entropy_threshold``, value for value."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector("entropy", False, 512, 128, 99.99, "same")
    collector.collect_value({"relu": np.maximum(rng.normal(size=5000), 0).astype(np.float32),
                             "heavy": rng.standard_t(3, size=5000).astype(np.float32)})
    for histogram in collector.histogram_dict.values():
        ours = ort_quantize.kl_threshold(histogram, 128)
        theirs = collector.get_entropy_threshold(histogram, 128)
        assert float(ours[0]) == float(theirs[0]) and float(ours[1]) == float(theirs[1])


def test_int8_declines_when_slower(fixed_latency):
    fixed_latency["check"] = _verdict("slower", 1.6)
    model, x, _ = _example("digits-cnn")
    out, records = _quantize(model, x[:64], [("quantize-int8", {})])
    assert "QuantizeLinear" not in _ops(out) and "DequantizeLinear" not in _ops(out)
    res = records[-1].result
    assert not res.changed and res.count("declined") == 1
    assert any("slower than FP32" in why and "--keep-slower" in why for why in res.skipped)
    kept, _ = _quantize(model, x[:64], [("quantize-int8", {"keep_slower": True})])
    assert "QuantizeLinear" in _ops(kept)


def test_int8_measures_latency_for_real():
    model, x, _ = _example("digits-cnn")
    _, records = _quantize(model, x[:64], [("quantize-int8", {"keep_slower": True})])
    note = next(n for n in records[-1].result.notes if "vs FP32 at batch 1" in n)
    assert "ratio" in note and "interval" in note


def test_int8_qoperator_format_is_allowed_with_a_warning(fixed_latency, caplog):
    model, x, _ = _example("digits-cnn")
    out, records = _quantize(model, x[:64], [("quantize-int8", {"quant_format": "qoperator"})])
    assert "QLinearConv" in _ops(out) and "DequantizeLinear" in _ops(out)
    assert any("slower than QDQ" in n for n in records[-1].result.notes)
    assert "slower than QDQ" in caplog.text


def test_int8_without_data_is_a_usage_error():
    model, _, _ = _example("digits-cnn")
    loaded = model_from_proto(model)
    with pytest.raises(OptionError, match="calibration data"):
        QuantizeInt8().plan(loaded.graph, PassContext())


@pytest.mark.parametrize("values, match", [({"calib_method": "kl"}, "unknown calibration method 'kl'"),
                                           ({"quant_format": "fp8"}, "quant_format"),
                                           ({"latency_batch": 0}, "latency_batch")])
def test_int8_option_errors(values, match):
    with pytest.raises(OptionError, match=match):
        PassSpec.of("quantize-int8", values)


def test_int8_options_parse_flags_and_recipes():
    o = QuantizeInt8Options(exclude="conv1, fc,", calib_method="Entropy")
    assert o.exclude == ("conv1", "fc") and o.calib_method == "entropy"
    spec = PassSpec.of("quantize-int8", o.to_mapping())
    assert spec.options == o
    assert PASSES["quantize-int8"].runs_last and PASSES["quantize-int8"].lossy


def test_quantize_must_run_last():
    with pytest.raises(OptionError, match="must run last"):
        Recipe((PassSpec.of("quantize-int8"), PassSpec.of("remove-dead")))


def _matmul_add_mlp(rng, lead: list, bias_lead: tuple) -> onnx.ModelProto:
    """x (``lead`` + [6]) -> MatMul+Add -> Relu -> MatMul+Add -> y; biases of shape ``bias_lead`` + [N]."""
    w1, w2 = rng.normal(0, 0.3, (6, 8)).astype(np.float32), rng.normal(0, 0.3, (8, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="add2")]
    inits = [init("w1", w1), init("w2", w2), init("b1", rng.normal(size=(*bias_lead, 8)).astype(np.float32)),
             init("b2", rng.normal(size=(*bias_lead, 3)).astype(np.float32))]
    return make_model(nodes, [vinfo("x", [*lead, 6])], [vinfo("y", [*lead, 3])], inits)


def test_int8_matmul_add_with_row_bias(fixed_latency, rng):
    """MatMul + Add(b[1, N]) (onnxruntime's pre-processing fuses it into a Gemm with a 2-D bias, on which its
    per-channel quantizer fails): quantized, close to float."""
    model = _matmul_add_mlp(rng, ["N"], (1,))
    x = rng.normal(size=(128, 6)).astype(np.float32)
    out, records = _quantize(model, x, [("quantize-int8", {})])
    assert records[-1].result.count("layers_quantized") == 2
    _, rel = _errors(model, out, x, "x")
    assert rel < 0.05, f"relative error {rel:.4f}"


def test_int8_bias_correction_of_a_3d_matmul_goes_into_its_quantized_bias(fixed_latency, rng):
    """A 3-D MatMul + Add stays unfused, its bias an 8-bit constant behind a DequantizeLinear: the correction is
    folded into that constant (no Add of its own, no parameter added) and lowers the output error."""
    model = _matmul_add_mlp(rng, ["N", 5], ())
    x = (rng.random((256, 5, 6)) + 0.5).astype(np.float32)  # a mean far from 0: a visible correction
    errors = {}
    for correct in (True, False):
        out, records = _quantize(model, x, [("quantize-int8", {"bias_correction": correct})])
        assert not any("bias_correction" in n.name for n in out.graph.node)
        assert sum(n.op_type == "Add" for n in out.graph.node) == 2
        errors[correct] = float(np.abs(run(out, {"x": x})[0] - run(model, {"x": x})[0]).mean())
    assert errors[True] < errors[False]


@pytest.mark.parametrize("bias_shape,attrs", [((), {"beta": 0.5}), ((1, 1), {}), ((1,), {"alpha": 2.0})])
def test_int8_gemm_with_a_broadcast_bias(fixed_latency, rng, bias_shape, attrs):
    """A Gemm bias that broadcasts along rows (a scalar, (1,), (1, 1)) and beta != 1: onnxruntime's per-channel
    quantizer indexes the bias per output channel, so the bias becomes a vector of N with beta folded in."""
    w1 = rng.normal(0, 0.3, (6, 8)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="gemm1", **attrs),
             helper.make_node("Relu", ["g1"], ["y"], name="relu1")]
    inits = [init("w1", w1), init("b1", rng.normal(size=bias_shape).astype(np.float32))]
    model = make_model(nodes, [vinfo("x", ["N", 6])], [vinfo("y", ["N", 8])], inits)
    x = rng.normal(size=(128, 6)).astype(np.float32)
    out, records = _quantize(model, x, [("quantize-int8", {})])
    assert records[-1].result.count("layers_quantized") == 1
    ya, yb = run(model, {"x": x})[0], run(out, {"x": x})[0]
    assert np.abs(ya - yb).max() < 0.05 * np.abs(ya).max()


def test_int8_opset_below_13_is_raised_for_per_channel(fixed_latency, rng):
    model = cnn_model(rng)
    model.opset_import[0].version = 11
    model.ir_version = 6
    x = rng.random((64, 1, 6, 6), dtype=np.float32)
    out, _ = _quantize(model, x, [("quantize-int8", {})])
    assert out.opset_import[0].version == 13 and out.ir_version >= 7
    agreement, rel = _errors(model, out, x, "x")
    assert rel < 0.1, f"relative error {rel:.4f}"


def test_already_quantized_model_is_skipped_with_a_reason(fixed_latency):
    model, x, _ = _example("digits-cnn")
    once, _ = _quantize(model, x[:64], [("quantize-int8", {})])
    twice, records = _quantize(once, x[:64], [("remove-dead", {}), ("fold-linear", {}), ("quantize-int8", {}),
                                               ])
    q = next(r for r in records if r.result.name == "quantize-int8").result
    assert not q.changed
    assert any("quantized already" in why for why in q.skipped)
    assert _ops(twice).count("QuantizeLinear") == _ops(once).count("QuantizeLinear")
    for name in ("quantize-dynamic", "quantize-weights-4bit"):
        _, recs = _quantize(once, x[:64], [(name, {})])
        assert any("quantized already" in why for why in recs[-1].result.skipped)


# ---- CLI ----------------------------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_unknown_exclude_name_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "q.onnx"
    r = _cli("optimize", "--example", "digits-cnn", "--passes", "quantize-int8", "--exclude", "conv1,nosuchnode",
             "-o", out, "--no-latency")
    assert r.exit_code == 2, r.output
    assert "nosuchnode" in r.output and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_unknown_calib_method_exits_2(tmp_path):
    out = tmp_path / "q.onnx"
    r = _cli("optimize", "--example", "digits-cnn", "--passes", "quantize-int8", "--calib-method", "kl", "-o", out)
    assert r.exit_code == 2, r.output
    assert "unknown calibration method 'kl'" in r.output and not out.exists()


def test_cli_quantize_flag_without_the_pass_is_a_usage_error(tmp_path):
    r = _cli("optimize", "--example", "digits-cnn", "--passes", "remove-dead", "--calib-method", "entropy",
             "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "quantize-int8" in r.output


def test_cli_composition_runs_quantize_last_with_per_pass_report(fixed_latency, tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    r = _cli("optimize", "--example", "digits-cnn", "--passes", "remove-dead,fold-linear,prune-channels,quantize-int8",
             "--sparsity", "0.25", "--json", report, "-o", out, "--no-latency", "--allow-larger")
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    names = [p["name"] for p in data["passes"]]
    assert names[-1] == "quantize-int8" and names[:3] == ["remove-dead", "fold-linear", "prune-channels"]
    prune, quant = data["passes"][2], data["passes"][-1]
    assert prune["params_after"] < prune["params_before"]
    assert quant["changed"] and quant["before"]["params"] == prune["after"]["params"]
    assert quant["counts"]["layers_quantized"] == 3
    saved = onnx.load(out)
    onnx.checker.check_model(saved, full_check=True)
    assert "QuantizeLinear" in _ops(saved)
    assert data["recipe"]["passes"][-1]["name"] == "quantize-int8"


def test_cli_already_quantized_model_gets_a_clear_message(fixed_latency, tmp_path):
    model, x, y = _example("digits-cnn")
    once, _ = _quantize(model, x[:64], [("quantize-int8", {})])
    path, calib = tmp_path / "int8.onnx", tmp_path / "c.npz"
    onnx.save(once, path)
    np.savez(calib, input=x, y=y)
    report = tmp_path / "r.json"
    r = _cli("optimize", path, "--calib", calib, "--labels", "y", "--passes", "remove-dead,fold-linear,quantize-int8",
             "-o", tmp_path / "again.onnx", "--json", report, "--no-latency", "--allow-larger")
    assert r.exit_code == 0, r.output
    quant = next(p for p in json.loads(report.read_text())["passes"] if p["name"] == "quantize-int8")
    assert not quant["changed"] and any("quantized already" in why for why in quant["skipped"])


# ---- quantize-dynamic ---------------------------------------------------------------------------------------
def test_dynamic_mlp_uses_integer_matmuls(fixed_latency):
    model, x, _ = _example("digits-mlp")
    out, records = _quantize(model, x, [("quantize-dynamic", {})])
    ops = _ops(out)
    assert "Gemm" not in ops and ops.count("MatMulInteger") == 3 and "DynamicQuantizeLinear" in ops
    agreement, rel = _errors(model, out, x, "input")
    assert agreement >= 0.98 and rel < 0.05, f"agreement {agreement:.4f}, relative error {rel:.4f}"
    assert records[-1].result.count("layers_quantized") == 3


def test_dynamic_weight_scales_are_quantization_parameters(fixed_latency):
    """The weight scale onnxruntime's dynamic quantizer multiplies with the input's scale is no parameter: with
    it counted, every kept result had more parameters than its input and the not-worse gate refused it."""
    from onnx_lincomp.analysis.model_report import model_report

    model, x, _ = _example("digits-mlp")
    out, _ = _quantize(model, x, [("quantize-dynamic", {})])
    before, after = model_report(model), model_report(out)
    assert after.params == before.params
    assert after.quant_params >= 6  # per layer: the weight's zero point and its scale


def test_dynamic_leaves_conv_float_unless_asked(fixed_latency, rng):
    model = cnn_model(rng)
    x = rng.random((32, 1, 6, 6), dtype=np.float32)
    out, _ = _quantize(model, x, [("quantize-dynamic", {})])
    assert "ConvInteger" not in _ops(out) and "Conv" in _ops(out) and "MatMulInteger" in _ops(out)
    conv, _ = _quantize(model, x, [("quantize-dynamic", {"op_types": "Conv,MatMul"})])
    assert _ops(conv).count("ConvInteger") == 2 and "MatMulInteger" not in _ops(conv)  # Gemm not asked for


def test_dynamic_exclude_keeps_the_layer_float(fixed_latency):
    model, x, _ = _example("digits-mlp")
    names = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    out, _ = _quantize(model, x[:64], [("quantize-dynamic", {"exclude": names[-1]})])
    assert _ops(out).count("MatMulInteger") == 2
    last = [n for n in out.graph.node if n.name.startswith(names[-1])]
    assert last and all(n.op_type in ("Gemm", "MatMul", "Add") for n in last)  # float (onnxruntime's MatMul+Add)


def test_dynamic_runs_without_calibration_data():
    """Dynamic quantization needs no data; the latency check then runs on random inputs of the model's shape."""
    model, x, _ = _example("digits-mlp")
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    records = run_pipeline(loaded.graph, (PassSpec.of("quantize-dynamic", {"keep_slower": True}),), PassContext())
    out = to_model_proto(loaded.graph, export_context(loaded.ctx, loaded.graph))
    onnx.checker.check_model(out, full_check=True)
    assert _ops(out).count("MatMulInteger") == 3
    assert any("vs FP32 at batch 1" in n for n in records[-1].result.notes)


def test_dynamic_option_errors():
    with pytest.raises(OptionError, match="op_types"):
        PassSpec.of("quantize-dynamic", {"op_types": "Relu"})


# ---- quantize-weights-4bit ----------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["rtn", "hqq", "gptq"])
def test_4bit_mlp_matmulnbits(fixed_latency, algorithm):
    for module in {"rtn": ["onnx_ir"], "hqq": ["onnx_ir", "torch"], "gptq": []}[algorithm]:
        pytest.importorskip(module)  # onnxruntime's MatMulNBits quantizer imports onnx_ir; its HQQ computes in torch
    model, x, y = _example("digits-mlp")
    out, records = _quantize(model, x, [("quantize-weights-4bit", {"algorithm": algorithm})])
    assert _ops(out).count("MatMulNBits") == 3 and "Gemm" not in _ops(out)
    agreement, rel = _errors(model, out, x, "input")
    acc = float((run(out, {"input": x})[0].argmax(1) == y).mean())
    acc_float = float((run(model, {"input": x})[0].argmax(1) == y).mean())
    assert rel < 0.15 and acc >= acc_float - 0.03, (f"{algorithm}: relative error {rel:.4f}, agreement "
                                                    f"{agreement:.4f}, accuracy {acc_float:.4f} -> {acc:.4f}")
    assert out.ByteSize() < model.ByteSize() / 3
    assert records[-1].result.count("layers_quantized") == 3


def test_4bit_gptq_beats_round_to_nearest(fixed_latency):
    """GPTQ spreads each row's rounding error through the input Hessian: the layer outputs move less than with
    plain rounding on the same blocks (onnxruntime's own numpy GPTQ core returns round-to-nearest codes)."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(2000, 96)) @ rng.normal(0, 0.3, (96, 96))).astype(np.float32)
    w = rng.normal(size=(96, 12)).astype(np.float32)
    h = x.T.astype(np.float64) @ x / len(x)
    codes, scales, zeros = ort_quantize.gptq_codes(w, h, 32)
    deq = np.repeat(scales, 32, axis=0) * (codes.astype(np.float64) - np.repeat(zeros, 32, axis=0))
    ours = float(np.mean((x @ (w - deq[:96])) ** 2))
    rtn = float(np.mean((x @ (w - gptq(w.copy(), h.copy(), 4, 32, "asym"))) ** 2))
    assert ours < 0.7 * rtn, f"GPTQ output error {ours:.4f} vs round-to-nearest {rtn:.4f}"


@pytest.mark.parametrize("k, block, symmetric", [(96, 32, False), (100, 16, True), (40, 64, False)])
def test_matmul_nbits_packing_decodes_in_onnxruntime(rng, k, block, symmetric):
    """Our MatMulNBits layout (codes two a byte, zero points per row) decodes in onnxruntime to the same weights."""
    w = rng.normal(size=(k, 7)).astype(np.float32)
    x = rng.normal(size=(300, k)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vinfo("x", ["N", k])],
                       [vinfo("y", ["N", 7])], [init("w", w)])
    h = x.T.astype(np.float64) @ x / len(x)
    assert ort_quantize.gptq_matmul_nbits(model, {"mm": h}, block, symmetric) == 1
    onnx.checker.check_model(model, full_check=True)
    codes, scales, zeros = ort_quantize.gptq_codes(w, h, block, symmetric)
    deq = np.repeat(scales, block, axis=0) * (codes.astype(np.float64) - np.repeat(zeros, block, axis=0))
    np.testing.assert_allclose(run(model, {"x": x})[0], x @ deq[:k], rtol=1e-4, atol=1e-4)


def test_4bit_gptq_needs_data_and_rtn_does_not():
    model, _, _ = _example("digits-mlp")
    loaded = model_from_proto(model)
    with pytest.raises(OptionError, match="calibration data"):
        PASSES["quantize-weights-4bit"](PassSpec.of("quantize-weights-4bit", {"algorithm": "gptq"}).options).plan(
            loaded.graph, PassContext())
    plan = PASSES["quantize-weights-4bit"]().plan(loaded.graph, PassContext())
    assert len(plan.matches) == 3


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_4bit_exclude_keeps_the_layer_float(fixed_latency, algorithm):
    if algorithm == "rtn":
        pytest.importorskip("onnx_ir")
    model, x, _ = _example("digits-mlp")
    first = next(n.name for n in model.graph.node if n.op_type == "Gemm")
    out, _ = _quantize(model, x[:128], [("quantize-weights-4bit", {"algorithm": algorithm, "exclude": first})])
    assert _ops(out).count("MatMulNBits") == 2
    assert any(n.name == first and n.op_type == "Gemm" for n in out.graph.node)


def test_4bit_hqq_without_torch_says_what_is_missing():
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here")
    model, _, _ = _example("digits-mlp")
    x = np.load(example_paths("digits-mlp")[1])["input"][:32]
    with pytest.raises(PassError, match="PyTorch") as info:
        _quantize(model, x, [("quantize-weights-4bit", {"algorithm": "hqq"})])
    assert info.value.exit_code == 2


@pytest.mark.parametrize("values, match", [({"block_size": 48}, "block_size"), ({"algorithm": "awq"}, "awq"),
                                           ({"accuracy_level": 7}, "accuracy_level")])
def test_4bit_option_errors(values, match):
    with pytest.raises(OptionError, match=match):
        PassSpec.of("quantize-weights-4bit", values)


# ---- helpers: Gemm -> MatMul, the feed reader ----------------------------------------------------------------
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_to_matmul_is_exact(rng, trans_b, alpha, beta, bias):
    w = rng.normal(size=(3, 5) if trans_b else (5, 3)).astype(np.float32)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", rng.normal(size=3).astype(np.float32))] if bias else [])
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([node], [vinfo("x", ["N", 5])], [vinfo("y", ["N", 3])], inits)
    loaded = model_from_proto(model)
    assert gemm_to_matmul(loaded.graph).rewritten == 1
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    assert _ops(out) == (["MatMul", "Add"] if bias else ["MatMul"]) and out.graph.node[0].name == "fc"
    x = rng.normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_gemm_to_matmul_skips_shared_weight_and_trans_a(rng):
    w = rng.normal(size=(4, 4)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="a", transB=1),
             helper.make_node("Gemm", ["h", "w"], ["y"], name="b", transB=1),
             helper.make_node("Gemm", ["y", "v"], ["z"], name="c", transA=1)]
    model = make_model(nodes, [vinfo("x", [4, 4])], [vinfo("z", [4, 4])], [init("w", w), init("v", w.copy())])
    loaded = model_from_proto(model)
    result = gemm_to_matmul(loaded.graph)
    assert result.rewritten == 0 and sum(result.skipped.values()) == 3


def test_feed_reader_batches_ranges_and_copies(rng):
    model = mlp_model(rng, [5, 4, 2])
    loaded = model_from_proto(model)
    x = rng.random((70, 5), dtype=np.float32)
    reader = FeedReader(_data(loaded, x, batch=32), loaded.graph.inputs)
    assert len(reader) == 3
    sizes = [len(f["x"]) for f in iter(reader.get_next, None)]
    assert sizes == [32, 32, 6]
    reader.set_range(1, 2)
    only = reader.get_next()
    np.testing.assert_array_equal(only["x"], x[32:64])
    assert reader.get_next() is None
    clone = copy.deepcopy(reader)
    np.testing.assert_array_equal(next(iter(clone))["x"], x[32:64])


def test_feed_reader_fixed_batch_model(rng):
    w = rng.normal(size=(4, 3)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vinfo("x", [1, 4])],
                       [vinfo("y", [1, 3])], [init("w", w)])
    loaded = model_from_proto(model)
    reader = FeedReader(_data(loaded, rng.random((5, 4), dtype=np.float32)), loaded.graph.inputs)
    assert len(reader) == 5 and all(f["x"].shape == (1, 4) for f in reader)


def test_onnxruntime_chatter_is_kept_off_stdout(capsys, rng):
    model = cnn_model(rng)
    loaded = model_from_proto(model)
    x = rng.random((16, 1, 6, 6), dtype=np.float32)
    with Workspace() as ws:
        path = ws.file("m.onnx")
        onnx.save(export_float(loaded.graph, loaded.ctx), str(path))
        calibrate_ranges(path, FeedReader(_data(loaded, x), loaded.graph.inputs), "percentile", ws)
    assert capsys.readouterr().out == ""


def test_already_quantized_detects_integer_ops(rng):
    loaded = model_from_proto(mlp_model(rng, [4, 3, 2]))
    assert ort_quantize.already_quantized(loaded.graph) is None
    loaded.graph.nodes[0].op = "MatMulInteger"
    assert "MatMulInteger" in ort_quantize.already_quantized(loaded.graph)


def test_float16_model_is_skipped_with_a_reason(tmp_path, rng):
    """onnxruntime's quantizers read float32: on float16 weights they quantized at run time and grew the file."""
    f16 = onnx.TensorProto.FLOAT16
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm", transB=1),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    inits = [init("w", rng.normal(size=(8, 6)).astype(np.float16)), init("b", rng.normal(size=8).astype(np.float16))]
    model = make_model(nodes, [vinfo("x", ["N", 6], f16)], [vinfo("y", ["N", 8], f16)], inits)
    onnx.save(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["optimize", str(tmp_path / "m.onnx"), "--calib", "random:32", "-o",
                                    str(tmp_path / "o.onnx"), "--passes", "quantize-int8", "--no-latency"])
    assert res.exit_code == 0, res.output
    assert "float16 weights: onnxruntime's quantizers take float32 models" in res.output
    ops = {n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
