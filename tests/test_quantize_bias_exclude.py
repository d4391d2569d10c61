"""Bias correction after quantize-int8 (QDQ) and quantize-weights-4bit (MatMulNBits), the automatic exclusion of
the layers most sensitive to INT8, and ``bits --method int``.

Bias correction is judged where it matters: inputs with a large non-zero mean, so that the weight rounding
error ``W - W_q`` moves the mean output by ``(W - W_q) E[x]``. Each test quantizes the same model with the
correction off and on, checks the full ONNX checker, the structure (a bias or Add created where there was none)
and, in onnxruntime against the float model, that the mean output shift on the calibration data shrinks (the
figures are in the assertion messages)."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import init, make_model, run, vinfo
from onnx_lincomp.bits import BitsOptions, int_rounded
from onnx_lincomp.calibration.activations import CalibrationData
from onnx_lincomp.calibration.data_source import CalibrationSource, input_specs
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.cli import main
from onnx_lincomp.errors import OptionError
from onnx_lincomp.model_io import model_from_proto, to_model_proto
from onnx_lincomp.passes import PassContext, QuantizeInt8Options
from onnx_lincomp.pipeline import run_pipeline
from onnx_lincomp.recipe import PassSpec
from onnx_lincomp.rewrite.ort_quantize import export_context, gptq_codes, matmul_nbits
from onnx_lincomp.rewrite.quant_bias_correction import nbits_weight
from test_quantize import _verdict

OPSET = 17


@pytest.fixture
def fixed_latency(monkeypatch):
    monkeypatch.setattr("onnx_lincomp.passes.quantize_int8.latency_check", lambda *a, **k: _verdict("no change", 1.0))


def _quantize(model: onnx.ModelProto, x: np.ndarray, name: str, options: dict,
              labels: np.ndarray | None = None) -> tuple[onnx.ModelProto, object]:
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    specs = input_specs(loaded.graph)
    arrays = {specs[0].name: x} | ({"y": labels} if labels is not None else {})
    source = CalibrationSource(specs, arrays=arrays, labels="y" if labels is not None else None)
    data = CalibrationData(source, loaded.ctx, len(x), batch_size=64)
    records = run_pipeline(loaded.graph, (PassSpec.of(name, options),), PassContext(None, data))
    out = to_model_proto(loaded.graph, export_context(loaded.ctx, loaded.graph))
    onnx.checker.check_model(out, full_check=True)
    return out, records[-1].result


def _mean_shift(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> float:
    """Mean over output channels of |E[y_b - y_a]| (a Conv's expectation also over positions, as corrected)."""
    ya, yb = run(a, {"x": x})[0], run(b, {"x": x})[0]
    axes = (0, 2, 3) if ya.ndim == 4 else (0,)
    return float(np.abs((yb - ya).mean(axis=axes)).mean())


def _weight(rng: np.random.Generator, out: int, cols: int) -> np.ndarray:
    """Weights with one outlier per output channel: a coarse per-channel grid, a visible rounding error."""
    w = rng.normal(0, 0.05, (out, cols))
    w[np.arange(out), rng.integers(0, cols, out)] = 1.0
    return w.astype(np.float32)


def _dense(rng, kind: str, bias: bool) -> onnx.ModelProto:
    """One dense layer 24 -> 6 as Gemm (transB 0/1, alpha 0.5) or MatMul, bias or not."""
    w = _weight(rng, 6, 24)
    b = rng.normal(0, 0.1, 6).astype(np.float32)
    inits = [init("b", b)] if bias else []
    if kind == "matmul":
        inits.append(init("w", w.T))
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m" if bias else "y"], name="mm")]
        if bias:
            nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="add"))
    else:
        trans_b = int(kind == "gemm_t")
        inits.append(init("w", w if trans_b else w.T * 2))
        nodes = [helper.make_node("Gemm", ["x", "w"] + (["b"] if bias else []), ["y"], name="fc", transB=trans_b,
                                  alpha=1.0 if trans_b else 0.5)]
    return make_model(nodes, [vinfo("x", ["N", 24])], [vinfo("y", ["N", 6])], inits, OPSET)


