"""Failures of every command: one line naming the file / input / option, the documented exit code, no traceback,
and nothing written. Plus the staged outputs (:mod:`onnx_lincomp.outputs`) and the README's exit-code table."""
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import init, make_model, mlp_model, vinfo
from onnx_lincomp.cli import main
from onnx_lincomp.cli.app import EXIT_CODES_HELP
from onnx_lincomp.errors import (
    CalibrationDataError,
    InvalidModelError,
    LincompError,
    OptionError,
    PassError,
    VerificationGateError,
)
from onnx_lincomp.examples import example_paths
from onnx_lincomp.model_io import save_model_proto
from onnx_lincomp.outputs import OutputPlan

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = ("analyze", "optimize", "sweep", "bench", "report", "certify")
CALIB_COMMANDS = ("analyze", "optimize", "sweep", "certify")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Inputs good and bad, built once: models, calibration data, and an output folder per test."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(7)
    paths = {"model": root / "m.onnx", "empty": root / "empty.onnx", "text": root / "text.onnx",
             "ext": root / "ext" / "e.onnx", "custom": root / "custom.onnx", "fixed": root / "fixed.onnx"}
    onnx.save(mlp_model(rng, [4, 5, 2]), paths["model"])
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("not a model, just text renamed .onnx\n")
    paths["ext"].parent.mkdir()
    onnx.save(mlp_model(rng, [4, 5, 2]), paths["ext"], save_as_external_data=True, all_tensors_to_one_file=True,
              location="e.onnx.data", size_threshold=0)
    (paths["ext"].parent / "e.onnx.data").unlink()
    custom = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
              helper.make_node("Foo", ["h"], ["y"], name="foo", domain="com.example")]
    model = helper.make_model(helper.make_graph(custom, "custom", [vinfo("x", ["N", 4])], [vinfo("y", ["N", 4])]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, paths["custom"])
    w = rng.normal(size=(4, 3)).astype(np.float32)
    onnx.save(make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vinfo("x", [1, 4])],
                         [vinfo("y", [1, 3])], [init("w", w)]), paths["fixed"])
    x = rng.random((256, 4), dtype=np.float32)
    np.savez(root / "calib.npz", x=x)
    np.savez(root / "key.npz", a=x, b=x)
    np.savez(root / "rank.npz", x=x[:, :, None])
    nan = x.copy()
    nan[3, 1] = np.nan
    np.savez(root / "nan.npz", x=nan)
    np.savez(root / "emptyarr.npz", x=x[:0])
    (root / "notnpz.txt").write_text("0,1\n")
    paths.update({k: root / f"{k}.npz" for k in ("calib", "key", "rank", "nan", "emptyarr")})
    paths["notnpz"] = root / "notnpz.txt"
    return paths


def run_cli(*args, debug: bool = False):
    return CliRunner().invoke(main, (["--debug"] if debug else []) + [str(a) for a in args], catch_exceptions=False)


def command_args(command: str, model, calib, dest) -> list:
    """A working invocation of ``command`` whose file output is ``dest`` (the one thing a case varies, with model
    and calibration data)."""
    return {"analyze": ["analyze", model, "--calib", calib, "--json", dest],
            "optimize": ["optimize", model, "--calib", calib, "-o", dest, "--no-latency"],
            "sweep": ["sweep", model, "--calib", calib, "--csv", dest, "--no-latency"],
            "bench": ["bench", model, "--rounds", "3", "--json", dest],
            "report": ["report", model, "--json", dest],
            "certify": ["certify", model, "--input-range", "0,1", "--no-milp", "--calib", calib, "--json", dest],
            }[command]


