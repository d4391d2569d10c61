"""Wall time of the 20-threshold sweep (linear rates 0.05..1.00) on the bundled MLP, from one calibration pass.

    python benchmarks/sweep_speed.py [--example digits-mlp] [--no-latency]

The seed implementation recomputes activation rates per threshold and needs about 30 minutes for its 20
compressions; here statistics are collected once and each threshold is a graph rewrite plus an accuracy
run in onnxruntime. Prints the table and writes benchmarks/results/sweep_speed.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from onnx_lincomp.examples import example_paths
from onnx_lincomp.optimize import OptimizeOptions, sweep

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--example", default="digits-mlp")
    ap.add_argument("--no-latency", action="store_true")
    args = ap.parse_args()
    model, calib = example_paths(args.example)
    start = time.perf_counter()
    rows = sweep(model, calib, OptimizeOptions(labels="y", latency=not args.no_latency))
    seconds = time.perf_counter() - start
    print(f"{'threshold':>9} {'params':>8} {'layer':>8} {'skip':>6} {'MACs':>8} {'lat ms':>7} {'accuracy':>9}")
    for r in rows:
        lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.4f}"
        print(f"{r['threshold']:>9.2f} {r['params']:>8,} {r['layer_params']:>8,} {r['skip_params']:>6,} "
              f"{r['macs']:>8,} {lat:>7} {100 * r['accuracy']:>8.2f}%")
    print(f"20-threshold sweep on {args.example}: {seconds:.2f} s (latency {'off' if args.no_latency else 'on'})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep_speed.json").write_text(json.dumps({"example": args.example, "seconds": seconds, "rows": rows},
                                                         indent=2))


if __name__ == "__main__":
    main()
