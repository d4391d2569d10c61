"""share-weights: k-means codebooks, packed index storage, the shared model in onnxruntime (exactly the
dequantised weights, folded back at session start), file size, data-aware rounding, and usage errors."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from conftest import cnn_model, mlp_model, run
from onnx_lincomp.analysis.kmeans import (
    gptq_round,
    huffman_bits,
    kmeans_1d,
    nearest,
    output_error,
    refit_codebook,
    share_weight,
)
from onnx_lincomp.calibration.activations import CalibrationData
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.cli import main
from onnx_lincomp.errors import LincompError, OptionError
from onnx_lincomp.examples import example_paths
from onnx_lincomp.model_io import model_from_proto, to_model_proto
from onnx_lincomp.passes import PassContext, ShareWeightsOptions
from onnx_lincomp.pipeline import run_pipeline
from onnx_lincomp.recipe import PassSpec, Recipe
from onnx_lincomp.rewrite.codebook import block_shape, pack_indices, unpack_indices, word_windows
from test_passes import _array_source


def _share(model: onnx.ModelProto, x: np.ndarray | None, **options):
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    data = CalibrationData(_array_source(loaded, x), loaded.ctx, len(x)) if x is not None else None
    records = run_pipeline(loaded.graph, (PassSpec.of("share-weights", options),), PassContext(None, data))
    out = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(out, full_check=True)
    return out, records[-1].result


def _dequantised(model: onnx.ModelProto) -> onnx.ModelProto:
    """The shared model with every weight expanded into a float initializer (onnxruntime's constant folding)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lincomp-sw-{os.getpid()}.onnx")
    so.optimized_model_filepath = path
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    folded = onnx.load(path)
    os.remove(path)
    return folded


# ---- k-means and rounding ------------------------------------------------------------------------------

def test_kmeans_has_2_to_the_bits_centroids_and_keeps_zero(rng):
    w = rng.normal(0, 0.1, (40, 50))
    w[rng.random(w.shape) < 0.4] = 0.0  # pruned
    for bits in (1, 2, 4):
        shared = share_weight(w, bits)
        assert shared.codebook.size == 2 ** bits
        assert shared.zero_pinned and 0.0 in shared.codebook
        assert np.all(shared.weight[w == 0] == 0)
        assert shared.indices.max() < 2 ** bits
    dense = rng.normal(0, 0.1, 1000)
    book = kmeans_1d(dense, 8)
    assert book.size == 8 and np.all(np.diff(book) >= 0) and not np.any(book == 0)
    assert kmeans_1d(dense, 8, "kmeans++", seed=3).size == 8


def test_kmeans_finds_well_separated_clusters(rng):
    centres = np.array([-1.0, -0.2, 0.3, 2.0])
    values = np.repeat(centres, 200) + rng.normal(0, 0.01, 800)
    for init in ("linear", "kmeans++"):
        np.testing.assert_allclose(kmeans_1d(values, 4, init), centres, atol=0.01)
    np.testing.assert_array_equal(nearest(np.array([-5.0, 0.0, 0.29, 9.0]), centres), [0, 1, 2, 3])


def test_huffman_size():
    assert huffman_bits(np.array([5, 1, 1, 1])) == 5 * 1 + 2 + 3 + 3
    assert huffman_bits(np.array([4, 4, 4, 4])) == 16 * 2
    assert huffman_bits(np.array([7, 0])) == 0


def _problem(rng, out=24, cols=32, n=2000):
    mix = rng.normal(size=(cols, cols)) / np.sqrt(cols)
    x = rng.normal(size=(n, cols)) @ mix + rng.normal(0, 0.1, cols)
    h = x.T @ x / n
    w = rng.normal(0, 0.3, (out, cols))
    return w, h


def test_gptq_and_refit_beat_nearest_rounding_at_2_bits(rng):
    w, h = _problem(rng)
    plain = share_weight(w, 2)
    gptq = share_weight(w, 2, h, rounding="gptq", refit=False)
    both = share_weight(w, 2, h, rounding="gptq", refit=True)
    e_plain, e_gptq, e_both = (output_error(w, s.weight, h) for s in (plain, gptq, both))
    assert e_gptq < 0.8 * e_plain
    assert e_both <= e_gptq
    # the refit is the least-squares optimum for its assignment: no perturbation of a value does better
    book = refit_codebook(w, plain.indices, plain.codebook, h)
    best = output_error(w, book[plain.indices], h)
    assert best <= e_plain
    for k in range(book.size):
        for step in (-1e-3, 1e-3):
            moved = book.copy()
            moved[k] += step
            assert output_error(w, moved[plain.indices], h) >= best - 1e-12


def test_gptq_keeps_pinned_zeros(rng):
    w, h = _problem(rng)
    w[:, ::3] = 0.0
    book = kmeans_1d(w, 4, keep_zero=True)
    idx = gptq_round(w, h, book, pinned=w == 0)
    assert np.all(book[idx][w == 0] == 0)


# ---- packed storage --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_indices_round_trip(rng, bits):
    for n in (1, 7, 8, 9, 1001):
        idx = rng.integers(0, 2 ** bits, n)
        packed, tail = pack_indices(idx, bits)
        nbytes, per = block_shape(bits)
        assert packed.dtype == np.uint8 and packed.size == (n // per) * nbytes and tail.size == n % per
        np.testing.assert_array_equal(unpack_indices(packed, tail, bits), idx)
    assert word_windows(bits).divisors.max() < 2 ** 53


# ---- the pass ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gemm", "matmul"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_shared_model_equals_dequantised_weights(rng, kind, bits):
    model = mlp_model(rng, [32, 48, 40, 1], kind=kind)
    x = rng.random((64, 32)).astype(np.float32)
    shared, result = _share(model, x, bits=bits)
    assert result.count("layers_shared") == 2  # the last layer (1 x 40) is too small to shrink
    assert any("too small" in k for k in result.skipped)
    assert "Gather" in {n.op_type for n in shared.graph.node}
    folded = _dequantised(shared)
    assert "Gather" not in {n.op_type for n in folded.graph.node}  # expanded at session start
    for w in (t for t in folded.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2):
        assert len(np.unique(onnx.numpy_helper.to_array(w))) <= 2 ** bits or w.dims[0] * w.dims[1] == 40
    feeds = {"x": x}
    np.testing.assert_array_equal(run(shared, feeds)[0], run(folded, feeds)[0])


@pytest.mark.parametrize(("opset", "bits", "stored"), [(21, 4, onnx.TensorProto.UINT4),
                                                      (9, 3, onnx.TensorProto.UINT8)])
def test_index_layouts_by_opset(rng, opset, bits, stored):
    """Opset 21: 4-bit indices as ONNX UINT4; opset 9 (no Mod): packed bytes unpacked by Div/Mul/Sub."""
    model = mlp_model(rng, [32, 48, 40, 1])
    model.opset_import[0].version = opset
    model.ir_version = 10 if opset >= 21 else 4
    x = rng.random((64, 32)).astype(np.float32)
    shared, _ = _share(model, x, bits=bits)
    assert stored in {t.data_type for t in shared.graph.initializer}
    assert ("Mod" in {n.op_type for n in shared.graph.node}) is (opset >= 10 and bits != 4)
    np.testing.assert_array_equal(run(shared, {"x": x})[0], run(_dequantised(shared), {"x": x})[0])


def test_conv_layers_are_shared_with_data(rng):
    model = cnn_model(rng)
    x = rng.random((48, 1, 6, 6)).astype(np.float32)
    shared, result = _share(model, x, bits=3)
    assert result.count("layers_shared") >= 1
    ref, out = run(model, {"x": x})[0], run(shared, {"x": x})[0]
    assert np.abs(ref - out).max() < 0.2 * np.abs(ref).max()
    np.testing.assert_array_equal(out, run(_dequantised(shared), {"x": x})[0])


def test_without_data_nearest_rounding(rng):
    model = mlp_model(rng, [16, 24, 20, 3])
    shared, result = _share(model, None, bits=4)
    assert result.count("layers_shared") == 2 and result.count("biases_corrected") == 0
    with pytest.raises(LincompError, match="needs calibration data") as err:
        _share(model, None, bits=4, rounding="gptq")
    assert err.value.exit_code == 2


def test_per_layer_bits_and_unknown_layer(rng):
    model = mlp_model(rng, [16, 24, 20, 3])
    x = rng.random((64, 16)).astype(np.float32)
    shared, result = _share(model, x, bits=4, layers={"fc0": 0, "fc1": 2})
    assert result.count("layers_shared") == 1
    assert any("kept in float" in k for k in result.skipped)
    with pytest.raises(LincompError, match="unknown layer 'nope'") as err:
        _share(model, x, layers={"nope": 3})
    assert err.value.exit_code == 2


@pytest.mark.parametrize("bits", [0, 9, -1, True])
def test_bits_outside_1_to_8_is_an_option_error(bits):
    with pytest.raises(OptionError, match="1 to 8"):
        ShareWeightsOptions(bits=bits)


def test_recipe_round_trip_keeps_per_layer_bits():
    spec = PassSpec.of("share-weights", {"bits": 3, "layers": {"fc0": 2}})
    again = Recipe.from_dict(json.loads(json.dumps(Recipe((spec,)).as_dict())))
    assert again.passes[0].options == spec.options


def test_digits_mlp_file_shrinks_more_than_6x_at_4_bits(tmp_path):
    model, calib = example_paths("digits-mlp")
    out = tmp_path / "shared.onnx"
    report = tmp_path / "report.json"
    r = CliRunner().invoke(main, ["optimize", str(model), "--calib", str(calib), "--labels", "y", "--passes",
                                  "share-weights", "--bits", "4", "-o", str(out), "--json", str(report),
                                  "--no-latency"])
    assert r.exit_code == 0, r.output
    assert os.path.getsize(model) / os.path.getsize(out) > 6
    shared = onnx.load(out)
    onnx.checker.check_model(shared, full_check=True)
    rep = json.loads(report.read_text())
    assert rep["verification_heldout"]["accuracy_after"] >= rep["verification_heldout"]["accuracy_before"] - 0.02
    notes = " ".join(n for p in rep["passes"] for n in p["notes"])
    assert "Huffman" in notes and "file" in notes


@pytest.mark.parametrize("bits", ["9", "0"])
def test_bad_bits_on_the_command_line_exit_2_and_write_nothing(tmp_path, bits):
    out = tmp_path / "x.onnx"
    r = CliRunner().invoke(main, ["optimize", "--example", "digits-mlp", "--passes", "share-weights", "--bits", bits,
                                  "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "1 to 8" in r.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_sequential_keeps_pruned_zeros(rng):
    model = mlp_model(rng, [32, 48, 40, 1])
    w = next(t for t in model.graph.initializer if t.name == "w1")
    values = onnx.numpy_helper.to_array(w).copy()
    values[np.abs(values) < np.median(np.abs(values))] = 0.0
    w.CopyFrom(onnx.numpy_helper.from_array(values, "w1"))
    x = rng.random((64, 32)).astype(np.float32)
    shared, _ = _share(model, x, bits=2)
    folded = {t.name: onnx.numpy_helper.to_array(t) for t in _dequantised(shared).graph.initializer}
    layer = next(v for v in folded.values() if v.shape == values.shape)
    assert np.all(layer[values == 0] == 0)


# ---- the bits command ----------------------------------------------------------------------------------

def test_bits_scan_writes_csv_json_and_plot(tmp_path):
    paths = {k: tmp_path / f"bits.{k}" for k in ("csv", "json", "png")}
    r = CliRunner().invoke(main, ["bits", "--example", "digits-mlp", "--bits", "4,2", "--csv", str(paths["csv"]),
                                  "--json", str(paths["json"]), "--plot", str(paths["png"])])
    assert r.exit_code == 0, r.output
    rows = paths["csv"].read_text().strip().splitlines()
    assert rows[0].startswith("layer,kind,weights,bits") and len(rows) == 1 + 3 * 2
    data = json.loads(paths["json"].read_text())
    assert {row["bits"] for row in data["rows"]} == {4, 2} and "recipe" not in data
    assert paths["png"].stat().st_size > 0


def test_bits_budget_writes_a_model_that_the_recipe_replays(tmp_path):
    out, report, again = tmp_path / "shared.onnx", tmp_path / "report.json", tmp_path / "again.onnx"
    r = CliRunner().invoke(main, ["bits", "--example", "digits-mlp", "--bits", "4,2", "--max-accuracy-drop", "5",
                                  "-o", str(out), "--json", str(report), "--no-latency"])
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    layers = data["recipe"]["passes"][0]["layers"]
    assert set(layers) == {"fc0", "fc1", "fc2"} and set(layers.values()) <= {0, 2, 4}
    r = CliRunner().invoke(main, ["optimize", "--example", "digits-mlp", "--recipe", str(report), "-o", str(again),
                                  "--no-latency"])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == again.read_bytes()


@pytest.mark.parametrize("args", [["--bits", "9"], ["--bits", "4,x"], ["-o", "{tmp}/m.onnx"],
                                  ["--max-accuracy-drop", "1"]])
def test_bits_usage_errors_exit_2_and_write_nothing(tmp_path, args):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = CliRunner().invoke(main, ["bits", "--example", "digits-mlp", "--csv", str(tmp_path / "b.csv"), *args])
    assert r.exit_code == 2, r.output
    assert not list(tmp_path.iterdir())
