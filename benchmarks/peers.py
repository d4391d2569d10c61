"""Peers side by side: calibration statistics, graph simplification and exact certification, in one run.

    python benchmarks/peers.py [--samples 1024] [--batch-size 16] [--threads 2] [--rounds 21]
                               [--milp-time-limit 240] [--skip calibration,simplify,exact]

Benchmark environment only: onnxsim and onnxslim are not project dependencies (``pip install onnxsim onnxslim``).
Without them their columns say so and the rest runs.

1. Statistics pass. onnx-lincomp's ``collect_relu_stats`` (every statistic of every Relu) against onnxruntime's
   MinMax calibrator (``create_calibrator(..., CalibrationMethod.MinMax)``, per channel, on the Relu tensors), on
   the same model and the same memory-mapped data, each in a fresh process: seconds from the model and data on
   disk to statistics in memory (augmentation and session creation included, imports excluded), peak RSS, and
   its growth over the process right after imports. Models: the 6x Conv 3x3 64-channel net of
   calibration_cost.py on normal noise, and trained/own_fmnist_cnn_bn.onnx on Fashion-MNIST test images.
2. Simplification. ``onnx-lincomp optimize MODEL --calib random:64 -o OUT --no-latency --allow-larger --json -``
   against ``onnxsim.simplify`` and ``onnxslim.slim``, on ../shared/models/real and ../shared/models/trained:
   parameters and MACs per sample (``model_report``, the project's one counter), tool wall time (a fresh
   process each, imports included), and the batch-1 latency of each output against the original
   (``compare_models_latency``: interleaved rounds, 1 pinned thread; "~" marks a ratio inside the noise).
   Where our run stops at the held-out output-change gate (random data is not the model's data), it is rerun
   with ``--max-output-change off`` and marked "*". A tool that fails on a model gets a line saying so.
3. Exact mode. ``onnx-lincomp certify MODEL --input-range 0,1 --json -`` against onnxsim's
   ``stable_relu_prune.analyze`` (interval + CROWN bounds) on ../shared/models/exact-compression: units proven
   stable (always active / never active) out of all units, whether every unit was decided, and wall time.

Prints the tables and writes benchmarks/results/peers.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from conftest import SHARED, read_idx  # noqa: E402
from onnx_lincomp.analysis.model_report import model_report  # noqa: E402
from onnx_lincomp.runtime.latency import CompareOptions, compare_models_latency  # noqa: E402

RESULTS = HERE / "results"
TOOL_TIMEOUT_S = 900
# dynamic dimensions of the real models (the tests' choices, tests/real_models.py) and inputs random data cannot fill
INPUT_SHAPES = {
    "ch_PP-OCRv4_det_infer.onnx": {"x": (1, 3, 64, 64)},
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": (1, 3, 48, 192)},
    "basic_pitch_nmp.onnx": {"serving_default_input_2:0": (1, 43844, 1)},
    "silero_vad.onnx": {"input": (1, 512), "state": (2, 1, 128)},
}
FIXED_FEEDS = {"silero_vad.onnx": {"sr": np.array(16000, np.int64)}}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def version(module: str) -> str | None:
    if not installed(module):
        return None
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(module)
    except PackageNotFoundError:
        return "unknown"


def run_tool(args: list[str], timeout: float = TOOL_TIMEOUT_S) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, wall seconds) of a fresh Python process."""
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout:.0f} s", time.perf_counter() - start
    return out.returncode, out.stdout, out.stderr, time.perf_counter() - start


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- workers: one variant in a fresh process ------------------------------------------------------------------

def worker_lincomp_stats(model: str, data: str, batch: int, threads: int) -> dict:
    from onnx_lincomp.calibration import CollectOptions, collect_relu_stats, input_specs, open_calibration
    from onnx_lincomp.model_io import load_model

    base = rss_mib()
    start = time.perf_counter()
    loaded = load_model(model)
    source = open_calibration(data, input_specs(loaded.graph))
    stats = collect_relu_stats(loaded.graph, loaded.ctx, source, CollectOptions(batch_size=batch, threads=threads))
    return {"seconds": time.perf_counter() - start, "base_rss_mib": base, "peak_rss_mib": rss_mib(),
            "relus": len(stats.layers)}


