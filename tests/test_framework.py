"""The pass framework: plans do not mutate, the runner names failing passes, recipes round-trip byte for byte,
options validate, exact mode refuses statistics-only flags, and a larger output is an error unless allowed."""
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import mlp_model
from onnx_lincomp.analysis.unit_sets import UnitEvidence
from onnx_lincomp.calibration import collect_relu_stats
from onnx_lincomp.calibration.activations import CalibrationData
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.cli import main
from onnx_lincomp.errors import InvalidModelError, OptionError, PassError
from onnx_lincomp.model_io import model_from_proto, to_model_proto
from onnx_lincomp.passes import PASSES, FoldLinearOptions, PassContext
from onnx_lincomp.pipeline import plan_pipeline, run_pipeline
from onnx_lincomp.recipe import CalibrationSettings, PassSpec, Recipe, load_recipe, recipe_from_flags
from test_passes import _array_source


def _loaded_with_stats(rng):
    model = mlp_model(rng, [6, 12, 8, 3], dead={0: [0, 3], 1: [2]}, linear={0: [5, 6]})
    loaded = model_from_proto(model)
    canonicalize(loaded.graph)
    x = rng.random((40, 6), dtype=np.float32)
    stats = collect_relu_stats(loaded.graph, loaded.ctx, _array_source(loaded, x))
    return loaded, stats, CalibrationData(_array_source(loaded, x), loaded.ctx, 40)


def test_plans_do_not_mutate(rng):
    loaded, stats, data = _loaded_with_stats(rng)
    before = to_model_proto(loaded.graph, loaded.ctx).SerializeToString()
    specs = tuple(PassSpec.of(n) for n in PASSES)
    plans = plan_pipeline(loaded.graph, specs, PassContext(UnitEvidence.from_stats(stats), data))
    assert to_model_proto(loaded.graph, loaded.ctx).SerializeToString() == before
    removal = plans[0]
    expected = sum(min(int(s.dead.sum()), s.channels - 1) for s in stats.layers)
    assert removal.pass_name == "remove-dead" and sum(m.units for m in removal.matches) == expected >= 3
    assert removal.params_saved > 0


def test_runner_names_the_pass_on_a_typed_error(rng, monkeypatch):
    loaded, stats, data = _loaded_with_stats(rng)

    def boom(self, graph, plan):
        raise InvalidModelError("weights changed under us")

    monkeypatch.setattr(PASSES["fold-linear"], "apply", boom)
    with pytest.raises(PassError) as info:
        run_pipeline(loaded.graph, tuple(PassSpec.of(n) for n in PASSES),
                     PassContext(UnitEvidence.from_stats(stats), data))
    msg = str(info.value)
    assert "pass 'fold-linear' failed (weights changed under us)" in msg and "already run: remove-dead" in msg
    assert info.value.exit_code == InvalidModelError.exit_code


def test_options_validate_and_name_the_option():
    with pytest.raises(OptionError, match="unknown option 'speed'"):
        PassSpec.of("remove-dead", {"speed": 1})
    with pytest.raises(OptionError, match="linear_rate"):
        FoldLinearOptions(linear_rate=1.5)
    with pytest.raises(OptionError, match="unknown pass 'nope'"):
        PassSpec.of("nope")
    with pytest.raises(OptionError, match="--linear-rate is an option of pass 'fold-linear'"):
        recipe_from_flags(("remove-dead",), {"--linear-rate": "0.9"}, CalibrationSettings())
    assert FoldLinearOptions.fields_help()["linear_rate"]  # every field documented


def test_recipe_toml_round_trip(tmp_path):
    recipe = Recipe((PassSpec.of("remove-dead", {"dead_rate": 0.01, "channel_multiple": 8}),
                     PassSpec.of("fold-linear", {"linear_rate": 0.9, "layer_threshold": 3})),
                    CalibrationSettings(0.25, 100, (("x", (1, 3)),)))
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    assert load_recipe(path).as_dict() == recipe.as_dict()
    path.write_text(recipe.to_toml().replace("dead_rate", "deadrate"))
    with pytest.raises(OptionError, match="unknown option 'deadrate'"):
        load_recipe(path)
    # a {name: shape} mapping and pairs with list shapes are stored as the same tuples, from a recipe too
    assert CalibrationSettings(0.25, 100, {"x": [1, 3]}) == recipe.calibration
    assert CalibrationSettings(0.25, 100, [["x", [1, 3]]]) == recipe.calibration
    table = dict(recipe.as_dict(),
                 calibration={"verify_split": 0.25, "max_samples": 100, "input_shapes": {"x": [1, 3]}})
    assert Recipe.from_dict(table).calibration == recipe.calibration
    with pytest.raises(OptionError, match="input_shapes"):
        CalibrationSettings(input_shapes={"x": "a,b"})


