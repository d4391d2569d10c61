"""Every model in ../shared/models: load, canonicalise, calibrate, round-trip and optimise exactly."""
import onnx
import pytest

from conftest import shared_path
from onnx_lincomp.calibration import CollectOptions, collect_relu_stats, input_specs, open_calibration
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.model_io import load_model, to_model_proto
from onnx_lincomp.optimize import OptimizeOptions, optimize
from onnx_lincomp.recipe import CalibrationSettings, Recipe
from onnx_lincomp.verify import compare_models
from real_models import REAL_MODELS, calibration_file

pytestmark = pytest.mark.real
IDS = [m.path.split("/")[-1] for m in REAL_MODELS]


def _float_tolerance(spec) -> float:
    """Exact rewrites agree to float rounding, which grows with depth: PP-OCRv4 det folds ~100 BatchNorms and
    Convs ahead of a sigmoid, and its text probabilities move by up to 2e-5 (on text; on noise it outputs 0)."""
    return 1e-4 if spec.path.endswith("ch_PP-OCRv4_det_infer.onnx") else 1e-5


@pytest.mark.parametrize("spec", REAL_MODELS, ids=IDS)
def test_load_canonicalise_calibrate_round_trip(spec, tmp_path):
    path = shared_path("models", spec.path)
    calib = calibration_file(spec, tmp_path)
    loaded = load_model(path)
    original = onnx.load(path)
    report = canonicalize(loaded.graph, ctx=loaded.ctx)
    source = open_calibration(calib, input_specs(loaded.graph), shape_overrides=spec.input_shapes)
    stats = collect_relu_stats(loaded.graph, loaded.ctx, source, CollectOptions(batch_size=8))
    relus_in_main = sum(1 for n in loaded.graph.nodes if n.op == "Relu")
    assert len(stats.layers) == relus_in_main
    if spec.path.endswith("silero_vad.onnx"):
        assert relus_in_main == 0 and len(stats.not_analysed) > 0  # Relus live in If subgraphs
    canonical = to_model_proto(loaded.graph, loaded.ctx)
    onnx.checker.check_model(canonical)
    assert {p.key: p.value for p in canonical.metadata_props} == {p.key: p.value for p in original.metadata_props}
    result = compare_models(original, canonical, loaded.graph, source, 0, min(len(source), 16), batch_size=8)
    assert result.within(_float_tolerance(spec)), (spec.path, result.as_dict())
    if "BatchNormalization" in {n.op_type for n in original.graph.node} and not spec.path.endswith("crepe_tiny.onnx"):
        assert report.batchnorms_folded > 0


@pytest.mark.parametrize("spec", REAL_MODELS, ids=IDS)
def test_optimize_is_exact_on_calibration_data(spec, tmp_path):
    path = shared_path("models", spec.path)
    calib = calibration_file(spec, tmp_path)
    options = OptimizeOptions(
        Recipe(calibration=CalibrationSettings(0.0, input_shapes=tuple(spec.input_shapes.items()))),
        latency=False, batch_size=8, min_samples=1, max_output_change=None)
    # exactness on the calibration data is checked here; the gates for few or random samples are tested elsewhere
    result = optimize(path, calib, options)
    onnx.checker.check_model(result.model)
    v = result.report.on_calibration
    if any(r.result.changed for r in result.report.passes):
        assert v.within(_float_tolerance(spec)), (spec.path, v.as_dict())
    else:  # nothing changed: only a spot check of canonicalisation (None when it changed nothing either)
        assert any("no pass changed the graph" in m for m in result.report.messages)
        assert v is None or v.within(1e-4)
    assert result.report.after.params <= result.report.before.params


def test_fmnist_mlp_dead_units_all_go(tmp_path):
    """Calibrated on the first 2,000 Fashion-MNIST test images: 38 and 40 dead Relus, ~22% of parameters."""
    spec = next(m for m in REAL_MODELS if m.path.endswith("own_fmnist_mlp_l1.onnx"))
    path = shared_path("models", spec.path)
    from dataclasses import replace as dc_replace

    full = dc_replace(spec, samples=10000)
    calib = calibration_file(full, tmp_path)
    result = optimize(path, calib,
                      OptimizeOptions(Recipe(calibration=CalibrationSettings(0.8)), labels="y", latency=False))
    rd = next(p for p in result.report.passes if p.result.name == "remove-dead")
    assert rd.result.neurons_removed == 78
    saved = 1 - result.report.after.params / result.report.before.params
    assert 0.21 < saved < 0.24
    held = result.report.on_heldout
    assert held.samples == 8000 and held.accuracy_after == held.accuracy_before


@pytest.mark.parametrize("spec", REAL_MODELS, ids=IDS)
def test_analyze_every_shared_model(spec, tmp_path):
    """`analyze` on each third-party model: exit 0, JSON with one row per top-level Relu, plans for the passes."""
    import json

    from click.testing import CliRunner

    from onnx_lincomp.cli import main

    calib = calibration_file(spec, tmp_path)
    shapes = [f"--input-shape={k}={','.join(map(str, v))}" for k, v in spec.input_shapes.items()]
    res = CliRunner().invoke(main, ["analyze", str(shared_path("models", spec.path)), "--calib", calib, *shapes,
                                    "--json", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    data = json.loads((tmp_path / "a.json").read_text())
    relus = sum(1 for n in load_model(shared_path("models", spec.path)).graph.nodes if n.op == "Relu")
    assert len(data["layers"]) == relus and {p["pass"] for p in data["plans"]} == {"remove-dead", "fold-linear"}
