"""``sensitivity``: per-layer scans, the allocation built from them, and the command's outputs and errors."""
import csv
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import cnn_model, mlp_model
from onnx_lincomp.cli import main
from onnx_lincomp.examples import example_paths
from onnx_lincomp.optimize import compress
from onnx_lincomp.passes import PASSES
from onnx_lincomp.recipe import Recipe
from onnx_lincomp.sensitivity import (
    METHODS,
    AllocationOptions,
    ScanInput,
    ScanOptions,
    SensitivityRow,
    _Candidates,
    _Curve,
    _Greedy,
    _pass,
    parse_levels,
    sensitivity,
)

CNN, CNN_DATA = (str(p) for p in example_paths("digits-cnn"))
LEVELS = (0.0, 0.3, 0.7)


@pytest.fixture(scope="module")
def cnn_scan():
    return sensitivity(ScanInput(CNN, CNN_DATA, labels="y"), ScanOptions(levels=LEVELS)).scan


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _small_cnn(tmp_path) -> str:
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(np.random.default_rng(3)), path)
    return str(path)


def test_rows_cover_every_group_and_level(cnn_scan):
    assert cnn_scan.layers == ("conv1", "conv2")
    assert [(r.layer, r.level) for r in cnn_scan.rows] == [(n, lv) for n in ("conv1", "conv2") for lv in LEVELS]
    assert cnn_scan.split == "heldout" and cnn_scan.samples == 108
    for r in cnn_scan.rows:
        assert r.accuracy is not None and r.agreement is not None and r.latency is None


def test_level_zero_is_exact_and_error_grows_with_level(cnn_scan):
    for r in cnn_scan.rows:
        if r.level == 0:
            assert r.max_abs_error <= 1e-5 and r.agreement == 1.0 and r.params == cnn_scan.base.params
    mean_error = [np.mean([r.mean_abs_error for r in cnn_scan.rows if r.level == lv]) for lv in LEVELS]
    assert mean_error[0] < mean_error[1] < mean_error[2]
    for layer in cnn_scan.layers:  # pruning more removes more (or nothing: a group one NCHWc block wide stays)
        curve = cnn_scan.curve(layer)
        assert [r.params for r in curve] == sorted((r.params for r in curve), reverse=True)
        assert curve[-1].macs <= curve[0].macs
    assert cnn_scan.curve("conv1")[-1].macs < cnn_scan.curve("conv1")[0].macs


@pytest.mark.parametrize("layer,level", [("conv1", 0.5), ("conv2", 0.25)])
def test_level_plan_candidate_is_the_single_layer_pass(layer, level):
    """The scan applies one match of a plan made for every group at the level: the very model the pass makes
    with layers={layer: level} alone."""
    prep = ScanInput(CNN, CNN_DATA, labels="y").prepare()
    fast = _Candidates(prep, METHODS["channels"]).build(layer, level)
    plain, records = compress(prep, None, Recipe((_pass(METHODS["channels"], {layer: level}),)))
    if fast is None:  # widths kept at whole NCHWc blocks: this level removes nothing, and neither does the pass
        assert not any(r.result.changed for r in records)
    else:
        assert fast.SerializeToString() == plain.SerializeToString()


def test_unchanged_rows_say_why(cnn_scan):
    """A row whose model the pass left as it was carries the reason; a pruned row none."""
    for r in cnn_scan.rows:
        if r.level > 0:
            assert (r.unchanged != "") == (r.params == cnn_scan.base.params), r


def test_a_group_one_block_wide_is_unchanged_with_the_reason(monkeypatch):
    import onnx_lincomp.passes.prune_channels as pc

    monkeypatch.setattr(pc, "nchwc_block", lambda: 16)  # the AVX-512 block, whatever this CPU has
    scan = sensitivity(ScanInput(CNN, CNN_DATA, labels="y"), ScanOptions(levels=(0.5,))).scan
    conv2 = next(r for r in scan.rows if r.layer == "conv2")  # 16 channels: one block
    assert conv2.params == scan.base.params and conv2.unchanged.startswith("kept whole: widths stay at multiples of 16")
    conv1 = next(r for r in scan.rows if r.layer == "conv1")  # 8 channels, narrower than a block: pruned
    assert conv1.params < scan.base.params and conv1.unchanged == ""
    out = invoke("sensitivity", CNN, "--calib", CNN_DATA, "--levels", "0.5")
    assert "conv2: unchanged at every level (kept whole: widths stay at multiples of 16" in out.output
    # --channel-multiple 1 prunes it
    rows = json.loads(invoke("sensitivity", CNN, "--calib", CNN_DATA, "--levels", "0.5", "--channel-multiple", "1",
                             "--json", "-").stdout)["rows"]
    assert all(r["params"] < scan.base.params and r["unchanged"] == "" for r in rows)