def worker_ort_minmax(model: str, data: str, batch: int, threads: int) -> dict:
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    arr = np.load(data, mmap_mode="r")
    name = next(i.name for i in onnx.load(model, load_external_data=False).graph.input)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(arr):
                return None
            feeds = {name: np.ascontiguousarray(arr[self.i:self.i + batch])}
            self.i += batch
            return feeds

    base = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cal = create_calibrator(model, ["Relu"], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                calibrate_method=CalibrationMethod.MinMax, extra_options={"per_channel": True})
        setup = time.perf_counter() - start
        # the calibrator's own session settings with the thread count pinned like ours (not timed: it replaces
        # the session create_calibrator already opened, which is)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        cal.infer_session = ort.InferenceSession(cal.augmented_model_path, so, providers=["CPUExecutionProvider"])
        start = time.perf_counter()
        cal.collect_data(Reader())
        ranges = cal.compute_data()
        seconds = setup + time.perf_counter() - start
    return {"seconds": seconds, "base_rss_mib": base, "peak_rss_mib": rss_mib(), "tensors": len(ranges.data)}


def worker_simplify(tool: str, src: str, dst: str) -> dict:
    model = onnx.load(src)
    if tool == "onnxsim":
        import onnxsim

        out, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
    else:
        import onnxslim

        out = onnxslim.slim(model)
    onnx.save(out, dst)
    return {"ok": True}


def worker_stable_relu(model: str) -> dict:
    from onnxsim import stable_relu_prune

    m = onnx.load(model)
    name = next(i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer})
    start = time.perf_counter()
    rep = stable_relu_prune.analyze(m, {name: (0.0, 1.0)})
    return {"seconds": time.perf_counter() - start, "units": rep.total_units, "dead": rep.total("dead"),
            "always_on": rep.total("always_on"), "unstable": rep.total("unstable"), "methods": rep.methods}


WORKERS = {"lincomp-stats": worker_lincomp_stats, "ort-minmax": worker_ort_minmax, "simplify": worker_simplify,
           "stable-relu": worker_stable_relu}


def call_worker(kind: str, *args) -> dict:
    """Run a worker in a fresh process; {'error': ...} when it fails."""
    rc, out, err, wall = run_tool([str(Path(__file__).resolve()), "--worker", kind, *map(str, args)])
    if rc != 0:
        return {"error": last_line(err) or f"exit {rc}", "wall_seconds": wall}
    return {**json.loads(out.strip().splitlines()[-1]), "wall_seconds": wall}


# --- 1. statistics pass ----------------------------------------------------------------------------------------

def calibration_inputs(samples: int, workdir: Path) -> list[tuple[str, Path, Path]]:
    """(label, model, memory-mappable .npy) pairs."""
    from calibration_cost import conv_model

    rows = []
    model_path = workdir / "conv6x64.onnx"
    onnx.save(conv_model(), model_path)
    data = np.lib.format.open_memmap(workdir / "conv6x64.npy", mode="w+", dtype=np.float32,
                                     shape=(samples, 3, 32, 32))
    rng = np.random.default_rng(0)
    for i in range(0, samples, 256):
        data[i:i + 256] = rng.normal(size=(min(256, samples - i), 3, 32, 32))
    data.flush()
    rows.append(("conv6x64 (synthetic)", model_path, workdir / "conv6x64.npy"))
    cnn = SHARED / "models" / "trained" / "own_fmnist_cnn_bn.onnx"
    images = SHARED / "data" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    if cnn.exists() and images.exists():
        x = read_idx(images)[:samples].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
        np.save(workdir / "fmnist.npy", x)
        rows.append((f"own_fmnist_cnn_bn ({len(x)} images)", cnn, workdir / "fmnist.npy"))
    return rows


def bench_calibration(args, workdir: Path) -> list[dict]:
    rows = []
    for label, model, data in calibration_inputs(args.samples, workdir):
        row = {"model": label, "samples": int(np.load(data, mmap_mode="r").shape[0])}
        for variant in ("lincomp-stats", "ort-minmax"):
            row[variant] = call_worker(variant, model, data, args.batch_size, args.threads)
        rows.append(row)
    print(f"\n1. statistics pass: batch {args.batch_size}, {args.threads} threads, a fresh process per variant")
    print(f"{'model':<34} {'samples':>7} {'variant':<22} {'seconds':>8} {'peak RSS MiB':>12} {'growth MiB':>10}")
    for row in rows:
        for variant, what in (("lincomp-stats", "onnx-lincomp stats"), ("ort-minmax", "onnxruntime MinMax")):
            r = row[variant]
            if "error" in r:
                print(f"{row['model']:<34} {row['samples']:>7} {what:<22} failed: {r['error']}")
                continue
            print(f"{row['model']:<34} {row['samples']:>7} {what:<22} {r['seconds']:>8.2f} {r['peak_rss_mib']:>12.0f} "
                  f"{r['peak_rss_mib'] - r['base_rss_mib']:>10.0f}")
    return rows


# --- 2. simplification -----------------------------------------------------------------------------------------

