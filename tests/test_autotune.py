"""optimize --objective: the search across passes stays inside its budget, is the same with 1 or 2 workers
(and on a local Ray cluster), writes a recipe that replays the output byte for byte, and refuses bad input."""
import json
import os

import onnx
import pytest
from click.testing import CliRunner

from onnx_lincomp.autotune import Budget
from onnx_lincomp.autotune.pareto import pareto_flags
from onnx_lincomp.autotune.search import SearchOptions, run_search
from onnx_lincomp.autotune.space import Choice, Knob, default_knobs, neighbours, setting_recipe
from onnx_lincomp.cli import main
from onnx_lincomp.errors import OptionError
from onnx_lincomp.examples import example_paths
from onnx_lincomp.prepared import calibrate, prepare
from onnx_lincomp.recipe import CalibrationSettings, Recipe

KNOBS = (Knob("prune", (Choice("prune-channels", {"target_macs": 0.7}), Choice("prune-channels", {"target_macs": 0.4}),
                        Choice("prune-channels", {"target_macs": 0.1})), frozenset({"macs"})),)


AGREEMENT = Budget("agreement", 0.9)


def _search(jobs=1, backend="local", budget=AGREEMENT, knobs=KNOBS):
    model, calib = (str(p) for p in example_paths("digits-cnn"))
    cal = CalibrationSettings(verify_split=0.3)
    prep = prepare(model, calib, Recipe(calibration=cal), "y")
    stats = calibrate(prep)
    return run_search(prep, stats, model, calib, cal, "y", SearchOptions("macs", budget, jobs, backend), knobs)


def _rows(result):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in result.rows()]


def test_space_recipes_put_exact_passes_first_and_quantizers_last():
    knobs = default_knobs("latency")
    assert [k.name for k in knobs][:2] == ["prune", "low-rank"] or [k.name for k in knobs][0] == "prune"
    full = tuple(0 for _ in knobs)
    recipe = setting_recipe(knobs, full, CalibrationSettings())
    names = [s.name for s in recipe.passes]
    assert names[:3] == ["remove-dead", "fold-linear", "merge-affine"]
    assert names.index("prune-channels") == 3
    assert len(neighbours(knobs, (None,) * len(knobs))) == len(knobs)
    with pytest.raises(OptionError):
        default_knobs("speed")


def test_search_keeps_the_budget_and_picks_the_cheapest():
    result = _search()
    assert result.chosen is not None and result.chosen.within
    inside = [s for s in result.scored if s.within]
    assert result.chosen.outcome.macs == min(s.outcome.macs for s in inside)
    assert result.chosen.outcome.verification.agreement >= 0.9
    assert result.scored[0].label == "exact passes only"
    assert any(pareto_flags(result.scored, "macs"))


def test_two_workers_give_the_same_rows():
    assert _rows(_search(jobs=2)) == _rows(_search(jobs=1))


def test_ray_backend_gives_the_same_choice():
    pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    import ray

    try:
        ray_result = _search(jobs=2, backend="ray")
    finally:
        ray.shutdown()
    assert _rows(ray_result) == _rows(_search(jobs=1))


def test_cli_search_writes_a_recipe_that_replays(tmp_path):
    out, rep, pareto = tmp_path / "a.onnx", tmp_path / "r.json", tmp_path / "p.csv"
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", str(out), "--objective", "macs",
                                    "--min-agreement", "0.95", "--json", str(rep), "--pareto", str(pareto),
                                    "--no-latency", "--time-budget", "60s"])
    assert res.exit_code == 0, res.output
    with open(rep) as fh:
        report = json.load(fh)
    assert any(r["chosen"] for r in report["search"]) and report["verification_heldout"]
    assert pareto.read_text().splitlines()[0].startswith("candidate,")
    again = tmp_path / "b.onnx"
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", str(again), "--recipe", str(rep),
                                    "--min-agreement", "0.95", "--no-latency"])
    assert res.exit_code == 0, res.output
    assert onnx.load(str(out)).SerializeToString() == onnx.load(str(again)).SerializeToString()


@pytest.mark.parametrize("args, code, words", [
    (["--objective", "speed", "--min-agreement", "0.9"], 2, "speed"),
    (["--objective", "macs"], 2, "exactly one budget"),
    (["--objective", "macs", "--min-agreement", "0.9", "--max-output-error", "1"], 2, "exactly one budget"),
    (["--objective", "macs", "--min-agreement", "0.9", "--jobs", "0"], 2, "--jobs"),
    (["--objective", "macs", "--min-agreement", "0.9", "--passes", "remove-dead"], 2, "builds the recipe"),
    (["--jobs", "2"], 2, "add --objective"),
    (["--objective", "macs", "--min-agreement", "0.9", "--time-budget", "soon"], 2, "duration"),
    (["--objective", "macs", "--max-accuracy-drop", "1"], 4, "cannot support a 1-point budget"),
])
def test_bad_search_input_writes_nothing(tmp_path, args, code, words):
    out = tmp_path / "x.onnx"
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", str(out), "--no-latency"] + args)
    assert res.exit_code == code, res.output
    assert words in res.output and not os.path.exists(out)


def test_ray_missing_is_a_usage_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    out = tmp_path / "x.onnx"
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", str(out), "--objective", "macs",
                                    "--min-agreement", "0.9", "--backend", "ray"])
    assert res.exit_code == 2 and "onnx-lincomp[ray]" in res.output and not out.exists()
