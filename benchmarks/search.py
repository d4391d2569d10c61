"""The search across passes (``optimize --objective latency``) against the best single pass at the same budget.

For each model and budget: the combined search (every knob) and the same search restricted to one knob
(uniform pruning alone, per-layer pruning alone, low-rank alone, INT8 alone), each ending in a verified
model; the table gives the batch-1 and batch-32 latency ratios against the original (interleaved rounds,
pinned threads), the size ratio, the held-out accuracy (or agreement) and the candidates scored (look-ahead,
back-off and trade moves, and the per-layer scan's single-layer candidates). A summary line per model and
budget names the best single pass on batch-1 latency and says whether the combination beats every single
pass. A budget the held-out split cannot support is reported as such.

``--compare-backends MODEL`` runs the combined search on one model at the first budget with ``--jobs 1``,
``--jobs 2`` and ``--backend ray --jobs 2`` (a local Ray cluster) and reports the search wall time and whether
the chosen recipes are the same.

    python benchmarks/search.py [--quick] [--jobs 2] [--only fmnist-cnn] [--budgets 0.5,1,2] [--time-budget 90]
    python benchmarks/search.py --only digits-cnn --budgets 1 --compare-backends digits-cnn

Writes benchmarks/results/search.json (or ``--out NAME``). Timings on a shared 2-core machine: compare within
one run only.
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
    # 540 samples: 432 held out support a 1-point budget (108 cannot); the statistics use the other 108
    out = [("digits-cnn", m, c, "y", CalibrationSettings(verify_split=0.8), ("accuracy_drop", (1.0, 2.0)))]
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
            # 160x160 (its dynamic sides): at 320x320 one reconstructing candidate takes minutes on 2 cores; pages
            # of MNIST digits set as text (on noise the detector outputs zeros, so any model would meet the budget)
            det = "real/ch_PP-OCRv4_det_infer.onnx"
            pages = calibration_file(RealModel(det, "text-pages", 64, {"x": (1, 3, 160, 160)}), tmp)
            out.append(("ppocr-det", str(SHARED / "models" / det), pages, None,
                        CalibrationSettings(verify_split=0.5, input_shapes=(("x", (1, 3, 160, 160)),)),
                        ("mean_error", (0.005, 0.02))))  # a text map: one flipped pixel sets the max error
    return out


def run_one(name, model, calib, labels, cal, kind, value, knobs, jobs, time_budget=None, backend="local",
            latency_batch=1):
    options = OptimizeOptions(Recipe(calibration=cal), labels=labels, threads=1, batch_size=32)
    search = SearchOptions("latency", Budget(kind, value), jobs=jobs, backend=backend, threads=1, batch_size=32,
                           time_budget_s=time_budget, latency_batch=latency_batch)
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
            "candidates": len(found.scored), "counts": found.counts(), "stopped": found.stopped,
            "scans": [r.as_dict() for r in found.scans],
            "search_seconds": sum(s.outcome.seconds for s in found.scored),
            "recipe": found.recipe.as_dict() if found.recipe else None,
            "candidates_table": r.search,
            "seconds": time.perf_counter() - start}


def summarize(rows: list[dict], at: str = "latency_b1") -> list[dict]:
    """Per model and budget: the best single pass (latency at ``at``: the column of the batch the search
    optimised) and whether the combination beats them all."""
    out = []
    for key in dict.fromkeys((r["model"], r["budget"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["budget"]) == key and "error" not in r]
        combined = next((r for r in mine if r["search"] == "combined"), None)
        singles = [r for r in mine if r["search"] != "combined" and r[at] is not None]
        if combined is None or not singles:
            continue
        best = min(singles, key=lambda r: r[at])
        smallest = min(singles, key=lambda r: r["size_ratio"])
        out.append({"model": key[0], "budget": key[1], "best_single": best["search"],
                    "best_single_b1": best["latency_b1"], "best_single_b32": best["latency_b32"],
                    "combined_b1": combined["latency_b1"], "combined_b32": combined["latency_b32"],
                    "at": at, "beats_every_single": all(combined[at] < r[at] for r in singles),
                    "smallest_single": smallest["search"], "smallest_single_size": smallest["size_ratio"],
                    "combined_size": combined["size_ratio"],
                    "beats_every_single_size": all(combined["size_ratio"] < r["size_ratio"] for r in singles)})
    return out


def compare_backends(entry, value, knobs, time_budget) -> list[dict]:
    """The combined search with 1 and 2 local workers and on a local Ray cluster: wall time, same recipe."""
    name, model, calib, labels, cal, (kind, _) = entry
    out = []
    for label, jobs, backend in (("jobs 1", 1, "local"), ("jobs 2", 2, "local"), ("ray, 2 actors", 2, "ray")):
        try:
            row = run_one(name, model, calib, labels, cal, kind, value, knobs, jobs, time_budget, backend)
        finally:
            if backend == "ray":
                import ray

                ray.shutdown()
        out.append({"model": name, "budget": f"{kind} {value:g}", "run": label, "seconds": row.get("seconds"),
                    "candidates": row.get("candidates"), "chosen": row.get("chosen"), "recipe": row.get("recipe"),
                    "error": row.get("error")})
        print(json.dumps({k: v for k, v in out[-1].items() if k != "recipe"}), flush=True)
    for r in out:
        r["same_recipe_as_jobs_1"] = None if r["error"] or out[0]["error"] else r["recipe"] == out[0]["recipe"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--only", help="comma-separated model names (digits-cnn, fmnist-cnn, fmnist-mlp, ultraface, "
                                         "ppocr-det)")
    ap.add_argument("--budgets", help="comma-separated budget values, replacing each model's defaults")
    ap.add_argument("--time-budget", type=float, help="seconds per search (each variant)")
    ap.add_argument("--compare-backends", metavar="MODEL", help="also time jobs 1 / jobs 2 / ray on this model")
    ap.add_argument("--no-table", action="store_true", help="with --compare-backends: skip the variants table")
    ap.add_argument("--out", default="search.json", help="file name under benchmarks/results/")
    ap.add_argument("--variants", help="comma-separated variant labels to run (default: all), e.g. "
                                       "'combined,prune alone,low-rank alone,quantize alone'")
    ap.add_argument("--latency-batch", type=int, default=1,
                    help="the batch the search's latency objective is measured at (the tables show b1 and b32)")
    args = ap.parse_args()
    rows, backends = [], []
    every = default_knobs("latency", latency_batch=args.latency_batch)
    at = "latency_b1" if args.latency_batch == 1 else "latency_b32"  # the column the summary judges
    layer = tuple(k for k in default_knobs("latency", per_layer=True) if k.name == "prune-layers")
    variants = ([("combined", every), ("combined + per-layer", every + layer)]
                + [(f"{k.name} alone", (k,)) for k in every + layer])
    if args.variants:
        wanted = args.variants.split(",")
        variants = [v for v in variants if v[0] in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        for entry in models(Path(tmp), args.quick):
            name, model, calib, labels, cal, (kind, values) = entry
            if args.only and name not in args.only.split(","):
                continue
            values = tuple(float(v) for v in args.budgets.split(",")) if args.budgets else values
            if args.compare_backends == name:
                backends += compare_backends(entry, values[0], every, args.time_budget)
            for value in () if args.no_table else values:
                for label, knobs in variants:
                    row = {"model": name, "budget": f"{kind} {value:g}", "search": label,
                           **run_one(name, model, calib, labels, cal, kind, value, knobs, args.jobs,
                                     args.time_budget, latency_batch=args.latency_batch)}
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "recipe"}), flush=True)
                    write(args.out, rows, backends, partial=True, at=at)
    print(f"\n{'model':<11} {'budget':<18} {'search':<18} {'lat b1':>7} {'lat b32':>8} {'size':>6} "
          f"{'acc/agr':>8} {'cands':>5}  chosen")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<11} {r['budget']:<18} {r['search']:<18} error: {r['error'][:90]}")
            continue
        q = r["accuracy"] if r["accuracy"] is not None else r["agreement"]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        c = r["counts"]
        cands = f"{c['scored']}" + (f"+{c['scan']}s" if c["scan"] else "")
        print(f"{r['model']:<11} {r['budget']:<18} {r['search']:<18} {fmt(r['latency_b1']):>7} "
              f"{fmt(r['latency_b32']):>8} {r['size_ratio']:>6.2f} {fmt(100 * q if q is not None else None):>8} "
              f"{cands:>5}  {r['chosen']}")
    summary = summarize(rows, at)
    for s in summary:
        col = at.split("_")[1]
        print(f"{s['model']} {s['budget']}: best single ({col}) {s['best_single']} {s['best_single_' + col]:.2f}, "
              f"combined {s['combined_' + col]:.2f} -> beats every single: {s['beats_every_single']}; smallest single "
              f"{s['smallest_single']} {s['smallest_single_size']:.3f}, combined {s['combined_size']:.3f} -> "
              f"{s['beats_every_single_size']}")
    for b in backends:
        print(f"{b['model']} {b['budget']} {b['run']:<14} {b['seconds'] or 0:7.1f} s  {b['candidates']} candidates  "
              f"same recipe as jobs 1: {b['same_recipe_as_jobs_1']}  {b['error'] or ''}")
    print(f"wrote {write(args.out, rows, backends, at=at)}")


def write(name: str, rows: list[dict], backends: list[dict], partial: bool = False, at: str = "latency_b1") -> Path:
    """The results so far (``partial``: the run goes on; a stopped run keeps its finished rows); ``at``: the
    latency column the summary judges."""
    out = ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summarize(rows, at), "backends": backends, "partial": partial},
                              indent=1))
    return out


if __name__ == "__main__":
    main()
