"""low-rank: ALDS against uniform SVD and the energy threshold, each with and without data-aware SVD.

    python benchmarks/low_rank.py [--only SUBSTRING] [--no-latency] [--keeps 0.8,0.6,0.4] [--methods alds,...]
                                  [--allocation-only] [--latency-check]

Models: the bundled digits MLP and CNN (their 540 labelled samples, half calibration, half held out),
``trained/own_fmnist_cnn_bn.onnx`` and ``trained/own_fmnist_mlp_l1.onnx`` (Fashion-MNIST test set:
calibration on the first 2,000 images, held out the other 8,000) and ``real/onnxzoo_mnist-8.onnx``
(MNIST test set, same split). For every keep ratio of the parameters, method and data-awareness one
``optimize`` run with the ``low-rank`` pass only: parameters and MACs after / before, onnxruntime latency
ratio at batch 1 and 32 (interleaved rounds, pinned threads; mnist-8 takes batch 1 only), held-out
accuracy, and the per-layer choices (k, rank). Prints a markdown table and writes
benchmarks/results/low_rank.json (rewritten after every run, so a partial run keeps its rows). First it
times the decompositions and the ALDS allocation of a synthetic 50-layer model.
"""
from __future__ import annotations

import argparse
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

KEEPS = (0.8, 0.6, 0.4)
METHODS = ("alds", "uniform", "energy")
OUT = HERE / "results" / "low_rank.json"


def models(tmp: Path) -> list[tuple[str, str, str, CalibrationSettings]]:
    """(label, model path, calibration path, calibration settings)."""
    out = []
    for name in ("digits-mlp", "digits-cnn"):
        model, calib = example_paths(name)
        out.append((name, str(model), str(calib), CalibrationSettings(verify_split=0.5)))
    split = CalibrationSettings(verify_split=0.8, max_samples=10000)
    for path, data in (("trained/own_fmnist_cnn_bn.onnx", "fmnist-4d"), ("trained/own_fmnist_mlp_l1.onnx", "fmnist"),
                       ("real/onnxzoo_mnist-8.onnx", "mnist-raw")):
        calib = calibration_file(RealModel(path, data, 10000), tmp)
        out.append((Path(path).stem, str(SHARED / "models" / path), calib, split))
    return out