def test_greedy_prunes_the_less_sensitive_layer_first():
    levels = (0.0, 0.5, 0.9)
    robust = _Curve("robust", levels, (0.0, 0.2, 0.35), (0.0, 0.0, 0.01), (0.0, 0.1, 0.2))
    fragile = _Curve("fragile", levels, (0.0, 0.2, 0.35), (0.0, 0.2, 0.5), (0.0, 1.0, 2.0))
    greedy = _Greedy([robust, fragile])
    assert greedy.run_to(0.7)
    assert greedy.levels() == {"robust": 0.9}
    assert greedy.run_to(0.5) and greedy.levels() == {"robust": 0.9, "fragile": 0.5}
    assert greedy.back_off() == "fragile" and greedy.levels() == {"robust": 0.9}
    assert greedy.run_to(0.5) is False  # fragile is capped at 0: nothing else to raise


def test_cli_writes_table_csv_json_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = {k: tmp_path / f"s.{k}" for k in ("csv", "json", "png")}
    result = invoke("sensitivity", CNN, "--calib", CNN_DATA, "--labels", "y", "--levels", "0.3,0.6",
                    "--csv", out["csv"], "--json", out["json"], "--plot", out["png"])
    assert result.exit_code == 0, result.output
    assert "conv1" in result.stdout and "accuracy % on 108 held-out samples" in result.stdout
    with open(out["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:8] == ["layer", "level", "accuracy", "agreement", "max_abs_error", "mean_abs_error",
                                 "params", "macs"]
    assert [(r["layer"], float(r["level"])) for r in rows] == [("conv1", 0.3), ("conv1", 0.6), ("conv2", 0.3),
                                                                ("conv2", 0.6)]
    data = json.loads(out["json"].read_text())
    assert data["layers"] == ["conv1", "conv2"] and len(data["rows"]) == 4 and "recipe" not in data
    assert out["png"].stat().st_size > 1000


BAD = [
    (["--levels", "0.5,1.0"], "in [0, 1)"),
    (["--levels", "-0.1"], "in [0, 1)"),
    (["--levels", "a,b"], "--levels"),
    (["--method", "random"], "unknown method"),
    (["--jobs", "0"], "--jobs"),
    (["--target-macs", "0.5"], "needs -o"),
    (["--target-macs", "0.5", "--target-params", "0.5", "-o", "x.onnx"], "give one of"),
    (["--target-macs", "1.5", "-o", "x.onnx"], "keep fraction"),
    (["--max-accuracy-drop", "2"], "applies to an allocation"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_is_a_one_line_usage_error(tmp_path, extra, message):
    outputs = ["--csv", tmp_path / "s.csv", "--json", tmp_path / "s.json"]
    result = CliRunner().invoke(main, [str(a) for a in ["sensitivity", _small_cnn(tmp_path), "--calib", "random:32",
                                                        *outputs, *extra]])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_plot_without_matplotlib_fails_before_work(tmp_path, monkeypatch):
    from onnx_lincomp.cli import plots
    from onnx_lincomp.errors import OptionError

    def missing():
        raise OptionError("--plot needs matplotlib: pip install 'onnx-lincomp[plot]'")

    def no_scan(*args, **kwargs):
        raise AssertionError("the scan ran")

    monkeypatch.setattr(plots, "pyplot", missing)
    monkeypatch.setattr("onnx_lincomp.sensitivity.sensitivity", no_scan)
    result = invoke("sensitivity", _small_cnn(tmp_path), "--calib", "random:32", "--plot", tmp_path / "s.png",
                    "--csv", tmp_path / "s.csv")
    assert result.exit_code == 2 and "needs matplotlib" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_accuracy_budget_without_class_scores_needs_labels(tmp_path):
    path = tmp_path / "reg.onnx"
    onnx.save(mlp_model(np.random.default_rng(0), [6, 12, 10, 1]), path)
    result = invoke("sensitivity", path, "--calib", "random:64", "--target-params", "0.5", "--max-accuracy-drop", "5",
                    "-o", tmp_path / "out.onnx", "--json", tmp_path / "r.json")
    assert result.exit_code == 2 and "--labels" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg.onnx"]


def test_allocation_meets_mac_target_and_replays(tmp_path):
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    result = invoke("sensitivity", CNN, "--calib", CNN_DATA, "--labels", "y", "--levels", "0.2,0.5,0.8",
                    "--target-macs", "0.6", "--max-accuracy-drop", "5", "-o", out, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    alloc = data["allocation"]
    assert alloc["after"]["macs"] <= 0.6 * alloc["before"]["macs"] and alloc["kept"] <= 0.6
    assert alloc["gate_drop"]["upper_points"] <= 5
    (spec,) = data["recipe"]["passes"]
    assert spec["name"] == "prune-channels" and spec["sparsity"] == 0 and spec["layers"] == alloc["levels"]
    assert set(alloc["levels"]) <= {"conv1", "conv2"} and alloc["levels"]
    again = tmp_path / "again.onnx"
    replay = invoke("optimize", CNN, "--calib", CNN_DATA, "--recipe", report, "-o", again, "--no-latency")
    assert replay.exit_code == 0, replay.output
    assert again.read_bytes() == out.read_bytes()


def test_budget_no_allocation_fits_exits_4_writing_nothing(tmp_path):
    """Without labels the budget is on agreement with the original's top-1; the first allocation misses it,
    capping its most damaging layer leaves the target out of reach: the gate's exit code, nothing written."""
    model = _small_cnn(tmp_path)
    result = invoke("sensitivity", model, "--calib", "random:64", "--levels", "0.5,0.9", "--target-macs", "0.5",
                    "--max-accuracy-drop", "6", "-o", tmp_path / "x.onnx", "--json", tmp_path / "r.json",
                    "--csv", tmp_path / "s.csv")
    assert result.exit_code == 4, result.output
    assert "no allocation meets --target-macs 0.5 within --max-accuracy-drop 6" in result.stderr
    assert "capped lower" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_unreachable_target_is_a_usage_error(tmp_path):
    result = invoke("sensitivity", _small_cnn(tmp_path), "--calib", "random:32", "--levels", "0.2",
                    "--target-macs", "0.05", "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "out of reach" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_two_jobs_give_the_rows_of_one(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(np.random.default_rng(5), [8, 24, 16, 4]), path)
    source = ScanInput(str(path), "random:48")
    one = sensitivity(source, ScanOptions(levels=(0.25, 0.5, 0.75), jobs=1)).scan
    two = sensitivity(source, ScanOptions(levels=(0.25, 0.5, 0.75), jobs=2)).scan
    assert one.layers == ("fc0", "fc1") and len(one.rows) == 6
    assert one.rows == two.rows


def test_magnitude_scan_counts_nonzeros():
    if "prune-magnitude" not in PASSES:
        pytest.skip("prune-magnitude is not in this build")
    scan = sensitivity(ScanInput(CNN, CNN_DATA, labels="y"), ScanOptions("magnitude", levels=(0.5,))).scan
    assert scan.layers == ("conv1", "conv2", "fc")
    for r in scan.rows:
        assert r.macs == scan.base.macs and r.params < scan.base.params


def test_levels_parse_sorted_and_distinct():
    assert parse_levels("0.5, 0.1,0.5") == (0.1, 0.5)
    assert SensitivityRow("a", 0.1, None, None, 0.0, 0.0, 1, 1).as_dict()["layer"] == "a"
    with pytest.raises(Exception, match="--target-macs"):
        AllocationOptions("macs", 0.5).check_method(METHODS["magnitude"])
