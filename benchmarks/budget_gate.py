"""Does the accuracy-budget gate keep its promise on data the choice never saw?

    python benchmarks/budget_gate.py

For each model and budget (0.5, 1, 2 points) the linear-rate search runs with the paired upper bound as
the gate, on the held-out split and with ``--gate-on all``; the chosen model is then scored on unseen data:

* bundled digits MLP: optimize sees the bundled 540 samples (digits' 30 % test split); unseen = the other
  1,257 digits images (the model's training split: the choice never saw them);
* trained/own_fmnist_mlp_l1.onnx: optimize sees the first 2,000 Fashion-MNIST test images; unseen = the
  other 8,000.

The "point rule" row is the old gate (observed drop <= budget on the held-out split) for comparison.
Prints a table and writes benchmarks/results/budget_gate.json.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SHARED, read_idx  # noqa: E402
from onnx_lincomp.calibration import input_specs, open_calibration  # noqa: E402
from onnx_lincomp.errors import VerificationGateError  # noqa: E402
from onnx_lincomp.evaluate.evaluator import Evaluator  # noqa: E402
from onnx_lincomp.examples import example_paths  # noqa: E402
from onnx_lincomp.model_io import load_model  # noqa: E402
from onnx_lincomp.optimize import OptimizeOptions, optimize, with_linear_rate  # noqa: E402
from onnx_lincomp.recipe import CalibrationSettings, Recipe  # noqa: E402

BUDGETS = (0.5, 1.0, 2.0)


def digits_data(tmp: Path) -> tuple[str, str, str]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    model, calib = example_paths("digits-mlp")
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    xtr, _, ytr, _ = train_test_split(x, d.target.astype(np.int64), test_size=0.3, random_state=0, stratify=d.target)
    np.savez(tmp / "digits_unseen.npz", input=xtr, y=ytr)
    return str(model), str(calib), str(tmp / "digits_unseen.npz")


def fmnist_data(tmp: Path) -> tuple[str, str, str]:
    images = read_idx(SHARED / "data" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = read_idx(SHARED / "data" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    np.savez(tmp / "fm_seen.npz", input=images[:2000], y=labels[:2000])
    np.savez(tmp / "fm_unseen.npz", input=images[2000:], y=labels[2000:])
    return (str(SHARED / "models" / "trained" / "own_fmnist_mlp_l1.onnx"), str(tmp / "fm_seen.npz"),
            str(tmp / "fm_unseen.npz"))


def unseen_drop(original_path: str, model, unseen: str) -> dict:
    loaded = load_model(original_path)
    from onnx_lincomp.model_io import to_model_proto

    source = open_calibration(unseen, input_specs(loaded.graph), labels="y")
    v = Evaluator(to_model_proto(loaded.graph, loaded.ctx), loaded.graph, source, labels="y").score(model)
    return {"unseen_samples": v.samples, "unseen_drop": v.paired.drop_points, "unseen_low": v.paired.lower_points,
            "unseen_high": v.paired.upper_points}


def run(name: str, model: str, calib: str, unseen: str, budget: float, gate_on: str) -> dict:
    options = OptimizeOptions(Recipe(calibration=CalibrationSettings(0.2)), labels="y", max_accuracy_drop=budget,
                              gate_on=gate_on, search=True, latency=False)
    row = {"model": name, "budget": budget, "gate": gate_on}
    try:
        result = optimize(model, calib, options)
    except VerificationGateError as exc:
        return dict(row, refused=str(exc))
    r = result.report
    gate = r.on_all or r.on_heldout
    rate = r.recipe.spec("fold-linear").options.linear_rate
    row.update(linear_rate=rate, params_before=r.before.params, params_after=r.after.params,
               gate_samples=gate.samples, gate_drop=gate.paired.drop_points, gate_high=gate.paired.upper_points)
    point = [c for c in r.search if c["drop_points"] is not None and c["drop_points"] <= budget]
    row["point_rule_rate"] = min(point, key=lambda c: c["params"])["linear_rate"] if point else None
    return dict(row, **unseen_drop(model, result.model, unseen))


def point_rule(name: str, model: str, calib: str, unseen: str, budget: float, rate: float) -> dict:
    """The old gate's pick (observed held-out drop within budget), rebuilt and scored on unseen data."""
    recipe = with_linear_rate(Recipe(calibration=CalibrationSettings(0.2)), rate)
    result = optimize(model, calib, OptimizeOptions(recipe, labels="y", latency=False, allow_larger=True,
                                                    max_output_change=None))
    return {"model": name, "budget": budget, "gate": "point rule (old)", "linear_rate": rate,
            "params_after": result.report.after.params, **unseen_drop(model, result.model, unseen)}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = [("digits-mlp (bundled)", *digits_data(Path(tmp)))]
        if SHARED.is_dir():
            sets.append(("own_fmnist_mlp_l1", *fmnist_data(Path(tmp))))
        for name, model, calib, unseen in sets:
            for budget in BUDGETS:
                held = run(name, model, calib, unseen, budget, "heldout")
                rows += [held, run(name, model, calib, unseen, budget, "all")]
                rate = held.get("point_rule_rate") or rows[-1].get("point_rule_rate")
                if rate is not None:
                    rows.append(point_rule(name, model, calib, unseen, budget, rate))
                for r in rows[-3:]:
                    _print(r)
    out = HERE / "results" / "budget_gate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


def _print(r: dict) -> None:
    head = f"{r['model']:<22} budget {r['budget']:<4} {r['gate']:<17}"
    if "refused" in r:
        print(f"{head} refused: {r['refused'][:110]}")
        return
    gate = (f"gate drop {r['gate_drop']:+.2f} [..{r['gate_high']:.2f}] on {r['gate_samples']}" if "gate_drop" in r
            else "gate: observed drop only")
    print(f"{head} rate {r['linear_rate']:<5} params {r['params_after']:>8,}  {gate:<36} unseen drop "
          f"{r['unseen_drop']:+.2f} [{r['unseen_low']:+.2f}, {r['unseen_high']:+.2f}] on {r['unseen_samples']}"
          f"  {'KEPT' if r['unseen_drop'] <= r['budget'] else 'BROKEN'}")


if __name__ == "__main__":
    main()
