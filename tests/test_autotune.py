"""optimize --objective: the search across passes stays inside its budget, is the same with 1 or 2 workers
(and on a local Ray cluster), writes a recipe that replays the output byte for byte, and refuses bad input."""
import json
import os

import onnx
import pytest
from click.testing import CliRunner

from onnx_lincomp.autotune import Budget
from onnx_lincomp.autotune.judge import Outcome
from onnx_lincomp.autotune.layer_knobs import resolve_knobs
from onnx_lincomp.autotune.pareto import pareto_flags
from onnx_lincomp.autotune.search import Move, SearchOptions, _greedy, _Latency, _Walk, run_search
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
    assert "prune-layers" not in [k.name for k in default_knobs("latency")]  # opt-in: --search-per-layer
    knobs = default_knobs("latency", per_layer=True)
    assert [k.name for k in knobs][:2] == ["prune", "low-rank"] or [k.name for k in knobs][0] == "prune"
    full = tuple(0 if k.family != "prune" or k.name == "prune" else None for k in knobs)
    recipe = setting_recipe(knobs, full, CalibrationSettings())
    names = [s.name for s in recipe.passes]
    assert names[:3] == ["remove-dead", "fold-linear", "merge-affine"]
    assert names.index("prune-channels") == 3
    assert names.count("prune-channels") == 1  # one knob per family
    unresolved = [k for k in knobs if not k.choices]
    assert [k.name for k in unresolved] == ["prune-layers"]
    # the latency objective keeps remove-dead's widths at the CPU's NCHWc block; the others remove every dead unit
    from onnx_lincomp.analysis.layer_latency import nchwc_block
    aligned = setting_recipe(knobs, full, CalibrationSettings(), "latency").passes[0]
    assert aligned.name == "remove-dead" and aligned.options.channel_multiple == nchwc_block()
    assert setting_recipe(knobs, full, CalibrationSettings(), "size").passes[0].options.channel_multiple == 1
    assert len(neighbours(knobs, (None,) * len(knobs))) == len(knobs) - 1
    with pytest.raises(OptionError):
        default_knobs("speed")


def test_the_latency_objective_at_a_serving_batch():
    """--latency-batch N: candidates are timed at N samples a run, and INT8 judges its own speed-up there too
    (a model INT8 slows at batch 1 may still gain at the batch it is served at)."""
    quantize = next(k for k in default_knobs("latency", latency_batch=32) if k.name == "quantize")
    assert dict(quantize.choices[0].options) == {"latency_batch": 32}
    assert dict(next(k for k in default_knobs("latency") if k.name == "quantize").choices[0].options) == {}
    with pytest.raises(OptionError, match="latency-batch"):
        SearchOptions("latency", AGREEMENT, latency_batch=0)
    model, calib = (str(p) for p in example_paths("digits-cnn"))
    prep = prepare(model, calib, Recipe(calibration=CalibrationSettings(verify_split=0.3)), "y")
    for batch in (1, 8):
        timer = _Latency(prep, SearchOptions("latency", AGREEMENT, latency_batch=batch), {})
        assert timer.batch == batch and all(len(v) == batch for v in timer.feeds.values())


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
    (["--objective", "macs", "--max-mean-error", "0.1", "--max-output-error", "1"], 2, "exactly one budget"),
    (["--objective", "macs", "--min-agreement", "0.9", "--jobs", "0"], 2, "--jobs"),
    (["--objective", "macs", "--min-agreement", "0.9", "--passes", "remove-dead"], 2, "builds the recipe"),
    (["--jobs", "2"], 2, "add --objective"),
    (["--objective", "macs", "--min-agreement", "0.9", "--time-budget", "soon"], 2, "duration"),
    (["--objective", "macs", "--max-accuracy-drop", "1"], 4, "cannot support a 1-point budget"),
    (["--latency-batch", "4"], 2, "add --objective"),
    (["--objective", "macs", "--min-agreement", "0.9", "--latency-batch", "4"], 2, "--latency-batch applies"),
    (["--objective", "latency", "--min-agreement", "0.9", "--latency-batch", "0"], 2, "--latency-batch"),
])
def test_bad_search_input_writes_nothing(tmp_path, args, code, words):
    out = tmp_path / "x.onnx"
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", str(out), "--no-latency"] + args)
    assert res.exit_code == code, res.output
    assert words in res.output and not os.path.exists(out)


def test_mean_error_budget_judges_the_mean_not_the_max():
    """A dense output: one flipped pixel sets the max; the mean budget reads what the whole map lost."""
    from onnx_lincomp.evaluate.evaluator import OutputError, Verification

    flip = Verification(100, (OutputError("map", max_abs=1.0, mean_abs=0.002, rel_max=1.0, top1_agreement=None),))
    assert Budget("mean_error", 0.01).within(flip) and not Budget("output_error", 0.3).within(flip)
    assert Budget("mean_error", 0.01).damage(flip) == 0.002
    assert not Budget("mean_error", 0.001).within(flip)  # must not fire only on the max
    assert Budget("mean_error", 0.01).describe() == "mean abs output error <= 0.01"


