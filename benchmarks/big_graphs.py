"""Speed and memory of analyze / optimize on big graphs, against one plain onnxruntime pass.

    python benchmarks/big_graphs.py [--samples 32 --samples 256] [--rounds 3] [--batch-size 16] [--profile]
                                    [--only resnet50]

Models: the onnx package's light ResNet-50 and VGG-19 (weights built by ConstantOfShape, folded on load)
and ../shared/models/real/ch_PP-OCRv4_det_infer.onnx at x=1,3,320,320 (absent models are skipped).
Every figure is one subprocess (best of 1; the machine may be shared), wall time from start to exit, so
Python start-up and imports count for each; peak RSS is the child's own ``ru_maxrss`` (``os.wait4``):

* ``plain_calib``: one onnxruntime session (default options) over ``--samples`` random samples in batches
  of ``--batch-size`` (of the model's static batch size where it has one: 1 for the light models), the
  least that the statistics need;
* ``plain_all``: the same over 2 x ``--samples`` (random calibration data is verified on as many fresh
  samples): what calibration plus held-out verification need at least;
* ``analyze``: ``onnx-lincomp analyze MODEL --calib random:N``;
* ``optimize``: ``onnx-lincomp optimize MODEL --calib random:N --no-latency --allow-larger -o OUT``.

Ratios: analyze / plain_calib (target <= 1.3) and optimize / plain_all (target <= 2), per round (the four
runs of a round follow each other, so a round's ratio sees one machine load); with several ``--rounds`` the
median ratio and its range are printed. Each ``--samples`` count is a row of its own: the fixed costs
(imports, loading and folding, shape inference, session builds) weigh most at small counts. ``--profile`` runs
optimize once more under cProfile on the first model and lists the top cumulative functions. Writes
benchmarks/results/big_graphs.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = {
    "resnet50": (LIGHT / "light_resnet50.onnx", ()),
    "vgg19": (LIGHT / "light_vgg19.onnx", ()),
    "ppocrv4_det": (SHARED / "models" / "real" / "ch_PP-OCRv4_det_infer.onnx", ("x=1,3,320,320",)),
}
TARGETS = {"analyze": 1.3, "optimize": 2.0}

PLAIN_PASS = r"""
import json, sys, time
import numpy as np
import onnx, onnxruntime as ort
path, samples, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
overrides = dict((k, [int(d) for d in v.split(",")]) for k, v in (a.split("=") for a in sys.argv[4:]))
start = time.perf_counter()
model = onnx.load(path)
inits = {t.name for t in model.graph.initializer}
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
opened = time.perf_counter()
rng = np.random.default_rng(0)
feeds_of = []
for inp in session.get_inputs():
    if inp.name in inits:
        continue
    if inp.shape and isinstance(inp.shape[0], int):
        batch = inp.shape[0]  # a static batch dimension (the light models: 1), as the library feeds it
    dims = overrides.get(inp.name) or [d if isinstance(d, int) else 1 for d in inp.shape]
    feeds_of.append((inp.name, dims[1:]))
done = 0
while done < samples:
    n = min(batch, samples - done)
    session.run(None, {name: rng.random((n, *dims), dtype=np.float32) for name, dims in feeds_of})
    done += n