def test_report_recipe_reproduces_the_model_byte_for_byte(tmp_path):
    runner = CliRunner()
    first = runner.invoke(main, ["optimize", "--example", "digits-mlp", "-o", str(tmp_path / "a.onnx"), "--linear-rate",
                                 "0.9", "--dead-rate", "0.01", "--verify-split", "0.3", "--max-abs-error", "10",
                                 "--no-latency", "--json", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["recipe"]["calibration"]["verify_split"] == 0.3
    again = runner.invoke(main, ["optimize", "--example", "digits-mlp", "-o", str(tmp_path / "b.onnx"), "--recipe",
                                 str(tmp_path / "a.json"), "--max-abs-error", "10", "--no-latency"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_calibration_flag_beside_recipe_replaces_only_that_setting(tmp_path):
    runner = CliRunner()
    first = runner.invoke(main, ["optimize", "--example", "digits-mlp", "-o", str(tmp_path / "a.onnx"),
                                 "--verify-split", "0.3", "--max-samples", "500", "--max-abs-error", "10",
                                 "--no-latency", "--json", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    again = runner.invoke(main, ["optimize", "--example", "digits-mlp", "-o", str(tmp_path / "b.onnx"), "--recipe",
                                 str(tmp_path / "a.json"), "--verify-split", "0.4", "--max-abs-error", "10",
                                 "--no-latency", "--json", str(tmp_path / "b.json")])
    assert again.exit_code == 0, again.output
    calibration = json.loads((tmp_path / "b.json").read_text())["recipe"]["calibration"]
    assert calibration["verify_split"] == 0.4
    assert calibration["max_samples"] == 500  # kept from the recipe, not reset to the flag's default


@pytest.mark.parametrize("args,message", [
    (["--exact", "--input-range", "0,1", "--dead-rate", "0.1"], "--dead-rate applies to statistics only"),
    (["--exact", "--input-range", "0,1", "--verify-split", "0.5"], "--verify-split applies to statistics only"),
    (["--input-range", "0,1"], "--input-range applies to exact mode only"),
    (["--passes", ""], "--passes is empty"),
    (["--passes", "remove-dead", "--linear-rate", "0.5"], "not in --passes"),
    (["--passes", "prune-channels", "--sparsity", "0.3", "--target-macs", "0.5"], "not both"),
])
def test_usage_errors_exit_2_and_write_nothing(tmp_path, rng, args, message):
    onnx.save(mlp_model(rng, [4, 5, 2]), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["optimize", str(tmp_path / "m.onnx"), "--calib", "random:8", "-o", str(out), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not out.exists()


def test_larger_output_is_a_gate_failure_unless_allowed(tmp_path, rng):
    # a narrow hidden layer between wide ones: a skip path (30x30) is larger than the layers it replaces
    onnx.save(mlp_model(rng, [30, 6, 30], linear={0: [0, 1, 2]}), tmp_path / "m.onnx")
    out = tmp_path / "big.onnx"
    args = ["optimize", str(tmp_path / "m.onnx"), "--calib", "random:64", "-o", str(out), "--layer-threshold", "0",
            "--no-latency"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 4 and "worse than the input" in res.output and not out.exists()
    res = CliRunner().invoke(main, args + ["--allow-larger", "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["after"]["params"] > json.loads(res.stdout)["before"]["params"]


def test_explain_prints_plans_and_writes_nothing(tmp_path):
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-mlp", "-o", str(out), "--explain"])
    assert res.exit_code == 0, res.output
    assert "remove-dead:" in res.output and "fold-linear:" in res.output and not out.exists()
