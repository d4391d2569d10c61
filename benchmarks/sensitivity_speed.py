"""Wall time of the per-layer sensitivity scan (every channel group at 9 levels) with 1 and 2 processes.

    python benchmarks/sensitivity_speed.py [--model PATH] [--calib random:16] [--jobs 1,2] [--plain 3]
        [--input-shape NAME=D0,D1,...] [--deep N]

Default: the largest conv model in ../shared/models, UltraFace RFB-320 (BatchNorm folded; 52 Convs, 25
prunable channel groups) on 16 random samples. The scan plans once per level (calibration moments of every
group's consumers) and applies one group's match per candidate; ``--plain N`` also times N candidates built
the plain way (the pass planned per candidate) to show what the plan reuse saves. Also checks that every
process count gives the same rows. ``--deep N`` scans a built chain of N Conv-ReLU layers (32 channels, 3x3,
32x32 input, random weights: a 50-layer model at 9 levels is the issue's size). Prints a table and writes
benchmarks/results/sensitivity_speed[_<model>].json (the default model keeps the plain name).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lincomp.calibration.data_source import parse_input_shapes
from onnx_lincomp.optimize import compress
from onnx_lincomp.recipe import CalibrationSettings, Recipe
from onnx_lincomp.sensitivity import METHODS, ScanInput, ScanOptions, _pass, sensitivity

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "real" / "ortexamples_ultraface_RFB-320_bnfolded.onnx"


def plain_seconds(source: ScanInput, layers: tuple[str, ...], level: float, count: int) -> float:
    """Mean seconds to build one candidate by running the pass alone (plan + apply per candidate)."""
    prep = source.prepare()
    start = time.perf_counter()
    for layer in layers[:count]:
        compress(prep, None, Recipe((_pass(METHODS["channels"], {layer: level}),)))
    return (time.perf_counter() - start) / max(min(count, len(layers)), 1)


def deep_chain(depth: int, channels: int = 32, side: int = 32, seed: int = 0) -> onnx.ModelProto:
    """``depth`` Conv(3x3, pad 1)-Relu layers on a 3-channel input, then global average pool and a Gemm."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev, cin = [], [], "x", 3
    for i in range(depth):
        w = rng.normal(0, np.sqrt(2.0 / (cin * 9)), (channels, cin, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.05, channels).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], f"relu{i}")]
        prev, cin = f"r{i}", channels
    inits += [numpy_helper.from_array(rng.normal(0, 0.1, (channels, 10)).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"], "gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], "flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], "fc")]
    graph = helper.make_graph(nodes, f"deep{depth}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, side, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def row_differences(first: list[dict], rows: list[dict]) -> list[dict]:
    """Rows that differ from the first run's: where, and each differing field's two values."""
    out = []
    for a, b in zip(first, rows, strict=True):
        fields = {k: [a[k], b[k]] for k in a if a[k] != b[k]}
        if fields:
            out.append({"layer": a["layer"], "level": a["level"], **fields})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--calib", default="random:16")
    ap.add_argument("--jobs", default="1,2")
    ap.add_argument("--plain", type=int, default=3, help="candidates to time the plain way (0: skip)")
    ap.add_argument("--input-shape", action="append", default=[], help="NAME=D0,D1,... for dynamic inputs")
    ap.add_argument("--deep", type=int, default=0, help="scan a built chain of N Conv-ReLU layers instead")
    args = ap.parse_args()
    shapes = parse_input_shapes(args.input_shape)
    with tempfile.TemporaryDirectory(prefix="lincomp-deep-") as tmp:
        if args.deep:
            args.model = str(Path(tmp) / f"deep_chain_{args.deep}.onnx")
            onnx.save(deep_chain(args.deep), args.model)
        measure(args, shapes)


def measure(args: argparse.Namespace, shapes: dict[str, tuple[int, ...]]) -> None:
    """Scan with each process count, time the plain way, print the table and write the JSON."""
    source = ScanInput(args.model, args.calib, CalibrationSettings(input_shapes=shapes))
    runs, rows = [], None
    for jobs in (int(j) for j in args.jobs.split(",")):
        load, cpu = os.getloadavg()[0], cpu_seconds()
        start = time.perf_counter()
        scan = sensitivity(source, ScanOptions(jobs=jobs)).scan
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        diffs = row_differences(rows, [r.as_dict() for r in scan.rows]) if rows is not None else []
        rows = rows or [r.as_dict() for r in scan.rows]
        runs.append({"jobs": jobs, "seconds": seconds, "scan_seconds": scan.seconds, "candidates": len(scan.rows),
                     "layers": len(scan.layers), "levels": len(scan.levels), "same_rows_as_first": not diffs,
                     "rows_differing": len(diffs), "differences": diffs[:10],
                     "cpu_seconds": cpu, "load_before": load, "load_after": os.getloadavg()[0]})
    cpu = cpu_seconds()
    plain = plain_seconds(source, scan.layers, 0.5, args.plain) if args.plain else None
    plain_cpu = (cpu_seconds() - cpu) / args.plain if args.plain else None
    print(f"{Path(args.model).name} on {args.calib}: {runs[0]['layers']} channel groups x {runs[0]['levels']} levels "
          f"= {runs[0]['candidates']} candidates ({os.cpu_count()} CPUs)")
    print(f"{'jobs':>4} {'wall s':>8} {'CPU s':>8} {'wall s/candidate':>16} {'same rows':>9} {'load 1 min':>10}")
    for r in runs:
        print(f"{r['jobs']:>4} {r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} {r['seconds'] / r['candidates']:>16.2f} "
              f"{str(r['same_rows_as_first']):>9} {r['load_before']:>4.1f}-{r['load_after']:<4.1f}")
    for r in runs:
        if r["differences"]:
            print(f"jobs {r['jobs']}: {r['rows_differing']} rows differ from the first run, e.g. "
                  f"{r['differences'][0]}")
    if plain is not None:
        print(f"plain pass per candidate: {plain:.2f} s wall, {plain_cpu:.2f} s CPU each (includes preparing once) "
              f"-> about {plain_cpu * runs[0]['candidates']:.0f} CPU s for the whole scan")
    RESULTS.mkdir(exist_ok=True)
    name = "" if args.model == str(DEFAULT_MODEL) else "_" + Path(args.model).stem
    (RESULTS / f"sensitivity_speed{name}.json").write_text(json.dumps(
        {"model": Path(args.model).name, "calib": args.calib, "input_shapes": shapes, "cpus": os.cpu_count(),
         "machine": platform.machine(),
         "runs": runs, "plain_seconds_per_candidate": plain,
         "plain_cpu_seconds_per_candidate": plain_cpu, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