print(json.dumps({"open_s": opened - start, "run_s": time.perf_counter() - opened}))
"""


def timed(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds, exit code, the child's peak RSS (MiB) and the tail of its output."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - start, 2), "rc": proc.returncode,
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "tail": out.strip().splitlines()[-3:]}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "onnx_lincomp", *args]


def measure(name: str, path: Path, shapes: tuple[str, ...], samples: int, batch: int, tmp: Path,
            rounds: int = 1) -> dict:
    """Median over ``rounds`` rounds (each round: plain_calib, plain_all, analyze, optimize in turn)."""
    runs = [measure_round(name, path, shapes, samples, batch, tmp) for _ in range(rounds)]
    row = dict(runs[len(runs) // 2])
    for key in ("ratio_analyze", "ratio_optimize"):
        values = sorted(r[key] for r in runs)
        row[key] = round(float(statistics.median(values)), 2)
        row[key + "_range"] = [values[0], values[-1]]
    row["rounds"] = rounds
    return row


def measure_round(name: str, path: Path, shapes: tuple[str, ...], samples: int, batch: int, tmp: Path) -> dict:
    shape_flags = [f for s in shapes for f in ("--input-shape", s)]
    common = ["--calib", f"random:{samples}", "--batch-size", str(batch), *shape_flags]
    row = {"model": name, "path": str(path), "samples": samples, "batch_size": batch}
    row["plain_calib"] = timed([sys.executable, "-c", PLAIN_PASS, str(path), str(samples), str(batch), *shapes])
    row["plain_all"] = timed([sys.executable, "-c", PLAIN_PASS, str(path), str(2 * samples), str(batch), *shapes])
    row["analyze"] = timed(cli("analyze", str(path), *common, "--json", str(tmp / f"{name}.analyze.json")))
    row["optimize"] = timed(cli("optimize", str(path), *common, "--no-latency", "--allow-larger", "--overwrite",
                                "-o", str(tmp / f"{name}.out.onnx"), "--json", str(tmp / f"{name}.optimize.json")))
    row["ratio_analyze"] = round(row["analyze"]["seconds"] / row["plain_calib"]["seconds"], 2)
    row["ratio_optimize"] = round(row["optimize"]["seconds"] / row["plain_all"]["seconds"], 2)
    return row


def profile(path: Path, shapes: tuple[str, ...], samples: int, batch: int, tmp: Path, top: int = 10) -> dict:
    """One optimize run under cProfile: the top library functions by cumulative time (below the CLI) and
    the top functions by own time (where the time is actually spent: onnxruntime, numpy, protobuf)."""
    prof = tmp / "optimize.prof"
    shape_flags = [f for s in shapes for f in ("--input-shape", s)]
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "onnx_lincomp", "optimize", str(path),
                    "--calib", f"random:{samples}", "--batch-size", str(batch), *shape_flags, "--no-latency",
                    "--allow-larger", "--overwrite", "-o", str(tmp / "profiled.onnx")],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in pstats.Stats(str(prof)).stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": calls, "tottime": round(tottime, 2),
                     "cumtime": round(cumtime, 2), "file": file})
    library = [r for r in rows if "onnx_lincomp" in r["file"] and not any(
        s in r["file"] for s in ("/cli/", "__main__", "__init__")) and r["function"].split("(")[1] != "<module>)"]
    library.sort(key=lambda r: -r["cumtime"])
    rows.sort(key=lambda r: -r["tottime"])
    strip = lambda r: {k: v for k, v in r.items() if k != "file"}  # noqa: E731
    return {"cumulative": [strip(r) for r in library[:top]], "own": [strip(r) for r in rows[:top]]}


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<12} {'N':>5} {'plain N s':>9} {'plain 2N s':>10} {'analyze s':>9} {'x (range)':>17} "
          f"{'optimize s':>10} {'x (range)':>17}  {'peak RSS MiB (plain 2N/analyze/optimize)':>40}")
    for r in rows:
        rss = "/".join(f"{r[k]['peak_rss_mib']:.0f}" for k in ("plain_all", "analyze", "optimize"))
        flag = "".join(f" {k} rc={r[k]['rc']}" for k in ("analyze", "optimize") if r[k]["rc"])
        spread = {k: f"{r[k]:.2f} ({r[k + '_range'][0]:.2f}-{r[k + '_range'][1]:.2f})"
                  for k in ("ratio_analyze", "ratio_optimize")}
        print(f"{r['model']:<12} {r['samples']:>5} {r['plain_calib']['seconds']:>9.1f} "
              f"{r['plain_all']['seconds']:>10.1f} "
              f"{r['analyze']['seconds']:>9.1f} {spread['ratio_analyze']:>17} {r['optimize']['seconds']:>10.1f} "
              f"{spread['ratio_optimize']:>17}  {rss:>40}{flag}")
    print(f"targets: analyze <= {TARGETS['analyze']}x plain pass over the calibration samples, "
          f"optimize <= {TARGETS['optimize']}x plain pass over calibration + held-out samples")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, action="append",
                    help="random calibration samples (held-out: as many); repeat for several rows (default 32)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per row; the median ratio is reported")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--only", action="append", choices=sorted(MODELS), help="measure only these models")
    ap.add_argument("--profile", action="store_true", help="also profile optimize on the first model")
    ap.add_argument("--out", default=str(HERE / "results" / "big_graphs.json"))
    args = ap.parse_args()
    rows, top = [], {}
    with tempfile.TemporaryDirectory(prefix="big-graphs-") as tmp:
        chosen = [(n, *MODELS[n]) for n in (args.only or MODELS)]
        present = [(n, p, s) for n, p, s in chosen if p.is_file()]
        for name, path, _ in set(chosen) - set(present):
            print(f"{name}: {path} is absent, skipped", file=sys.stderr)
        counts = args.samples or [32]
        for name, path, shapes in present:
            for n in counts:
                rows.append(measure(name, path, shapes, n, args.batch_size, Path(tmp), args.rounds))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "path"}), file=sys.stderr)
        if args.profile and present:
            name, path, shapes = present[0]
            top = {"model": name, **profile(path, shapes, counts[0], args.batch_size, Path(tmp))}
    print_table(rows)
    for kind in ("cumulative", "own") if top else ():
        print(f"optimize profile ({top['model']}), top by {kind} time:")
        for r in top[kind]:
            print(f"  {r['cumtime']:>7.2f} s cumulative {r['tottime']:>7.2f} s own {r['calls']:>6} calls  "
                  f"{r['function']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "targets": TARGETS, "models": rows,
                               "optimize_profile": top},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