def assert_clean_failure(result, code: int, names: str, folder: Path, before: list[str]) -> None:
    """Exit code, one error line naming the culprit, no traceback, and no new file (staging folders included)."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, result.stderr
    assert names in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert sorted(os.listdir(folder)) == before


# (case, commands it applies to, how it changes model / calib / destination, exit code, text the message names)
BAD_INPUTS = [
    ("missing model", COMMANDS, {"model": "nope.onnx"}, 3, "nope.onnx"),
    ("empty model file", COMMANDS, {"model": "empty"}, 3, "empty.onnx"),
    ("text renamed .onnx", COMMANDS, {"model": "text"}, 3, "text.onnx"),
    ("missing external data", COMMANDS, {"model": "ext"}, 3, "e.onnx.data"),
    ("calib wrong key", CALIB_COMMANDS, {"calib": "key"}, 3, "'x'"),
    ("calib wrong rank", CALIB_COMMANDS, {"calib": "rank"}, 3, "'x'"),
    ("calib NaN", CALIB_COMMANDS, {"calib": "nan"}, 3, "nan.npz"),
    ("calib empty array", CALIB_COMMANDS, {"calib": "emptyarr"}, 3, "emptyarr.npz"),
    ("missing output folder", COMMANDS, {"dest": "nodir/out.file"}, 2, "folder 'OUT/nodir' does not exist"),
    ("output is a folder", COMMANDS, {"dest": "sub"}, 2, "is a folder"),
]


TABLE = [(command, *row) for row in BAD_INPUTS for command in row[1]]


@pytest.mark.parametrize("command,case,applies,change,code,names", TABLE, ids=[f"{t[1]}-{t[0]}" for t in TABLE])
def test_bad_inputs_every_command(files, tmp_path, command, case, applies, change, code, names):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    model = files.get(change.get("model", "model"), tmp_path / change.get("model", ""))
    calib = files[change.get("calib", "calib")]
    dest = out / change.get("dest", "result.file")
    before = sorted(os.listdir(out))
    result = run_cli(*command_args(command, model, calib, dest))
    assert_clean_failure(result, code, names.replace("OUT", str(out)), out, before)


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_output_folder(files, tmp_path, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a 0o500 folder is still writable")
        result = run_cli(*command_args(command, files["model"], files["calib"], ro / "out.file"))
        assert_clean_failure(result, 2, f"folder '{ro}' is not writable", ro, [])
    finally:
        ro.chmod(0o700)


def test_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """The same check where root could write: os.access says no, and nothing is staged."""
    import onnx_lincomp.outputs as outputs_module

    monkeypatch.setattr(outputs_module.os, "access", lambda path, mode: Path(path) != tmp_path)
    plan = OutputPlan()
    plan.add("--json", tmp_path / "r.json")
    with pytest.raises(OptionError, match=r"--json .*r\.json: folder '.*' is not writable"):
        plan.check()


@pytest.mark.parametrize("command", ["analyze", "sweep"])
def test_plot_without_matplotlib(files, tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    args = {"analyze": ["analyze", files["model"], "--calib", files["calib"]],
            "sweep": ["sweep", files["model"], "--calib", files["calib"], "--no-latency"]}[command]
    result = run_cli(*args, "--plot", tmp_path / "p.png", "--json", tmp_path / "r.json")
    assert_clean_failure(result, 2, "--plot needs matplotlib", tmp_path, [])


BAD_OPTIONS = [
    (["analyze", "MODEL", "--calib", "CALIB", "--batch-size", "0"], 2, "--batch-size"),
    (["analyze", "MODEL", "--example", "digits-mlp"], 2, "give MODEL or --example, not both"),
    (["analyze", "MODEL", "--calib", "CALIB", "--json", "OUT/a.json", "--save-stats", "OUT/a.json"], 2,
     "--save-stats OUT/a.json and --json OUT/a.json name the same file"),
    (["optimize", "MODEL", "--calib", "CALIB", "-o", "OUT/o.onnx", "--passes", "nope"], 2, "unknown pass 'nope'"),
    (["optimize", "MODEL", "--calib", "CALIB", "-o", "OUT/o.onnx", "--linear-rate", "2"], 2, "linear-rate"),
    (["optimize", "MODEL", "--calib", "CALIB", "-o", "MODEL", "--no-latency"], 2,
     "refusing to overwrite the input model"),
    (["optimize", "MODEL", "--calib", "CALIB", "-o", "OUT/o.onnx", "--json", "CALIB"], 2,
     "refusing to overwrite the input --calib"),
    (["optimize", "MODEL", "--calib", "CALIB", "-o", "OUT/o.onnx", "--max-accuracy-drop", "1"], 2, "--labels"),
    (["optimize", "--example", "digits-mlp", "-o", "OUT/o.onnx", "--example", "digits-mlp", "MODEL"], 2,
     "give MODEL or --example, not both"),
    (["sweep", "MODEL", "--calib", "CALIB", "--layer-threshold", "abc"], 2, "--layer-threshold"),
    (["bench", "MODEL", "--rounds", "1"], 2, "--rounds"),
    (["bench", "MODEL", "--input-shape", "x=1,2,3", "--rounds", "3"], 3, "--input-shape x=1,2,3: input 'x' has rank 2"),
    (["bench", "MODEL", "--input-shape", "x=1,2", "--rounds", "3"], 3, "dimension 1 of input 'x' is fixed at 4"),
    (["bench", "CUSTOM", "--rounds", "3"], 3, "custom.onnx: onnxruntime cannot run the model"),
    (["report", "MODEL", "--input-shape", "y=1,4"], 3, "the model has no input 'y'"),
    (["report", "EMPTY"], 3, "empty.onnx: not a valid ONNX model"),
    (["certify", "MODEL", "--input-range", "NOTNPZ", "--no-milp"], 3, "notnpz.txt: not a .npz file of bounds"),
    (["certify", "MODEL", "--input-range", "2,1", "--no-milp"], 3, "--input-range '2,1'"),
    (["certify", "MODEL", "--input-range", "0,1", "--milp-time-limit", "0"], 2, "--milp-time-limit"),
]


@pytest.mark.parametrize("args,code,names", BAD_OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in BAD_OPTIONS])
def test_bad_option_values(files, tmp_path, args, code, names):
    out = tmp_path / "out"
    out.mkdir()
    swap = {"MODEL": str(files["model"]), "CALIB": str(files["calib"]), "CUSTOM": str(files["custom"]),
            "EMPTY": str(files["empty"]), "NOTNPZ": str(files["notnpz"])}
    args = [swap.get(a, a.replace("OUT", str(out))) for a in args]
    result = run_cli(*args)
    assert_clean_failure(result, code, names.replace("OUT", str(out)).replace("CALIB", str(files["calib"])), out, [])


def test_failure_after_staging_leaves_nothing(tmp_path):
    """The statistics and the report are staged before the gate fails: neither appears."""
    result = run_cli("optimize", "--example", "digits-mlp", "-o", tmp_path / "o.onnx", "--save-stats",
                     tmp_path / "s.npz", "--json", tmp_path / "r.json", "--linear-rate", "0.05", "--max-abs-error",
                     "1e-9", "--no-latency")
    assert_clean_failure(result, 4, "--max-abs-error", tmp_path, [])


def test_internal_error_is_one_line_and_debug_shows_traceback(files, tmp_path, monkeypatch):
    import onnx_lincomp.analyze as analyze_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(analyze_module, "analyze", broken)
    args = ["analyze", files["model"], "--calib", files["calib"], "--save-stats", tmp_path / "s.npz"]
    result = run_cli(*args)
    assert_clean_failure(result, 1, "internal error (ZeroDivisionError: boom); rerun with --debug for the traceback",
                         tmp_path, [])
    debug = run_cli(*args, debug=True)
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "ZeroDivisionError: boom" in debug.stderr
    assert os.listdir(tmp_path) == []


def test_report_on_empty_file_is_not_a_model(files):
    result = run_cli("report", files["empty"])
    assert result.exit_code == 3 and "parameters" not in result.output
    assert "empty.onnx: not a valid ONNX model (the file is empty)" in result.stderr


def test_bench_reports_the_batch_it_ran(files):
    result = run_cli("bench", files["fixed"], "--batch-size", "64", "--rounds", "3", "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["batch_size"] == 1 and data["batch_size_requested"] == 64
    row = data["models"][0]
    assert row["batch_size"] == 1
    assert row["throughput_per_s"] == pytest.approx(1000.0 / row["median_ms"])
    assert "fixed batch of 1" in result.stderr
    text = run_cli("bench", files["fixed"], "--batch-size", "64", "--rounds", "3")
    assert "batch size 1" in text.stdout


def test_outputs_commit_moves_staged_files_and_companions(tmp_path, rng):
    model = mlp_model(rng, [40, 50, 2])  # tensors over the external-data threshold
    plan = OutputPlan({"MODEL": str(tmp_path / "in.onnx")})
    plan.add("-o", tmp_path / "o.onnx", model=True)
    plan.add("--json", tmp_path / "r.json")
    plan.add("--csv", "-")  # stdout: not a file
    with plan.check() as outputs:
        with outputs.writing("-o") as path:
            save_model_proto(model, path, external_data=True)
        with outputs.writing("--json") as path:
            path.write_text("{}")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
        written = outputs.commit()
    assert sorted(p.name for p in written) == ["o.onnx", "o.onnx.data", "r.json"]
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "o.onnx.data", "r.json"]
    onnx.checker.check_model(str(tmp_path / "o.onnx"))


def test_outputs_discarded_on_failure_and_unwritten_refused(tmp_path):
    plan = OutputPlan()
    plan.add("--json", tmp_path / "r.json")
    plan.add("--csv", tmp_path / "t.csv")
    with pytest.raises(RuntimeError), plan.check() as outputs:
        with outputs.writing("--json") as path:
            path.write_text("{}")
        raise RuntimeError("work failed")
    assert os.listdir(tmp_path) == []
    with plan.check() as outputs:
        with outputs.writing("--json") as path:
            path.write_text("{}")
        with pytest.raises(LincompError, match="--csv .*t.csv: nothing was written"):
            outputs.commit()
    assert os.listdir(tmp_path) == []


def test_outputs_overwrite_and_same_file_rules(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    plan = OutputPlan({"MODEL": str(model)}, overwrite=True)
    plan.add("-o", model, model=True)
    plan.check()  # allowed with overwrite
    plan = OutputPlan({"MODEL": str(model)}, overwrite=True)
    plan.add("--json", tmp_path / "sub" / ".." / "m.onnx")
    with pytest.raises(OptionError, match="refusing to overwrite the input MODEL"):
        plan.check()  # --overwrite covers the model output only
    plan = OutputPlan()
    plan.add("-o", tmp_path / "o.onnx", model=True)
    plan.add("--json", tmp_path / "o.onnx.data")
    with pytest.raises(OptionError, match="name the same file"):
        plan.check()  # the model's external-data file is reserved too


def _readme_exit_codes() -> dict[int, str]:
    section = README.read_text().split("### Exit codes", 1)[1].split("\n#", 1)[0]
    return {int(code): meaning for code, meaning in re.findall(r"^\| (\d) \| (.+?) \|$", section, re.M)}


def test_readme_exit_code_table_matches_the_errors():
    documented = _readme_exit_codes()
    assert sorted(documented) == [0, 1, 2, 3, 4]
    assert all(f"{code} " in EXIT_CODES_HELP for code in documented)
    assert (PassError.exit_code, OptionError.exit_code, InvalidModelError.exit_code, CalibrationDataError.exit_code,
            VerificationGateError.exit_code) == (1, 2, 3, 3, 4)


def test_exit_0_success(tmp_path):
    assert "success" in _readme_exit_codes()[0]
    result = run_cli("optimize", "--example", "digits-mlp", "-o", tmp_path / "o.onnx", "--json", tmp_path / "r.json",
                     "--no-latency")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "r.json"]


def test_exit_1_a_pass_failed(tmp_path, monkeypatch):
    from onnx_lincomp.passes.remove_dead_neurons import RemoveDeadNeurons

    assert "a pass failed" in _readme_exit_codes()[1]

    def broken(self, graph, plan):
        raise RuntimeError("exploded")

    monkeypatch.setattr(RemoveDeadNeurons, "apply", broken)
    result = run_cli("optimize", "--example", "digits-mlp", "-o", tmp_path / "o.onnx", "--no-latency")
    assert_clean_failure(result, 1, "pass 'remove-dead' failed (RuntimeError: exploded); passes already run: none",
                         tmp_path, [])


def test_exit_2_usage_error(tmp_path):
    assert "usage error" in _readme_exit_codes()[2] and "`--input-range` without `--exact`" in _readme_exit_codes()[2]
    result = run_cli("optimize", "--example", "digits-mlp", "-o", tmp_path / "o.onnx", "--input-range", "0,1")
    assert_clean_failure(result, 2, "--input-range applies to exact mode only", tmp_path, [])


def test_exit_3_invalid_model_or_data(files, tmp_path):
    assert "invalid model or calibration data" in _readme_exit_codes()[3]
    result = run_cli("analyze", files["model"], "--calib", files["key"], "--json", tmp_path / "a.json")
    assert_clean_failure(result, 3, "key.npz: no array for input 'x'", tmp_path, [])


def test_exit_4_verification_gate(tmp_path):
    assert "verification gate" in _readme_exit_codes()[4] and "no output is written" in _readme_exit_codes()[4]
    model, _ = example_paths("digits-mlp")
    result = run_cli("optimize", model, "--calib", example_paths("digits-mlp")[1], "-o", tmp_path / "o.onnx",
                     "--linear-rate", "0.05", "--max-abs-error", "1e-9", "--no-latency")
    assert_clean_failure(result, 4, "exceeds --max-abs-error", tmp_path, [])
