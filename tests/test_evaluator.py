"""evaluate/: paired accuracy-drop intervals, budget checks, and the Evaluator's cached scoring."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import mlp_model, run
from onnx_lincomp.calibration import CalibrationSource, input_specs
from onnx_lincomp.evaluate import (
    Evaluator,
    PairedDrop,
    accuracy_interval,
    budget_supportable,
    drop_interval,
    model_accuracy,
)
from onnx_lincomp.model_io import model_from_proto
from onnx_lincomp.runtime import session as runtime_session
from onnx_lincomp.verify import compare_models

Z2 = 1.959963984540054 ** 2


# ---- paired maths -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [10, 100, 1000])
def test_no_discordant_samples_give_the_wilson_bound(n):
    iv = drop_interval(0, 0, n)
    assert iv.estimate == 0.0 and iv.lower < 0.0 < iv.upper
    assert iv.upper == pytest.approx(Z2 / (n + Z2), rel=1e-9) and iv.lower == pytest.approx(-iv.upper)


def test_interval_shrinks_with_more_samples():
    widths = [drop_interval(k, k // 2, n).upper - drop_interval(k, k // 2, n).lower
              for k, n in ((4, 100), (40, 1000), (400, 10000))]
    assert widths[0] > widths[1] > widths[2]


def test_tango_interval_matches_published_example():
    # Fagerland, Lydersen & Laake (2013), Bentur et al. data: n = 21, b = 1, c = 7; Tango: -0.517 to -0.026
    iv = drop_interval(1, 7, 21)
    assert iv.estimate == pytest.approx(-6 / 21)
    assert (round(iv.lower, 3), round(iv.upper, 3)) == (-0.517, -0.026)
    mirrored = drop_interval(7, 1, 21)
    assert (mirrored.lower, mirrored.upper) == pytest.approx((-iv.upper, -iv.lower))


def test_interval_edges():
    assert drop_interval(20, 0, 20).upper == 1.0 and drop_interval(0, 20, 20).lower == -1.0
    with pytest.raises(ValueError):
        drop_interval(3, 3, 5)


def test_wilson_accuracy_interval_by_hand():
    iv = accuracy_interval(90, 100)
    # (0.9 + z²/200 ± z sqrt(0.09/100 + z²/40000)) / (1 + z²/100)
    z = Z2 ** 0.5
    half = z * (0.09 / 100 + Z2 / 40000) ** 0.5
    assert (iv.lower, iv.upper) == pytest.approx(((0.9 + Z2 / 200 - half) / (1 + Z2 / 100),
                                                  (0.9 + Z2 / 200 + half) / (1 + Z2 / 100)))


def test_paired_drop_from_correctness():
    before = np.array([1, 1, 1, 0, 0, 1, 1, 1], bool)
    after = np.array([1, 0, 1, 1, 0, 1, 0, 1], bool)
    d = PairedDrop.of(before, after)
    assert (d.n, d.both_right, d.worse, d.better) == (8, 4, 2, 1)
    assert d.drop_points == pytest.approx(12.5) and d.lower_points < 12.5 < d.upper_points
    assert d.accuracy_before.estimate == pytest.approx(6 / 8) and d.accuracy_after.estimate == pytest.approx(5 / 8)
    assert d.within(d.upper_points) and not d.within(d.upper_points - 0.01)


def test_budget_supportable():
    # the best bound (b = c = 0) is z² / (n + z²): within 1 point from n >= z² * 0.99 / 0.01 = 380.3
    small, enough = budget_supportable(380, 1.0), budget_supportable(381, 1.0)
    assert not small and enough and small.samples_needed == enough.samples_needed == 381
    assert "cannot support" in small.message and "381" in small.message
    big = budget_supportable(2000, 1.0)
    assert big.max_worse >= 1
    assert drop_interval(big.max_worse, 0, 2000).upper <= 0.01 < drop_interval(big.max_worse + 1, 0, 2000).upper


# ---- evaluator ---------------------------------------------------------------------------------
def _labelled(model: onnx.ModelProto, rng, n: int = 50):
    graph = model_from_proto(model).graph
    x = rng.random((n, 6), dtype=np.float32)
    y = run(model, {"x": x})[0].argmax(1)
    y[::5] = (y[::5] + 1) % 3  # the original is wrong on every fifth sample
    source = CalibrationSource(input_specs(graph), arrays={"x": x, "y": y}, labels="y", description="arrays")
    return graph, source, x, y


def _perturbed(model: onnx.ModelProto, scale: float, nan: bool = False) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    w = numpy_helper.to_array(m.graph.initializer[-2]).copy()
    w *= scale
    if nan:
        w[0, 0] = np.nan
    m.graph.initializer[-2].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[-2].name))
    return m


def test_original_runs_once(monkeypatch, rng):
    model = mlp_model(rng, [6, 8, 3])
    graph, source, _, _ = _labelled(model, rng)
    opened = []
    real = runtime_session.open_session
    monkeypatch.setattr(runtime_session, "open_session", lambda m, *a, **k: opened.append(m) or real(m, *a, **k))
    ev = Evaluator(model, graph, source, 10, 50, labels="y", batch_size=16)
    assert opened == [model]
    ev.score(_perturbed(model, 1.1))
    ev.score(_perturbed(model, 0.9))
    assert len(opened) == 3 and opened.count(model) == 1


def test_score_matches_numpy_and_compare_models(rng):
    model = mlp_model(rng, [6, 8, 3])
    cand = _perturbed(model, 1.2)
    graph, source, x, y = _labelled(model, rng)
    score = Evaluator(model, graph, source, 10, 50, labels="y", batch_size=16).score(cand)
    a, b = run(model, {"x": x[10:50]})[0], run(cand, {"x": x[10:50]})[0]
    out = score.outputs[0]
    assert score.samples == 40 and out.non_finite == 0
    assert out.max_abs == pytest.approx(np.abs(a - b).max(), rel=1e-6)
    assert out.mean_abs == pytest.approx(np.abs(a - b).mean(), rel=1e-6)
    assert out.rel_max == pytest.approx(np.abs(a - b).max() / np.abs(a).max(), rel=1e-6)
    assert out.top1_agreement == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert score.accuracy_before == pytest.approx(np.mean(a.argmax(1) == y[10:50]))
    assert score.accuracy_after == pytest.approx(np.mean(b.argmax(1) == y[10:50]))
    assert score.paired.drop_points == pytest.approx(100 * (score.accuracy_before - score.accuracy_after))
    assert score.accuracy_after == pytest.approx(model_accuracy(cand, graph, source, "y", 10, 50))
    assert compare_models(model, cand, graph, source, 10, 50, batch_size=16, labels="y") == score
    assert score.as_dict()["accuracy_drop"]["upper_points"] == score.paired.upper_points


def test_nan_outputs_are_flagged_not_zero(rng):
    model = mlp_model(rng, [6, 8, 3])
    graph, source, _, _ = _labelled(model, rng)
    ev = Evaluator(model, graph, source, labels="y")
    bad = ev.score(_perturbed(model, 1.0, nan=True))
    assert bad.non_finite > 0 and bad.max_abs == float("inf") and not bad.within(1e9)
    same = ev.score(model)
    assert same.non_finite == 0 and same.max_abs == 0.0 and same.within(0.0)
    assert same.paired.worse == same.paired.better == 0 and same.paired.upper_points > 0


def test_same_non_finite_values_are_not_flagged(rng):
    nan_model = _perturbed(mlp_model(rng, [6, 8, 3]), 1.0, nan=True)
    graph, source, _, _ = _labelled(mlp_model(rng, [6, 8, 3]), rng)
    assert Evaluator(nan_model, graph, source).score(nan_model).non_finite == 0


def test_evaluator_latency_compares_against_the_original(rng):
    model = mlp_model(rng, [6, 8, 3])
    graph, source, _, _ = _labelled(model, rng)
    from onnx_lincomp.runtime.latency import CompareOptions

    (cmp,) = Evaluator(model, graph, source).latency(model, (4,), CompareOptions(round_ms=2.0))
    # the same model against itself: a ratio near 1 (the verdict itself is left to benchmarks/latency_noise.py,
    # since a loaded CI machine can tip 2 ms rounds either way)
    assert cmp.latencies[1].batch_size == 4 and 0.5 < cmp.ratios[1].ratio < 2.0


def test_tensor_errors_are_relative_and_leave_out_changed_widths(rng):
    """Intermediate-tensor errors: 0 for the model against itself, ||c - r|| / ||r|| for a perturbed layer (checked
    by hand in numpy), and a tensor whose width differs between the models is left out, not broadcast."""
    from onnx_lincomp.evaluate.tensor_errors import tensor_errors

    model = mlp_model(rng, [6, 8, 3])
    graph = model_from_proto(model).graph
    x = rng.random((40, 6), dtype=np.float32)
    source = CalibrationSource(input_specs(graph), arrays={"x": x})
    hidden = model.graph.node[0].output[0]
    assert tensor_errors(model, model, [hidden], graph, source, 0, None, 16) == {hidden: 0.0}
    bumped = onnx.ModelProto.FromString(model.SerializeToString())
    w = bumped.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.1, w.name))
    got = tensor_errors(model, bumped, [hidden], graph, source, 0, None, 16)[hidden]
    exposed = [onnx.ModelProto.FromString(m.SerializeToString()) for m in (model, bumped)]
    for m in exposed:
        m.graph.output.extend([onnx.helper.make_empty_tensor_value_info(hidden)])
    ref, cand = (run(m, {"x": x})[-1].astype(np.float64) for m in exposed)
    assert got == pytest.approx(np.linalg.norm(cand - ref) / np.linalg.norm(ref), rel=1e-5)
    narrow = mlp_model(rng, [6, 5, 3])  # same tensor names, hidden width 5 instead of 8
    assert tensor_errors(model, narrow, [hidden], graph, source, 0, None, 16) == {}
