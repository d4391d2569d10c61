"""Unstructured pruning (prune-magnitude): held-out accuracy with and without SparseGPT correction, and size on disk.

    python benchmarks/prune_magnitude.py

Models: the bundled digits MLP (its 540 labelled samples: calibrate on the first half, evaluate on the
other half) and trained/own_fmnist_mlp_l1.onnx (the 10,000 Fashion-MNIST test images: calibrate on the
first 2,000, evaluate on the other 8,000). At 50 / 80 / 90 % sparsity, per-layer and global scope, plain
magnitude against SparseGPT (mask chosen block by block, OBS update, sequential Hessians). File sizes
are those of the per-layer SparseGPT model: dense, zipped, and with sparse initializers (onnxruntime
loads that form, densifying it; unstructured sparsity does not make onnxruntime faster).
Prints a table and writes benchmarks/results/prune_magnitude.json.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SHARED  # noqa: E402
from onnx_lincomp.examples import example_paths  # noqa: E402
from onnx_lincomp.optimize import OptimizeOptions, optimize  # noqa: E402
from onnx_lincomp.recipe import CalibrationSettings, PassSpec, Recipe  # noqa: E402
from real_models import RealModel, calibration_file  # noqa: E402

SPARSITIES = (0.5, 0.8, 0.9)
VARIANTS = (("layer", False), ("layer", True), ("global", False), ("global", True))


def run_one(model: Path, calib: str, split: float, sparsity: float, scope: str, correct: bool):
    spec = PassSpec.of("prune-magnitude", {"sparsity": sparsity, "scope": scope, "correct": correct})
    recipe = Recipe((spec,), CalibrationSettings(verify_split=split, max_samples=10000))
    start = time.perf_counter()
    report = optimize(model, calib, OptimizeOptions(recipe, labels="y", latency=False)).report
    return report, time.perf_counter() - start


def model_rows(name: str, model: Path, calib: str, split: float) -> list[dict]:
    rows = []
    for sparsity in SPARSITIES:
        row: dict = {"model": name, "sparsity": sparsity}
        for scope, correct in VARIANTS:
            report, seconds = run_one(model, calib, split, sparsity, scope, correct)
            key = f"{scope}_{'sparsegpt' if correct else 'magnitude'}"
            held = report.on_heldout
            row["acc_fp32"] = held.accuracy_before
            row[key] = held.accuracy_after
            row[f"{key}_seconds"] = seconds
            if scope == "layer" and correct:
                row["storage"] = report.storage
                row["params"] = report.after.params
                row["nonzeros"] = report.after.nonzeros
                row["calibration_samples"] = report.calibration_samples
                row["heldout_samples"] = report.heldout_samples
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    pct = lambda v: f"{100 * v:6.2f}"  # noqa: E731
    print(f"{'model':<16} {'sparsity':>8} {'fp32':>7} | {'layer mag':>9} {'layer SGPT':>10} | {'glob mag':>8} "
          f"{'glob SGPT':>9} | {'dense B':>9} {'zipped B':>9} {'sparse B':>9} {'loads':>5} {'SGPT s':>6}")
    for r in rows:
        s = r["storage"]
        print(f"{r['model']:<16} {100 * r['sparsity']:>7.0f}% {pct(r['acc_fp32']):>7} | {pct(r['layer_magnitude']):>9} "
              f"{pct(r['layer_sparsegpt']):>10} | {pct(r['global_magnitude']):>8} {pct(r['global_sparsegpt']):>9} | "
              f"{s['dense_bytes']:>9,} {s['zipped_bytes']:>9,} {s['sparse_bytes']:>9,} "
              f"{str(s['sparse_loads']):>5} {r['layer_sparsegpt_seconds']:>6.1f}")


def main() -> None:
    rows = []
    model, calib = example_paths("digits-mlp")
    rows += model_rows("digits-mlp", model, str(calib), 0.5)
    fmnist = SHARED / "models" / "trained" / "own_fmnist_mlp_l1.onnx"
    if fmnist.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            data = calibration_file(RealModel("trained/own_fmnist_mlp_l1.onnx", "fmnist", 10000), Path(tmp))
            rows += model_rows("fmnist-mlp-l1", fmnist, data, 0.8)
    else:
        print(f"{fmnist} is absent: only the bundled example is measured", file=sys.stderr)
    print_table(rows)
    out = HERE / "results" / "prune_magnitude.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