def test_mean_error_gate_and_search(tmp_path):
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", str(out), "--no-latency",
                                    "--passes", "prune-channels", "--target-macs", "0.3", "--max-mean-error", "1e-6"])
    assert res.exit_code == 4 and "exceeds --max-mean-error" in res.output and not out.exists()
    res = CliRunner().invoke(main, ["optimize", "--example", "digits-cnn", "-o", str(out), "--no-latency",
                                    "--objective", "macs", "--max-mean-error", "0.5",
                                    "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification_heldout"]["outputs"][0]["mean_abs"] <= 0.5
    assert any("mean abs output error <= 0.5" in m for m in report["messages"])


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


# ---- look-ahead and back-off, on a stub judge whose error is not monotone in the level ---------------------
class _V:
    """The two fields an output-error budget reads."""

    def __init__(self, max_abs):
        self.non_finite, self.max_abs = False, max_abs


class _StubExecutor:
    """Scores a recipe from a table: level index of each knob -> (error, MACs saved)."""

    def __init__(self, knobs, table):
        self.knobs, self.table, self.calls = knobs, table, 0

    def map(self, recipes):
        out = []
        for r in recipes:
            self.calls += 1
            err, macs = 0.0, 1000
            for spec in r["passes"]:
                for k, knob in enumerate(self.knobs):
                    for i, c in enumerate(knob.choices):
                        if spec["name"] == c.pass_name and all(spec.get(o) == v for o, v in c.options.items()):
                            e, saved = self.table[k][i]
                            err, macs = err + e, macs - saved
            out.append(Outcome(r, macs=macs, size_bytes=macs, verification=_V(err)))
        return out

    def close(self):
        pass


def _levels(name, values, stride=1):
    return Knob(name, tuple(Choice("prune-channels", {"target_macs": v}) for v in values), frozenset({"macs"}),
                stride=stride)


def _stub_search(knobs, table, **kw):
    options = SearchOptions("macs", Budget("output_error", 1.0), **kw)
    ex = _StubExecutor(knobs, table)
    return _greedy(None, knobs, CalibrationSettings(), options, ex, 0.0, None), ex


def test_a_noisy_miss_does_not_freeze_the_knob():
    knobs = (_levels("prune", (0.9, 0.8, 0.7, 0.6, 0.5)),)
    # level 1 misses (noise), levels 2 and 3 are inside, level 4 misses
    table = [[(0.2, 100), (1.5, 200), (0.6, 300), (0.9, 400), (3.0, 500)]]
    frozen, _ = _stub_search(knobs, table, lookahead=0)
    assert frozen.chosen.outcome.macs == 900  # the old behaviour: stuck at the first miss
    result, ex = _stub_search(knobs, table, lookahead=2)
    assert result.chosen.outcome.macs == 600 and result.chosen.within
    assert "look-ahead" in [s.move for s in result.scored]
    assert ex.calls == len(result.scored) <= 6  # bounded, nothing scored twice
    counts = result.counts()
    assert counts["scored"] == len(result.scored) and counts["look-ahead"] >= 1


def test_back_off_is_layer_by_layer_and_bounded():
    # a fine chain stepped 3 at a time: index 5 misses, the back-offs 4 then 3 are tried one move at a time
    knobs = (_levels("prune-layers", tuple(0.95 - 0.05 * i for i in range(9)), stride=3),)
    table = [[(0.1 * i, 50 * (i + 1)) if i < 4 else (2.0, 50 * (i + 1)) for i in range(9)]]
    result, _ = _stub_search(knobs, table, lookahead=0, backoffs=2)
    moves = [(s.move, s.setting[0]) for s in result.scored]
    assert ("back-off", 4) in moves and ("back-off", 3) in moves
    assert result.chosen.setting == (3,)
    result, _ = _stub_search(knobs, table, lookahead=0, backoffs=1)
    assert result.chosen.setting == (2,)  # one back-off allowed, to index 4, which misses


def test_a_miss_trades_with_the_knob_that_used_most_budget():
    knobs = (_levels("a", (0.91, 0.81)), _levels("b", (0.92, 0.82)))
    # alone, a=1 and b=1 each save 200 (a comes first); together the walk reaches a=1, b=0; a=1 with b=1
    # misses; a=0 with b=1 (a backed off) fits and saves more
    table = [[(0.1, 100), (0.3, 200)], [(0.2, 50), (0.8, 200)]]
    result, _ = _stub_search(knobs, table, lookahead=0)
    assert [s.move for s in result.scored if s.setting == (0, 1)] == ["trade"]
    assert result.chosen.setting == (0, 1) and result.chosen.within


def test_the_combination_starts_from_the_best_single_knob():
    """Each knob is walked alone first, so the combined answer is never worse than a single-knob search: here
    the cheap first step of knob a (best gain per unit of budget) would lead the joint walk to a=1 + b=0,
    while b alone goes further."""
    knobs = (_levels("a", (0.91, 0.81)), _levels("b", (0.92, 0.82, 0.72)))
    table = [[(0.01, 100), (0.02, 150)], [(0.4, 50), (0.5, 400), (0.6, 700)]]
    result, _ = _stub_search(knobs, table, lookahead=0)
    alone = [_stub_search((k,), [t], lookahead=0)[0].chosen.outcome.macs for k, t in zip(knobs, table, strict=True)]
    assert result.chosen.outcome.macs <= min(alone) and result.chosen.within
    singles = [s.setting for s in result.scored if s.setting.count(None) == 1]
    assert (None, 2) in singles and (1, None) in singles


def test_single_knob_walks_leave_room_and_time_is_checked_first():
    knobs = (_levels("a", (0.9, 0.8, 0.7, 0.6, 0.5)), _levels("b", (0.91, 0.81, 0.71, 0.61, 0.51)))
    table = [[(0.01 * i, 100 * i) for i in range(1, 6)], [(0.01 * i, 90 * i) for i in range(1, 6)]]
    result, ex = _stub_search(knobs, table, lookahead=0, max_candidates=7)
    assert ex.calls == len(result.scored) <= 7
    assert any(None not in s.setting for s in result.scored)  # the joint walk still ran
    # a spent time budget scores nothing after the exact passes (the stub's clock started long ago)
    result, ex = _stub_search(knobs, table, time_budget_s=1.0)
    assert ex.calls == 1 and "time budget" in result.stopped


def test_a_step_to_the_same_model_moves_the_knob_on():
    """Coarse widths map levels 1 and 2 to one model: the walk steps over it instead of freezing the knob."""
    knobs = (_levels("prune", (0.9, 0.8, 0.7, 0.6)),)
    table = [[(0.1, 100), (0.2, 300), (0.2, 300), (0.3, 500)]]
    result, _ = _stub_search(knobs, table, lookahead=0)
    assert result.chosen.setting == (3,) and result.chosen.outcome.macs == 500


def test_the_candidate_limit_is_kept_and_reported():
    knobs = (_levels("prune", (0.9, 0.8, 0.7, 0.6, 0.5)),)
    table = [[(0.1, 100), (0.2, 200), (0.3, 300), (0.4, 400), (0.5, 500)]]
    result, ex = _stub_search(knobs, table, max_candidates=3)
    assert ex.calls == len(result.scored) == 3 and "candidate limit of 3" in result.stopped


def test_walk_frontier_looks_ahead_then_stops():
    knob = _levels("prune", (0.9, 0.8, 0.7, 0.6, 0.5, 0.4))
    walk = _Walk((knob,), SearchOptions("macs", AGREEMENT, lookahead=1))
    miss = type("S", (), {"within": False})()
    assert walk.frontier((0,)) == [Move((1,), 0, "step")]
    walk.record(Move((1,), 0, "step"), miss)
    assert walk.frontier((0,)) == [Move((2,), 0, "look-ahead")]
    walk.record(Move((2,), 0, "look-ahead"), miss)
    assert walk.frontier((0,)) == []  # one look-ahead spent: the knob is done
    walk.moved(0, 0.1)
    assert walk.frontier((0,)) == [Move((1,), 0, "step")]


# ---- per-layer knobs ----------------------------------------------------------------------------------------
def test_per_layer_knob_recipes_name_real_layers_and_replay(tmp_path):
    from onnx_lincomp.analysis.unit_sets import UnitEvidence
    from onnx_lincomp.optimize import compress

    model, calib = (str(p) for p in example_paths("digits-cnn"))
    cal = CalibrationSettings(verify_split=0.3)
    prep = prepare(model, calib, Recipe(calibration=cal), "y")
    stats = calibrate(prep)
    knobs, scans = resolve_knobs(default_knobs("macs", per_layer=True), prep, stats, calib, cal, "y", "macs")
    layer_knob = next(k for k in knobs if k.name == "prune-layers")
    assert len(layer_knob.choices) >= 2 and scans[0].candidates > 0 and scans[0].layers >= 2
    # the chain moves one layer one level at a time
    a, b = layer_knob.choices[0].options["layers"], layer_knob.choices[1].options["layers"]
    assert sum(1 for k in set(a) | set(b) if a.get(k) != b.get(k)) == 1
    j = knobs.index(layer_knob)
    setting = tuple(1 if i == j else None for i in range(len(knobs)))
    recipe = setting_recipe(knobs, setting, cal)
    ev = UnitEvidence.from_stats(stats)
    first, records = compress(prep, ev, recipe)
    assert any(r.result.changed for r in records if r.result.name == "prune-channels")
    again, _ = compress(prep, ev, Recipe.from_dict(json.loads(json.dumps(recipe.as_dict()))))
    assert first.SerializeToString() == again.SerializeToString()
    onnx.checker.check_model(first, full_check=True)
