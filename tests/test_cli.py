import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import assert_same_outputs, mlp_model
from onnx_lincomp.cli import main
from onnx_lincomp.examples import example_paths


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_analyze_example_json(runner, tmp_path):
    result = invoke(runner, "analyze", "--example", "digits-mlp", "--json", tmp_path / "a.json", "--save-stats",
                    tmp_path / "s.npz")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "a.json").read_text())
    assert [layer["relu"] for layer in data["layers"]] == ["relu0", "relu1"]
    assert data["params_after_exact_passes"] < data["params"]
    plan = next(p for p in data["plans"] if p["pass"] == "remove-dead")
    assert plan["params_saved"] == data["params"] - data["params_after_exact_passes"] > 0
    assert sum(layer["dead"] for layer in data["layers"]) > 0
    # the saved statistics give the same analysis without calibrating again
    again = invoke(runner, "analyze", "--example", "digits-mlp", "--stats", tmp_path / "s.npz", "--json", "-")
    assert json.loads(again.stdout)["layers"] == data["layers"]


def test_analyze_plot(runner, tmp_path):
    pytest.importorskip("matplotlib")
    result = invoke(runner, "analyze", "--example", "digits-cnn", "--plot", tmp_path / "rates.png")
    assert result.exit_code == 0 and (tmp_path / "rates.png").stat().st_size > 1000


def test_optimize_example_writes_smaller_equal_model(runner, tmp_path):
    out = tmp_path / "small.onnx"
    result = invoke(runner, "optimize", "--example", "digits-mlp", "-o", out, "--json", tmp_path / "r.json",
                    "--no-latency")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]
    assert report["verification_calibration"]["max_abs"] <= 1e-5
    held = report["verification_heldout"]
    assert held["accuracy_after"] == held["accuracy_before"]
    model, calib = example_paths("digits-mlp")
    x = np.load(calib)["input"]
    assert_same_outputs(onnx.load(model), onnx.load(out), {"input": x})


def test_gate_failure_exit_code_and_no_output(runner, tmp_path):
    out = tmp_path / "never.onnx"
    result = invoke(runner, "optimize", "--example", "digits-mlp", "-o", out, "--linear-rate", "0.05",
                    "--max-abs-error", "1e-9", "--no-latency")
    assert result.exit_code == 4
    assert "exceeds --max-abs-error" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_budget_the_heldout_split_cannot_support_is_refused(runner, tmp_path):
    out = tmp_path / "s.onnx"
    result = invoke(runner, "optimize", "--example", "digits-mlp", "-o", out, "--max-accuracy-drop", "1",
                    "--no-latency")
    assert result.exit_code == 4
    assert "108 held-out samples cannot support a 1-point budget" in result.output and "--gate-on all" in result.output
    assert not out.exists()


def test_accuracy_budget_search(runner, tmp_path):
    result = invoke(runner, "optimize", "--example", "digits-mlp", "-o", tmp_path / "s.onnx", "--max-accuracy-drop",
                    "1", "--gate-on", "all", "--json", "-", "--no-latency")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["search"]) == 20
    gate = report["verification_all"]
    assert gate["samples"] == 540 and gate["accuracy_drop"]["upper_points"] <= 1.0
    rate = next(p for p in report["recipe"]["passes"] if p["name"] == "fold-linear")["linear_rate"]
    chosen = [r for r in report["search"] if r["linear_rate"] == rate][0]
    assert chosen["within_budget"] and chosen["chosen"]


@pytest.mark.parametrize("args,code,message", [
    (["optimize", "missing.onnx", "--calib", "random", "-o", "x.onnx"], 3, "no such model file"),
    (["analyze", "MODEL", "--calib", "nothere.npz"], 3, "no such calibration file"),
    (["analyze", "MODEL", "--calib", "BAD"], 3, "no array for input 'x'"),
    (["optimize", "MODEL", "--calib", "random", "-o", "o.onnx", "--passes", "nope"], 2, "unknown pass 'nope'"),
    (["optimize", "MODEL", "--calib", "random", "-o", "o.onnx", "--linear-rate", "2"], 2, "linear-rate"),
    (["optimize", "MODEL", "--calib", "random", "-o", "o.onnx", "--layer-threshold", "abc"], 2, "layer-threshold"),
])
def test_bad_input_exit_codes(runner, tmp_path, rng, monkeypatch, args, code, message):
    model = tmp_path / "m.onnx"
    onnx.save(mlp_model(rng, [4, 5, 2]), model)
    np.savez(tmp_path / "bad.npz", a=np.zeros((3, 4), np.float32), b=np.zeros((3, 4), np.float32))
    args = [str(model) if a == "MODEL" else str(tmp_path / "bad.npz") if a == "BAD" else a for a in args]
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, args)
    assert result.exit_code == code, result.output
    assert message in result.output + (result.stderr or "")
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "x.onnx").exists()


def test_bench_and_report(runner, tmp_path):
    model, _ = example_paths("digits-cnn")
    result = invoke(runner, "bench", model, model, "--rounds", "5", "--batch-size", "4", "--json", "-")
    rows = json.loads(result.stdout)["models"]
    assert len(rows) == 2 and all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in rows)
    assert rows[0]["ratio"] == 1.0 and "verdict" in rows[1]
    rep = json.loads(invoke(runner, "report", model, "--json", "-", "--per-node").stdout)
    # conv1 8*8*8*9 + conv2 16*4*4*72 + fc 10*256
    assert rep["macs"] == 8 * 64 * 9 + 16 * 16 * 72 + 10 * 256
    assert rep["params"] == 8 * 9 + 8 + 16 * 72 + 16 + 2560 + 10
    assert rep["op_histogram"]["Conv"] == 2