def batch1_feeds(model: onnx.ModelProto, shapes: dict, fixed: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if inp.name in fixed:
            feeds[inp.name] = fixed[inp.name]
            continue
        dims = shapes.get(inp.name) or tuple(d.dim_value if d.dim_value > 0 else 1
                                             for d in inp.type.tensor_type.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = (rng.random(dims).astype(dtype) if np.issubdtype(dtype, np.floating)
                           else np.zeros(dims, dtype))
    return feeds


def run_ours(path: Path, out: Path, shapes: dict) -> dict:
    cmd = ["-m", "onnx_lincomp", "optimize", str(path), "--calib", "random:64", "-o", str(out), "--no-latency",
           "--allow-larger", "--json", "-"]
    for name, dims in shapes.items():
        cmd += ["--input-shape", f"{name}={','.join(map(str, dims))}"]
    rc, stdout, stderr, wall = run_tool(cmd)
    gated = None
    if rc == 4 and "--max-output-change" in stderr:
        found = re.search(r"changed by up to (\S+) of their scale.*?\(limit (\S+)\)", stderr)
        gated = (f"held-out outputs changed by {found[1]} of their scale (limit {found[2]})" if found
                 else last_line(stderr))
        rc, stdout, stderr, wall = run_tool(cmd + ["--max-output-change", "off"])
    if rc != 0:
        return {"error": f"exit {rc}: {last_line(stderr)}", "wall_seconds": wall}
    report = json.loads(stdout)
    removed = sum(p.get("neurons_removed", 0) for p in report["passes"])
    folded = sum(p.get("neurons_folded", 0) for p in report["passes"])
    return {"wall_seconds": wall, "gated": gated, "removed": removed, "folded": folded}


def run_peer(tool: str, path: Path, out: Path) -> dict:
    if not installed(tool):
        return {"error": f"{tool} not installed: pip install {tool}"}
    return call_worker("simplify", tool, path, out)


def figures(model_path: Path, shapes: dict) -> dict:
    rep = model_report(onnx.load(model_path), {k: tuple(v) for k, v in shapes.items()})
    return {"params": rep.params, "macs": rep.macs, "nodes": sum(rep.op_histogram.values())}


def bench_model(path: Path, workdir: Path, rounds: int) -> dict:
    shapes = INPUT_SHAPES.get(path.name, {})
    original = onnx.load(path)
    row = {"model": f"{path.parent.name}/{path.name}", "original": figures(path, shapes), "tools": {}}
    outputs = {}
    for tool in ("onnx-lincomp", "onnxsim", "onnxslim"):
        out = workdir / f"{path.stem}.{tool}.onnx"
        result = run_ours(path, out, shapes) if tool == "onnx-lincomp" else run_peer(tool, path, out)
        if "error" not in result:
            try:
                result.update(figures(out, shapes))
                outputs[tool] = out
            except Exception as exc:  # a peer's output our counter cannot read is reported, not fatal
                result = {"error": f"model_report failed on the output: {exc}"}
        row["tools"][tool] = result
    if outputs:
        feeds = batch1_feeds(original, shapes, FIXED_FEEDS.get(path.name, {}))
        try:
            cmp = compare_models_latency([path, *outputs.values()], feeds, CompareOptions(rounds=rounds, threads=1))
            row["original"]["latency_b1_ms"] = cmp.latencies[0].median_ms
            for tool, lat, ratio in zip(outputs, cmp.latencies[1:], cmp.ratios[1:], strict=True):
                row["tools"][tool].update(latency_b1_ms=lat.median_ms, latency_ratio=ratio.ratio,
                                          latency_change=ratio.change)
        except Exception as exc:
            row["latency_error"] = str(exc)[:200]
    return row


def bench_simplify(args, workdir: Path) -> list[dict]:
    models = [p for sub in ("real", "trained") for p in sorted((SHARED / "models" / sub).glob("*.onnx"))]
    rows = [bench_model(p, workdir, args.rounds) for p in models]
    print("\n2. simplification: params/MACs per sample, batch-1 latency against the original (1 thread; ~ inside "
          "the noise), tool wall time")
    print(f"{'model':<52} {'original':>13} | {'onnx-lincomp':^29} | {'onnxsim':^29} | {'onnxslim':^29}")
    for row in rows:
        o = row["original"]
        cells = [_cell(row["tools"][t]) for t in ("onnx-lincomp", "onnxsim", "onnxslim")]
        print(f"{row['model'][-52:]:<52} {_size(o['params'], o['macs']):>13} | " + " | ".join(cells))
    for row in rows:
        for tool, r in row["tools"].items():
            if "error" in r:
                print(f"  {row['model']}: {tool} skipped: {r['error']}")
            elif r.get("gated"):
                print(f"  {row['model']}: onnx-lincomp's gate stopped the random-data run ({r['gated']}); "
                      "* = rerun with --max-output-change off")
        if "latency_error" in row:
            print(f"  {row['model']}: latency not measured: {row['latency_error']}")
    return rows


def _size(params: int, macs: int) -> str:
    return f"{_short(params)}/{_short(macs)}"


def _short(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _cell(r: dict) -> str:
    if "error" in r:
        return f"{'skipped':^29}"
    ratio = r.get("latency_ratio")
    lat = "-" if ratio is None else f"{ratio:.2f}{'~' if r.get('latency_change') == 'no change' else ''}"
    mark = "*" if r.get("gated") else ""
    return f"{_size(r['params'], r['macs']) + mark:>14} {lat:>6} {r['wall_seconds']:>6.1f}s"


# --- 3. exact mode ---------------------------------------------------------------------------------------------

def certify_ours(path: Path, milp_time_limit: float) -> dict:
    rc, stdout, stderr, wall = run_tool(["-m", "onnx_lincomp", "certify", str(path), "--input-range", "0,1",
                                         "--milp-time-limit", str(milp_time_limit), "--json", "-"])
    if rc != 0:
        return {"error": f"exit {rc}: {last_line(stderr)}", "wall_seconds": wall}
    cert = json.loads(stdout)
    layers = cert["layers"]
    return {"wall_seconds": wall, "seconds": cert["seconds"]["total"], "complete": cert["complete"],
            "units": sum(x["units"] for x in layers),
            "always_on": sum(x["stably_active_channels"] for x in layers),
            "dead": sum(x["stably_inactive_channels"] for x in layers),
            "unproven": sum(x["unproven"] for x in layers)}


def bench_exact(args) -> list[dict]:
    has_srp = installed("onnxsim") and installed("onnxsim.stable_relu_prune")
    rows = []
    for path in sorted((SHARED / "models" / "exact-compression").glob("*.onnx")):
        theirs = (call_worker("stable-relu", path) if has_srp else
                  {"error": "onnxsim not installed: pip install onnxsim" if not installed("onnxsim")
                   else f"onnxsim {version('onnxsim')} has no stable_relu_prune"})
        rows.append({"model": path.name, "onnx-lincomp": certify_ours(path, args.milp_time_limit),
                     "onnxsim": theirs})
    print("\n3. exact mode on the box [0,1]^n: units proven stable (always active + never active) / all units")
    print(f"{'model':<40} {'onnx-lincomp certify':>34} {'onnxsim stable_relu_prune':>34}")
    for row in rows:
        print(f"{row['model']:<40} {_exact_cell(row['onnx-lincomp']):>34} {_exact_cell(row['onnxsim']):>34}")
    for row in rows:
        for tool in ("onnx-lincomp", "onnxsim"):
            if "error" in row[tool]:
                print(f"  {row['model']}: {tool} skipped: {row[tool]['error']}")
    return rows


def _exact_cell(r: dict) -> str:
    if "error" in r:
        return "skipped"
    proven = r["always_on"] + r["dead"]
    done = "" if "complete" not in r else (" all decided" if r["complete"] else f" {r['unproven']} open")
    return f"{proven}/{r['units']} ({r['always_on']}+{r['dead']}){done} {r['seconds']:.1f}s"


# --- main ------------------------------------------------------------------------------------------------------

def environment(args) -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "onnxsim": version("onnxsim"), "onnxslim": version("onnxslim"),
            "samples": args.samples, "batch_size": args.batch_size, "threads": args.threads,
            "latency_rounds": args.rounds, "milp_time_limit": args.milp_time_limit}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024, help="samples for the statistics pass")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the statistics pass")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved latency rounds")
    ap.add_argument("--milp-time-limit", type=float, default=240.0, help="onnx-lincomp certify's MILP budget")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: calibration, simplify, exact")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        fn = WORKERS[kind]
        typed = [int(v) if v.isdigit() else v for v in rest]
        print(json.dumps(fn(*typed)))
        return 0
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: this benchmark needs ../shared/models")
    for tool in ("onnxsim", "onnxslim"):
        if not installed(tool):
            print(f"{tool} not installed: pip install {tool}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out: dict = {"environment": environment(args)}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "calibration" not in skip:
            out["calibration"] = bench_calibration(args, workdir)
        if "simplify" not in skip:
            out["simplify"] = bench_simplify(args, workdir)
        if "exact" not in skip:
            out["exact"] = bench_exact(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peers.json").write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