def _conv(rng, bias: bool) -> onnx.ModelProto:
    w = _weight(rng, 5, 3 * 9).reshape(5, 3, 3, 3)
    inits = [init("w", w)] + ([init("b", rng.normal(0, 0.1, 5).astype(np.float32))] if bias else [])
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], name="conv", pads=[1, 1, 1, 1])
    return make_model([node], [vinfo("x", ["N", 3, 6, 6])], [vinfo("y", ["N", 5, 6, 6])], inits, OPSET)


# ---- quantize-int8 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,bias", [("gemm_t", True), ("gemm_t", False), ("gemm", True), ("matmul", False),
                                       ("matmul", True), ("conv", True), ("conv", False)])
def test_int8_bias_correction_shrinks_the_mean_output_shift(fixed_latency, rng, kind, bias):
    model = _conv(rng, bias) if kind == "conv" else _dense(rng, kind, bias)
    shape = (256, 3, 6, 6) if kind == "conv" else (256, 24)
    x = (4.0 + rng.normal(0, 0.5, shape)).astype(np.float32)  # a non-zero mean: the case the correction is for
    plain, _ = _quantize(model, x, "quantize-int8", {"bias_correction": False, "per_tensor": True})
    fixed, result = _quantize(model, x, "quantize-int8", {"per_tensor": True})
    before, after = _mean_shift(model, plain, x), _mean_shift(model, fixed, x)
    assert after < 0.5 * before, f"{kind} bias={bias}: mean output shift {before:.5f} -> {after:.5f}"
    assert any("folded into 1 layer" in n for n in result.notes), result.notes
    ops_plain = [n.op_type for n in plain.graph.node]
    ops_fixed = [n.op_type for n in fixed.graph.node]
    if kind == "matmul" and not bias:  # a float Add on the MatMul's output
        assert ops_fixed.count("Add") == ops_plain.count("Add") + 1
    elif not bias:  # an int32 bias through a DequantizeLinear, on the scale s_x s_w
        assert ops_fixed.count("DequantizeLinear") == ops_plain.count("DequantizeLinear") + 1
        dq = next(n for n in fixed.graph.node if n.op_type == "DequantizeLinear" and "bias_correction" in n.name)
        q = next(t for t in fixed.graph.initializer if t.name == dq.input[0])
        assert q.data_type == onnx.TensorProto.INT32
    else:
        assert sorted(ops_fixed) == sorted(ops_plain)


def test_int8_bias_correction_keeps_per_channel_results_close(fixed_latency, rng):
    """Default per-channel weights: the correction never makes the mean shift worse, and outputs stay close."""
    model = _conv(rng, True)
    x = (2.0 + rng.normal(0, 1.0, (192, 3, 6, 6))).astype(np.float32)
    plain, _ = _quantize(model, x, "quantize-int8", {"bias_correction": False})
    fixed, _ = _quantize(model, x, "quantize-int8", {})
    before, after = _mean_shift(model, plain, x), _mean_shift(model, fixed, x)
    assert after <= before * 1.05, f"mean output shift {before:.5f} -> {after:.5f}"
    ya, yb = run(model, {"x": x})[0], run(fixed, {"x": x})[0]
    rel = float(np.abs(ya - yb).max() / np.abs(ya).max())
    assert rel < 0.05, f"relative error {rel:.4f}"


