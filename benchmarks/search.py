"""The search across passes (``optimize --objective latency``) against the best single pass at the same budget.

For each model and budget: the combined search (every knob) and the same search restricted to one knob
(pruning alone, low-rank alone, INT8 alone), each ending in a verified model; the table gives the batch-1
and batch-32 latency ratios against the original (interleaved rounds, pinned threads), the size ratio and
the held-out accuracy (or agreement). A budget the held-out split cannot support is reported as such.

    python benchmarks/search.py [--quick] [--jobs 2]

Writes benchmarks/results/search.json. Timings on a shared 2-core machine: compare within one run only.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from onnx_lincomp.autotune import Budget, default_knobs  # noqa: E402
from onnx_lincomp.autotune.run import optimize_within_budget  # noqa: E402
from onnx_lincomp.autotune.search import SearchOptions  # noqa: E402
from onnx_lincomp.errors import LincompError  # noqa: E402
from onnx_lincomp.examples import example_paths  # noqa: E402
from onnx_lincomp.optimize import OptimizeOptions  # noqa: E402
from onnx_lincomp.recipe import CalibrationSettings, Recipe  # noqa: E402


def models(tmp: Path, quick: bool):
    from conftest import SHARED
    from real_models import RealModel, calibration_file

    m, c = (str(p) for p in example_paths("digits-cnn"))
    out = [("digits-cnn", m, c, "y", CalibrationSettings(verify_split=0.2), ("accuracy_drop", (0.5, 1.0, 2.0)))]
    if (SHARED / "models").is_dir():
        fm = calibration_file(RealModel("trained/own_fmnist_cnn_bn.onnx", "fmnist-4d", 10000), tmp)
        out.append(("fmnist-cnn", str(SHARED / "models/trained/own_fmnist_cnn_bn.onnx"), fm, "y",
                    CalibrationSettings(verify_split=0.8, max_samples=10000), ("accuracy_drop", (0.5, 1.0, 2.0))))
        if not quick:
            mlp = calibration_file(RealModel("trained/own_fmnist_mlp_l1.onnx", "fmnist", 10000), tmp)
            out.append(("fmnist-mlp", str(SHARED / "models/trained/own_fmnist_mlp_l1.onnx"), mlp, "y",
                        CalibrationSettings(verify_split=0.8, max_samples=10000), ("accuracy_drop", (0.5, 1.0, 2.0))))
            out.append(("ultraface", str(SHARED / "models/real/ortexamples_ultraface_RFB-320_bnfolded.onnx"),
                        "random:32", None, CalibrationSettings(), ("output_error", (0.05,))))
    return out


def run_one(name, model, calib, labels, cal, kind, value, knobs, jobs):
    options = OptimizeOptions(Recipe(calibration=cal), labels=labels, threads=1, batch_size=32)
    search = SearchOptions("latency", Budget(kind, value), jobs=jobs, threads=1, batch_size=32)
    start = time.perf_counter()
    try:
        result, found = optimize_within_budget(model, calib, options, replace(search), knobs=knobs)
    except LincompError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - start}
    r = result.report
    held = r.on_heldout
    return {"chosen": next((row["candidate"] for row in r.search if row["chosen"]), None),
            "latency_b1": r.after.latency_ratio,
            "latency_b32": r.after.change_batch.ratio if r.after.change_batch else None,
            "size_ratio": r.after.size_bytes / r.before.size_bytes, "macs_ratio": r.after.macs / max(r.before.macs, 1),
            "accuracy": held.accuracy_after if held else None,
            "accuracy_before": held.accuracy_before if held else None,
            "agreement": held.agreement if held else None, "max_abs": held.max_abs if held else None,
            "candidates": len(found.scored), "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--only", help="comma-separated model names (digits-cnn, fmnist-cnn, fmnist-mlp, ultraface)")
    ap.add_argument("--budgets", help="comma-separated budget values, replacing each model's defaults")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, calib, labels, cal, (kind, values) in models(Path(tmp), args.quick):
            if args.only and name not in args.only.split(","):
                continue
            values = tuple(float(v) for v in args.budgets.split(",")) if args.budgets else values
            every = default_knobs("latency")
            variants = [("combined", every)] + [(f"{k.name} alone", (k,)) for k in every]
            for value in values:
                for label, knobs in variants:
                    row = {"model": name, "budget": f"{kind} {value:g}", "search": label,
                           **run_one(name, model, calib, labels, cal, kind, value, knobs, args.jobs)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n{'model':<11} {'budget':<18} {'search':<16} {'lat b1':>7} {'lat b32':>8} {'size':>6} "
          f"{'acc/agr':>8}  chosen")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<11} {r['budget']:<18} {r['search']:<16} error: {r['error'][:90]}")
            continue
        q = r["accuracy"] if r["accuracy"] is not None else r["agreement"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{r['model']:<11} {r['budget']:<18} {r['search']:<16} {fmt(r['latency_b1']):>7} "
              f"{fmt(r['latency_b32']):>8} {r['size_ratio']:>6.2f} {fmt(100 * q if q is not None else None):>8}  "
              f"{r['chosen']}")
    out = ROOT / "benchmarks" / "results" / "search.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