def one_run(model: str, calib: str, settings: CalibrationSettings, keep: float, method: str, aware: bool,
            latency: bool, check_latency: bool = False) -> dict:
    options = {"keep_params": keep, "method": method, "data_aware": aware, "check_latency": check_latency}
    recipe = Recipe((PassSpec.of("low-rank", options),), settings)
    start = time.perf_counter()
    result = optimize(model, calib, OptimizeOptions(recipe, labels="y", latency=latency, batch_size=32,
                                                     max_output_change=None, allow_larger=True))
    seconds = time.perf_counter() - start
    rep = result.report
    held = rep.on_heldout
    record = rep.passes[0]
    b1, b32 = rep.after.change_b1, rep.after.change_batch
    return {"keep": keep, "method": method, "data_aware": aware,
            "params_ratio": rep.after.params / rep.before.params,
            "macs_ratio": rep.after.macs / max(rep.before.macs, 1),
            "latency_b1": b1.ratio if b1 else None, "latency_b32": b32.ratio if b32 else None,
            "latency_b1_verdict": b1.verdict if b1 else None, "latency_b32_verdict": b32.verdict if b32 else None,
            "accuracy_before": held.accuracy_before, "accuracy_after": held.accuracy_after,
            "agreement": held.agreement, "heldout_samples": held.samples, "seconds": seconds,
            "pass_seconds": record.seconds, "layers": list(record.result.notes),
            "skipped": dict(record.result.skipped)}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| model | keep | method | data-aware | params | MACs | latency b1 | latency b32 | accuracy | "
             "choices (k/rank) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        picks = ", ".join(n.split(": ")[1].split(":")[0].replace(" rank ", "/").replace("k=", "")
                          for n in r["layers"]) or "none"
        lines.append(f"| {r['model']} | {r['keep']} | {r['method']} | {'yes' if r['data_aware'] else 'no'} | "
                     f"{r['params_ratio']:.3f} | {r['macs_ratio']:.3f} | {_ratio(r['latency_b1'])} | "
                     f"{_ratio(r['latency_b32'])} | {_pct(r['accuracy_before'])} -> {_pct(r['accuracy_after'])} | "
                     f"{picks} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets: ALDS >= uniform at every budget (and > at one), data-aware > weight space at 0.4."""
    out = []
    acc = {(r["model"], r["keep"], r["method"], r["data_aware"]): r["accuracy_after"] for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for aware in (False, True):
            pairs = [(k, acc.get((model, k, "alds", aware)), acc.get((model, k, "uniform", aware))) for k in KEEPS]
            pairs = [(k, a, u) for k, a, u in pairs if a is not None and u is not None]
            if pairs:
                ok = all(a >= u for _, a, u in pairs) and any(a > u for _, a, u in pairs)
                detail = ", ".join(f"{k}: {100 * a:.2f} vs {100 * u:.2f}" for k, a, u in pairs)
                out.append(f"{model} ({'data-aware' if aware else 'weight space'}): ALDS vs uniform "
                           f"{'MET' if ok else 'MISSED'} ({detail})")
        a, w = acc.get((model, 0.4, "alds", True)), acc.get((model, 0.4, "alds", False))
        if a is not None and w is not None:
            out.append(f"{model}: data-aware ALDS vs weight-space ALDS at 0.4 {'MET' if a > w else 'MISSED'} "
                       f"({100 * a:.2f} vs {100 * w:.2f})")
    return out


def allocation_timing(layers: int = 50, width: int = 64) -> dict:
    """Seconds to decompose (every k <= 8, exact grouped errors) and to allocate ``layers`` Conv layers of
    ``width`` -> ``width`` channels, 3x3, in weight space (a 50-layer model)."""
    import numpy as np

    from onnx_lincomp.analysis.low_rank_alloc import Allocator, Spectrum, choices, divisors

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    tables = []
    for _ in range(layers):
        sp = Spectrum(rng.normal(size=(width, width * 9)), width)
        tables.append({k: choices(sp.errors(k, "exact"), k, width, width * 9, 1.0, 1) for k in divisors(width, 8)})
    spectra = time.perf_counter() - start
    start = time.perf_counter()
    alloc = Allocator(tables, 0.4 * layers * width * width * 9).alds((2, 3, 4, 5, 8), 4)
    return {"layers": layers, "shape": [width, width, 3, 3], "decompose_seconds": spectra,
            "allocate_seconds": time.perf_counter() - start, "max_error": alloc.max_error if alloc else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the models whose label contains this")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--allocation-only", action="store_true", help="only time a 50-layer allocation (added to the "
                                                                        "existing JSON)")
    ap.add_argument("--latency-check", action="store_true",
                    help="run the pass with check_latency (rows go to low_rank_latency_check.json)")
    args = ap.parse_args()
    out = OUT.with_name("low_rank_latency_check.json") if args.latency_check else OUT
    timing = allocation_timing()
    print(f"50 Conv layers 64x64x3x3: decompositions {timing['decompose_seconds']:.1f}s, allocation "
          f"{timing['allocate_seconds']:.2f}s")
    if args.allocation_only:
        saved = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps(dict(saved, allocation_50_layers=timing), indent=1))
        return
    keeps = [float(k) for k in args.keeps.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, calib, settings in models(Path(tmp)):
            if args.only not in label:
                continue
            for keep in keeps:
                for method in args.methods.split(","):
                    for aware in (False, True):
                        row = {"model": label, **one_run(model, calib, settings, keep, method, aware,
                                                         not args.no_latency, args.latency_check)}
                        rows.append(row)
                        print(table([row]).splitlines()[-1], f"({row['seconds']:.0f}s)", flush=True)
                        out.write_text(json.dumps({"rows": rows, "verdicts": verdicts(rows),
                                                   "allocation_50_layers": timing}, indent=1))
    print()
    print(table(rows))
    print()
    print("\n".join(verdicts(rows)))


if __name__ == "__main__":
    main()