# ---- quantize-weights-4bit ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
@pytest.mark.parametrize("kind,bias", [("gemm_t", True), ("matmul", False)])
def test_4bit_bias_correction_shrinks_the_mean_output_shift(fixed_latency, rng, algorithm, kind, bias):
    w = _weight(rng, 8, 64)
    inits = [init("w", w)] + ([init("b", np.zeros(8, np.float32))] if bias else [])
    if kind == "matmul":
        inits[0] = init("w", w.T)
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    else:
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)
    model = make_model([node], [vinfo("x", ["N", 64])], [vinfo("y", ["N", 8])], inits, OPSET)
    x = (3.0 + rng.normal(0, 0.5, (256, 64))).astype(np.float32)
    opts = {"algorithm": algorithm, "block_size": 32, "keep_slower": True}
    plain, _ = _quantize(model, x, "quantize-weights-4bit", dict(opts, bias_correction=False))
    fixed, result = _quantize(model, x, "quantize-weights-4bit", opts)
    before, after = _mean_shift(model, plain, x), _mean_shift(model, fixed, x)
    assert after < 0.2 * before, f"{algorithm} {kind}: mean output shift {before:.5f} -> {after:.5f}"
    nbits = next(n for n in fixed.graph.node if n.op_type == "MatMulNBits")
    if bias:  # the Gemm's bias Add (from the exact Gemm -> MatMul + Add rewrite) took the shift
        assert any(n.op_type == "Add" for n in fixed.graph.node) and (len(nbits.input) < 6 or not nbits.input[5])
    else:  # MatMulNBits' own optional bias input
        assert len(nbits.input) == 6 and nbits.input[5]
    assert any("folded into 1 layer" in n for n in result.notes), result.notes


def test_4bit_rtn_without_data_says_there_is_no_correction(fixed_latency, rng):
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vinfo("x", [4, 64])],
                       [vinfo("y", [4, 8])], [init("w", _weight(rng, 8, 64).T)], OPSET)
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    records = run_pipeline(loaded.graph, (PassSpec.of("quantize-weights-4bit", {"keep_slower": True}),),
                           PassContext())
    assert any("no bias correction" in n for n in records[-1].result.notes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_nbits_weight_reads_the_blocks_onnxruntime_decodes(rng, symmetric):
    """``W_q`` read by running MatMulNBits on the identity equals the decode of the codes we wrote."""
    w = rng.normal(size=(48, 5)).astype(np.float32)
    codes, scales, zeros = gptq_codes(w, np.eye(48), 16, symmetric)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    new, inits = matmul_nbits(node, codes, scales, None if symmetric else zeros, 48, 16, np.float32)
    model = make_model([new], [vinfo("x", [None, 48])], [vinfo("y", [None, 5])], inits, OPSET)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    rows = np.repeat(np.arange(3), 16)
    expected = scales[rows] * (codes[:48].astype(np.float64) - (8 if symmetric else zeros[rows]))
    np.testing.assert_allclose(nbits_weight(model, new), expected, rtol=1e-6, atol=1e-6)


# ---- automatic exclusion of sensitive layers -----------------------------------------------------------------------
def _fragile_mlp(rng) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """fc0 reads small informative features next to one huge, nearly ignored feature: uint8 quantization of fc0's
    input (one range for the whole tensor) wipes the informative ones out. fc1 is harmless. Labels are the float
    model's own predictions."""
    w0 = rng.normal(0, 1.0, (16, 8)).astype(np.float32)
    w0[:, 7] = 1e-5
    w1 = rng.normal(0, 1.0, (4, 16)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], name="fc0", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w1", "b1"], ["y"], name="fc1", transB=1)]
    model = make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 4])],
                       [init("w0", w0), init("b0", np.zeros(16, np.float32)), init("w1", w1),
                        init("b1", np.zeros(4, np.float32))], OPSET)
    x = rng.normal(0, 0.05, (400, 8)).astype(np.float32)
    x[:, 7] = rng.uniform(0, 500, 400)
    labels = run(model, {"x": x})[0].argmax(1).astype(np.int64)
    return model, x, labels


def _float_weight(model: onnx.ModelProto, node_name: str) -> bool:
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return next(n for n in model.graph.node if n.name == node_name).input[1] not in dq