def test_report_takes_input_shapes_for_negative_dims(runner, tmp_path):
    """A Paddle-style input (every dim -1) is dynamic: --input-shape sets it, at any batch, MACs per sample."""
    from test_model_report import _paddle_style_conv

    path = tmp_path / "paddle.onnx"
    onnx.save(_paddle_style_conv(np.random.default_rng(0)), path)
    plain = invoke(runner, "report", path)
    assert "1 nodes without static shapes not counted: give --input-shape" in plain.output
    for shape in ("x=1,3,8,8", "x=16,3,8,8"):
        rep = json.loads(invoke(runner, "report", path, "--input-shape", shape, "--json", "-").stdout)
        assert rep["macs"] == 4 * 3 * 9 * 64 and rep["nodes_without_shapes"] == 0


def test_sweep_csv_and_plot(runner, tmp_path):
    pytest.importorskip("matplotlib")
    result = invoke(runner, "sweep", "--example", "digits-mlp", "--csv", tmp_path / "s.csv", "--plot",
                    tmp_path / "s.png", "--no-latency", "--json", "-")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["threshold"] for r in rows] == [round(0.05 * i, 2) for i in range(1, 21)]
    assert rows[0]["params"] < rows[-1]["params"]
    assert (tmp_path / "s.png").stat().st_size > 1000 and len((tmp_path / "s.csv").read_text().splitlines()) == 21


def test_no_relu_model_message(runner, tmp_path, rng):
    from onnx import helper

    from conftest import init, make_model, vinfo
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vinfo("x", ["N", 3])], [vinfo("y", ["N", 2])],
                       [init("w", rng.normal(size=(3, 2)).astype(np.float32))])
    onnx.save(model, tmp_path / "m.onnx")
    result = invoke(runner, "optimize", tmp_path / "m.onnx", "--calib", "random:8", "-o", tmp_path / "o.onnx",
                    "--no-latency")
    assert result.exit_code == 0 and "no Relu" in result.output
    assert_same_outputs(model, onnx.load(tmp_path / "o.onnx"), {"x": rng.random((2, 3), dtype=np.float32)})


def _help_examples() -> list[tuple[str, list[list[str]]]]:
    """Per command, the example command lines its --help shows that run on the bundled examples (in order: a
    later one may replay an earlier one's report)."""
    import shlex

    out = []
    for name, command in sorted(main.commands.items()):
        lines = [shlex.split(line[line.index("onnx-lincomp "):])[1:] for line in (command.epilog or "").splitlines()
                 if "onnx-lincomp " in line]
        lines = [a for a in lines if "--example" in a]
        if lines:
            out.append((name, lines))
    return out


@pytest.mark.parametrize(("name", "lines"), _help_examples(), ids=[n for n, _ in _help_examples()])
def test_help_examples_run(runner, tmp_path, monkeypatch, name, lines):
    """Every example a command's --help shows on the bundled models runs and exits 0 (a user copies them)."""
    monkeypatch.chdir(tmp_path)
    for args in lines:
        if "--plot" in args:
            pytest.importorskip("matplotlib")
        args = [*args, "--no-latency"] if args[0] in ("optimize", "sweep") and "--recipe" not in args else args
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args, result.output)


def test_budget_refusal_hints_what_the_command_has(runner, tmp_path):
    """bits has no --gate-on: its refusal of a budget the held-out split cannot support says what it can do."""
    result = invoke(runner, "bits", "--example", "digits-mlp", "--max-accuracy-drop", "1", "-o", tmp_path / "b.onnx")
    assert result.exit_code == 4
    assert "cannot support a 1-point budget" in result.output and "--verify-split" in result.output
    assert "--gate-on" not in result.output and not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("shape, words", [("x=1,3,0,8", "dimensions must be positive"),
                                          ("x=1,3,abc", "expected NAME=D1,D2,... with integers")])
def test_bad_input_shape_is_a_usage_error(runner, tmp_path, shape, words):
    from test_model_report import _paddle_style_conv

    path = tmp_path / "paddle.onnx"
    onnx.save(_paddle_style_conv(np.random.default_rng(0)), path)
    result = invoke(runner, "report", path, "--input-shape", shape)
    assert result.exit_code == 2 and words in result.output
    twice = invoke(runner, "report", path, "--input-shape", "x=1,3,8,8", "--input-shape", "x=1,3,9,9")
    assert twice.exit_code == 2 and "names input 'x' twice" in twice.output


def test_report_lines_show_the_mean_error_and_an_unverified_split(runner, tmp_path):
    pruned = invoke(runner, "optimize", "--example", "digits-cnn", "--passes", "prune-channels", "--sparsity", "0.5",
                    "--channel-multiple", "1", "-o", tmp_path / "p.onnx", "--no-latency")
    assert pruned.exit_code == 0, pruned.output
    assert "mean abs error" in pruned.output and "held-out: 108 samples" in pruned.output
    # a model no pass changes: its held-out split is not verified, and the report says so (not "0 samples")
    same = invoke(runner, "optimize", "--example", "digits-cnn", "--passes", "merge-affine", "-o", tmp_path / "s.onnx",
                  "--no-latency")
    assert same.exit_code == 0 and "held-out: not verified (no pass changed the graph)" in same.output


def test_long_pass_steps_report_progress(tmp_path):
    """Decompositions, moment passes and group refits draw a bar each on stderr (a label where it is no TTY)."""
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", str(tmp_path / "o.onnx"), "--passes",
                                    "low-rank,prune-channels", "--keep-params", "0.6", "--sparsity", "0.3",
                                    "--channel-multiple", "1", "--no-latency"])
    assert res.exit_code == 0, res.output
    for label in ("low-rank: input covariances", "low-rank: layers decomposed", "prune-channels: layer moments",
                  "prune-channels: groups pruned and refit"):
        assert label in res.output
