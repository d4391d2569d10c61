"""Compression table on every model in ../shared/models and the bundled examples.

    python benchmarks/real_models.py [--latency]

Default (exact) rates: dead 0, linear 1. MNIST / Fashion-MNIST models are calibrated on the first 2,000
test images and verified on the other 8,000; crepe on 80% of its frames; the others on random data
(verified on fresh random samples). With ``--latency`` the batch-1 ratio after / before is the median of
interleaved rounds (one pinned thread). A run the verification gate refuses is a row with its error. Prints a
table and writes benchmarks/results/real_models.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SHARED  # noqa: E402
from onnx_lincomp.errors import LincompError  # noqa: E402
from onnx_lincomp.examples import example_paths  # noqa: E402
from onnx_lincomp.optimize import OptimizeOptions, optimize  # noqa: E402
from onnx_lincomp.recipe import CalibrationSettings, Recipe  # noqa: E402
from real_models import REAL_MODELS, calibration_file  # noqa: E402

# the PP-OCR models on more text than the tests use: 512 lines (half turned: the label), 64 pages at the tests' 96x96
BENCH_SAMPLES = {"text-lines": 512, "text-pages": 64}


def row(name, result, seconds):
    r = result.report
    removed = sum(p.result.neurons_removed for p in r.passes)
    folded = sum(p.result.neurons_folded for p in r.passes)
    held, cal = r.on_heldout, r.on_calibration
    lat = r.after.change_b1.ratio if r.after.change_b1 else None  # interleaved rounds, median ratio
    return {"model": name, "calibration": f"{r.calibration_samples}{' random' if r.random_calibration else ''}",
            "removed": removed, "folded": folded, "params_before": r.before.params, "params_after": r.after.params,
            "macs_before": r.before.macs, "macs_after": r.after.macs, "latency_ratio_b1": lat,
            "calib_max_abs": cal.max_abs, "calib_exact_1e-5": cal.within(1e-5),
            "heldout_max_abs": held.max_abs if held else None,
            "acc_before": held.accuracy_before if held else None, "acc_after": held.accuracy_after if held else None,
            "seconds": seconds, "skipped": {k: v for p in r.passes for k, v in p.result.skipped.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", action="store_true", help="also measure latency (slower)")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: this benchmark needs ../shared/models")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in REAL_MODELS:
            labelled = spec.data.startswith(("mnist", "fmnist"))
            full = replace(spec, samples=BENCH_SAMPLES.get(spec.data, 10000 if labelled else spec.samples))
            calib = calibration_file(full, Path(tmp))
            split = 0.8 if labelled else (0.2 if spec.data in ("crepe", "digits") else
                                          0.5 if spec.data.startswith("text") else 0.0)
            recipe = Recipe(calibration=CalibrationSettings(verify_split=split,
                                                            input_shapes=tuple(spec.input_shapes.items())))
            # min_samples 1: the random-data models keep the tests' small sample counts (their statistics are
            # labelled 'random' in the table); the minimum guards users' real data
            options = OptimizeOptions(recipe, labels="y" if labelled or spec.data in ("digits", "text-lines") else None,
                                      latency=args.latency, batch_size=16, min_samples=1)
            start = time.perf_counter()
            try:
                result = optimize(SHARED / "models" / spec.path, calib, options)
            except LincompError as exc:  # a gate refusal is a row of the table (the statistics did not hold)
                rows.append({"model": spec.path, "error": f"exit {exc.exit_code}: {exc}"})
                continue
            rows.append(row(spec.path, result, time.perf_counter() - start))
        for name in ("digits-mlp", "digits-cnn"):
            model, calib = example_paths(name)
            start = time.perf_counter()
            result = optimize(model, calib, OptimizeOptions(labels="y", latency=args.latency))
            rows.append(row(f"example {name}", result, time.perf_counter() - start))
    print(f"{'model':<52} {'calib':>11} {'rm':>4} {'fold':>4} {'params before':>13} {'after':>10} {'MACs before':>12} "
          f"{'after':>12} {'lat':>6} {'acc before':>10} {'after':>7} {'exact':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['model'][-52:]:<52} {r['error'][:150]}")
            continue
        lat = "-" if r["latency_ratio_b1"] is None else f"{r['latency_ratio_b1']:.2f}"
        acc_b = "-" if r["acc_before"] is None else f"{100 * r['acc_before']:.2f}"
        acc_a = "-" if r["acc_after"] is None else f"{100 * r['acc_after']:.2f}"
        print(f"{r['model'][-52:]:<52} {r['calibration']:>11} {r['removed']:>4} {r['folded']:>4} "
              f"{r['params_before']:>13,} {r['params_after']:>10,} "
              f"{r['macs_before']:>12,} {r['macs_after']:>12,} {lat:>6} {acc_b:>10} {acc_a:>7} "
              f"{str(r['calib_exact_1e-5']):>5}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "real_models.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