def test_int8_auto_exclusion_keeps_the_sensitive_layer_float(fixed_latency, rng):
    model, x, labels = _fragile_mlp(rng)
    plain, _ = _quantize(model, x, "quantize-int8", {}, labels)
    acc_plain = float((run(plain, {"x": x})[0].argmax(1) == labels).mean())
    out, result = _quantize(model, x, "quantize-int8", {"exclude_sensitive": "auto", "max_drop": 2.0}, labels)
    acc = float((run(out, {"x": x})[0].argmax(1) == labels).mean())
    assert acc_plain < 0.9 and acc >= 0.98, f"accuracy plain INT8 {acc_plain:.3f}, with exclusion {acc:.3f}"
    assert _float_weight(out, "fc0") and not _float_weight(out, "fc1")
    assert result.count("layers_excluded_sensitive") == 1 and result.count("layers_quantized") == 1
    notes = " ".join(result.notes)
    assert "kept float as the most sensitive: fc0" in notes and "within the budget 2" in notes, notes


def test_int8_exclude_a_fixed_count_and_a_loose_budget(fixed_latency, rng):
    model, x, labels = _fragile_mlp(rng)
    out, result = _quantize(model, x, "quantize-int8", {"exclude_sensitive": 1}, labels)
    assert _float_weight(out, "fc0") and result.count("layers_excluded_sensitive") == 1
    out, result = _quantize(model, x, "quantize-int8", {"exclude_sensitive": "auto", "max_drop": 100.0}, labels)
    assert not _float_weight(out, "fc0") and result.count("layers_excluded_sensitive") == 0
    assert any("no layer kept float" in n for n in result.notes)


def test_int8_exclusion_without_labels_ranks_by_output_error(fixed_latency, rng):
    """No labels: a count keeps float the layers whose INT8 moves the outputs most; 'auto' (an accuracy budget)
    still needs labels."""
    model, x, _ = _fragile_mlp(rng)
    plain, _ = _quantize(model, x, "quantize-int8", {})
    out, result = _quantize(model, x, "quantize-int8", {"exclude_sensitive": 1})
    assert _float_weight(out, "fc0") and not _float_weight(out, "fc1")
    ref = run(model, {"x": x})[0]
    assert np.abs(run(out, {"x": x})[0] - ref).mean() < 0.5 * np.abs(run(plain, {"x": x})[0] - ref).mean()
    notes = " ".join(result.notes)
    assert "mean abs output error with one layer alone in INT8" in notes and "most sensitive: fc0" in notes
    with pytest.raises(Exception, match="needs labels"):
        _quantize(model, x, "quantize-int8", {"exclude_sensitive": "auto", "max_drop": 1.0})


@pytest.mark.parametrize("values,match", [({"exclude_sensitive": "most"}, "count >= 0 or 'auto'"),
                                          ({"exclude_sensitive": -1}, "count >= 0 or 'auto'"),
                                          ({"exclude_sensitive": "auto"}, "needs the budget max_drop"),
                                          ({"exclude_sensitive": "auto", "max_drop": -1.0}, "max_drop must be >= 0"),
                                          ({"max_drop": 1.0}, "spent by exclude_sensitive 'auto'"),
                                          ({"exclude_sensitive": 2, "max_drop": 1.0}, "spent by exclude_sensitive")])
def test_int8_exclusion_option_errors(values, match):
    with pytest.raises(OptionError, match=match):
        QuantizeInt8Options(**values)


# ---- bits --method int ----------------------------------------------------------------------------------------------
def test_int_rounding_error_shrinks_with_bits(rng):
    w = rng.normal(size=(6, 40))
    err = {b: float(np.abs(int_rounded(w, b) - w).max() / np.abs(w).max()) for b in (8, 4, 2)}
    assert err[8] < 0.005 < err[4] < err[2], err
    for b in (8, 4, 2):  # a symmetric grid: at most 2^b - 1 values per channel, zero rows stay zero
        assert all(len(np.unique(row)) <= 2 ** b - 1 for row in int_rounded(w, b))
    assert not np.any(int_rounded(np.zeros((2, 3)), 4))


def test_bits_method_int_scan_csv_and_json(tmp_path):
    csv_path, json_path = tmp_path / "int.csv", tmp_path / "int.json"
    res = CliRunner().invoke(main, ["bits", "--example", "digits-mlp", "--method", "int", "--bits", "8,2",
                                    "--csv", str(csv_path), "--json", str(json_path)])
    assert res.exit_code == 0, res.output
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("layer,kind,weights,bits,float_bytes,shared_bytes,accuracy,drop_points")
    report = json.loads(json_path.read_text())
    assert report["method"] == "int"
    rows = {(r["layer"], r["bits"]): r for r in report["rows"]}
    assert len(rows) == 6 and len(lines) == 7
    for layer in ("fc0", "fc1", "fc2"):
        assert rows[(layer, 8)]["rel_max"] < 0.01, rows[(layer, 8)]
        assert rows[(layer, 2)]["rel_max"] > 5 * rows[(layer, 8)]["rel_max"]
        assert rows[(layer, 2)]["shared_bytes"] < rows[(layer, 8)]["shared_bytes"] < rows[(layer, 8)]["float_bytes"]


@pytest.mark.parametrize("args,match", [(["--method", "ints"], "Invalid value for '--method'"),
                                        (["--method", "int", "--bits", "4,1"], "at least 2 bits"),
                                        (["--method", "int", "--max-accuracy-drop", "1", "-o", "x.onnx"],
                                         "scan only")])
def test_bits_method_errors_exit_2(tmp_path, args, match):
    res = CliRunner().invoke(main, ["bits", "--example", "digits-mlp", *args])
    assert res.exit_code == 2 and match in res.output, res.output


def test_bits_options_reject_unknown_method():
    with pytest.raises(OptionError, match="unknown method"):
        BitsOptions(method="uniform")


def test_optimize_budget_reaches_int8_exclusion(fixed_latency, rng, tmp_path):
    """--max-accuracy-drop with labels: quantize-int8 excludes sensitive layers within that budget, and the
    recipe in the report records it (so replaying it gives the same model)."""
    from onnx_lincomp.optimize import OptimizeOptions, optimize
    from onnx_lincomp.recipe import CalibrationSettings, Recipe

    model, x, labels = _fragile_mlp(rng)
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, path)
    np.savez(data, x=x, y=labels)
    recipe = Recipe((PassSpec.of("quantize-int8"),), CalibrationSettings(0.5))
    # 200 held-out samples support a 5-point gate on the paired bound (plain INT8 loses over 10 points here)
    result = optimize(str(path), str(data), OptimizeOptions(recipe, labels="y", max_accuracy_drop=5.0, latency=False,
                                                             min_samples=8))
    spec = result.report.recipe.spec("quantize-int8")
    assert spec.options.exclude_sensitive == "auto" and spec.options.max_drop == 5.0
    assert _float_weight(result.model, "fc0") and not _float_weight(result.model, "fc1")
    # an explicit choice in the recipe is left as it is
    fixed = Recipe((PassSpec.of("quantize-int8", {"exclude_sensitive": 1}),), CalibrationSettings(0.5))
    again = optimize(str(path), str(data), OptimizeOptions(fixed, labels="y", max_accuracy_drop=5.0, latency=False,
                                                           min_samples=8))
    assert again.report.recipe.spec("quantize-int8").options.max_drop is None


def test_float_regions_follow_the_excluded_layers():
    """The ops between layers kept float stay float too (else their activations keep Q/DQ); an op next to a
    quantized layer stays quantizable (must not fire)."""
    from conftest import cnn_model
    from onnx_lincomp.model_io import graph_from_proto
    from onnx_lincomp.rewrite.int8_build import float_regions

    graph = graph_from_proto(cnn_model(np.random.default_rng(0)))
    ops = ("Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Flatten")
    assert float_regions(graph, [], ops) == []
    assert set(float_regions(graph, ["conv1", "conv2", "fc"], ops)) == {"relu1", "pool1", "relu2", "flatten"}
    assert set(float_regions(graph, ["conv1", "conv2"], ops)) == {"relu1", "pool1"}  # relu2, flatten lead to fc
    assert float_regions(graph, ["conv2"], ops) == []  # every op touches a quantized layer


def test_excluding_every_layer_gives_the_float_model(fixed_latency, rng):
    model, x, labels = _fragile_mlp(rng)
    out, _ = _quantize(model, x, "quantize-int8", {"exclude_sensitive": 2}, labels)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in out.graph.node)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
