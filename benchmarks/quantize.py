"""The onnxruntime-backed quantizers on real models: latency against FP32, accuracy or output agreement, file size,
and the peak memory of calibration at 256 and 4,096 samples.

    python benchmarks/quantize.py [--only NAME[,NAME...]] [--threads 2] [--skip-memory] [--calib-methods m,...]
    python benchmarks/quantize.py --bias-correction-ab [--only NAME[,NAME...]]
    python benchmarks/quantize.py --exclude-sensitive BUDGET [--only NAME[,NAME...]]

Rows (every quantized model passes the full ONNX checker and runs in onnxruntime):
* INT8 QDQ (``quantize-int8``, MinMax, per-channel int8 weights, uint8 activations) on the bundled digits CNN,
  trained/own_fmnist_cnn_bn (Fashion-MNIST), real/onnxzoo_mnist-8 (MNIST), UltraFace RFB-320 (BN folded) on random
  inputs and PP-OCRv4 det (x 1x3x320x320) on 40 pages of MNIST digits set as text (``tests/text_images.py``; 32
  calibrate, 8 held out; on noise it outputs zeros), both judged by agreement and output error instead of accuracy;
  PP-OCR cls (x 1x3x48x192) on 1,000 such text lines, half turned 180 degrees (the label; 500 calibrate, 500 held
  out);
* dynamic INT8 (``quantize-dynamic``) and 4-bit weights (``quantize-weights-4bit``: rtn, gptq, rtn with int8 compute)
  on the bundled digits MLP and trained/own_fmnist_mlp_l1.

Labelled models calibrate on the first 2,000 test images and are scored on the other 8,000 (digits: the bundled
432 / 108 split). Latency: the quantized model against the float one (the canonical graph the pass started from) in
interleaved rounds (31 rounds of about 25 ms per model), ``--threads`` intra-op threads, at batch 1 and 32
(models with a fixed batch of 1, PP-OCR and UltraFace: batch 1 only); each figure records the load average. The
pass's own keep/decline verdict (batch 1) is in the ``pass verdict`` column: the passes run with ``keep_slower`` so
that every row has a quantized model to measure.

Memory: ``calibrate_ranges`` (one batch at a time) in a fresh process on the Fashion-MNIST CNN at 256 and 4,096
samples, MinMax and Entropy, against onnxruntime's own calibrator loop (every batch's activations held until the
end) at 256 and 1,024: the peak resident size during calibration (VmHWM, reset through /proc/self/clear_refs
just before) minus the resident size at that moment.

Prints a table and writes benchmarks/results/quantize.json.

``--bias-correction-ab``: instead, each labelled case's quantizers with ``bias_correction`` off and on (no latency):
held-out accuracy, the mean output shift on the calibration split (``|mean(y_q - y)|`` averaged over outputs: what
the correction targets) and the held-out RMS output error; writes benchmarks/results/quantize_bias_correction.json.

``--exclude-sensitive BUDGET``: instead, ``quantize-int8`` on each labelled INT8 case with ``exclude_sensitive
auto`` and ``max_drop BUDGET``: the layers kept float, the predicted and measured calibration drops, and the
held-out accuracy against plain INT8; writes benchmarks/results/quantize_exclude_sensitive.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SHARED  # noqa: E402
from onnx_lincomp.calibration import input_specs, open_calibration  # noqa: E402
from onnx_lincomp.calibration.activations import CalibrationData  # noqa: E402
from onnx_lincomp.canonicalize import canonicalize  # noqa: E402
from onnx_lincomp.examples import example_paths  # noqa: E402
from onnx_lincomp.model_io import load_model, to_model_proto  # noqa: E402
from onnx_lincomp.passes import PassContext  # noqa: E402
from onnx_lincomp.pipeline import run_pipeline  # noqa: E402
from onnx_lincomp.recipe import PassSpec  # noqa: E402
from onnx_lincomp.rewrite.ort_quantize import export_context  # noqa: E402
from onnx_lincomp.runtime.feeds import benchmark_feeds, fixed_batch, iterate_feeds  # noqa: E402
from onnx_lincomp.runtime.latency import CompareOptions, compare_models_latency  # noqa: E402
from onnx_lincomp.runtime.session import SessionOptions, open_session  # noqa: E402
from real_models import RealModel, calibration_file  # noqa: E402

CALIB, HELD_OUT = 2000, 8000


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # path under ../shared/models, or "example:NAME"
    data: str  # RealModel data kind, "example", or "random:N"
    passes: tuple[tuple[str, str, dict], ...]  # (label, pass name, options)
    input_shapes: dict = field(default_factory=dict)
    batch32: bool = True


INT8 = (("INT8 QDQ", "quantize-int8", {}),)
MLP = (("dynamic INT8", "quantize-dynamic", {}),
       ("4-bit rtn", "quantize-weights-4bit", {}),
       ("4-bit gptq", "quantize-weights-4bit", {"algorithm": "gptq"}),
       ("4-bit rtn acc4", "quantize-weights-4bit", {"accuracy_level": 4}))
CASES = (
    Case("digits-cnn", "example:digits-cnn", "example", INT8),
    Case("fmnist-cnn-bn", "trained/own_fmnist_cnn_bn.onnx", "fmnist-4d", INT8),
    Case("mnist-8", "real/onnxzoo_mnist-8.onnx", "mnist-raw", INT8),
    Case("ultraface-320", "real/ortexamples_ultraface_RFB-320_bnfolded.onnx", "random:40", INT8, batch32=False),
    Case("ppocr-v4-det", "real/ch_PP-OCRv4_det_infer.onnx", "text-pages:40", INT8, {"x": (1, 3, 320, 320)},
         batch32=False),
    Case("ppocr-cls", "real/ch_ppocr_mobile_v2.0_cls_infer.onnx", "text-lines:1000", INT8, {"x": (1, 3, 48, 192)}),
    Case("digits-mlp", "example:digits-mlp", "example", MLP),
    Case("fmnist-mlp-l1", "trained/own_fmnist_mlp_l1.onnx", "fmnist", MLP),
)


def open_case(case: Case, workdir: Path):
    """(loaded canonical model, model path, data source, calibration samples, labels key or None)."""
    if case.model.startswith("example:"):
        path, calib = example_paths(case.model.split(":", 1)[1])
        labels = "y"
    else:
        path = SHARED / "models" / case.model
        if case.data.startswith("random"):
            calib, labels = case.data, None
        elif case.data.startswith("text-"):  # MNIST digits set as text (tests/text_images.py): kind:samples
            kind, count = case.data.split(":")
            calib = calibration_file(RealModel(case.model, kind, int(count), case.input_shapes), workdir)
            labels = "y" if kind == "text-lines" else None
        else:
            calib, labels = calibration_file(RealModel(case.model, case.data, CALIB + HELD_OUT), workdir), "y"
    loaded = load_model(path)
    canonicalize(loaded.graph, ctx=loaded.ctx)
    source = open_calibration(str(calib), input_specs(loaded.graph), labels=labels, shape_overrides=case.input_shapes)
    if case.data == "example":
        n_calib = int(round(len(source) * 0.8))
    elif labels is None:
        n_calib = 32
    elif case.data.startswith("text-"):
        n_calib = len(source) // 2
    else:
        n_calib = CALIB
    return loaded, Path(path), source, n_calib, labels


def quantize(loaded, source, n_calib: int, pass_name: str, options: dict, threads: int):
    graph = loaded.graph.copy()
    data = CalibrationData(source, loaded.ctx, n_calib, batch_size=32, threads=threads)
    start = time.perf_counter()
    records = run_pipeline(graph, (PassSpec.of(pass_name, dict(options, keep_slower=True)),), PassContext(None, data))
    seconds = time.perf_counter() - start
    model = to_model_proto(graph, export_context(loaded.ctx, graph))
    onnx.checker.check_model(model, full_check=True)
    return model, records[-1].result, seconds


def outputs(model: onnx.ModelProto, source, inputs, start: int, stop: int, threads: int, labels: str | None):
    session = open_session(model, options=SessionOptions(threads=threads))
    outs, ys = [], []
    for feeds, batch in iterate_feeds(inputs, source, 256, start, stop):
        outs.append(session.run(None, feeds)[0])
        if labels:
            ys.append(batch[labels])
    return np.concatenate(outs), (np.concatenate(ys) if labels else None)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement over the last axis, or, for one-channel maps (text detection), agreement of the 0.3
    binarisation the detector's post-processing uses."""
    if a.ndim == 4 and a.shape[1] == 1:
        return float(((a > 0.3) == (b > 0.3)).mean())
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def score(float_model, q_model, source, inputs, n_calib: int, threads: int, labels: str | None) -> dict:
    stop = len(source) if labels else n_calib + 8
    start = n_calib
    ya, y = outputs(float_model, source, inputs, start, stop, threads, labels)
    yb, _ = outputs(q_model, source, inputs, start, stop, threads, None)
    row = {"samples": int(len(ya)), "agreement": agreement(ya, yb),
           "rel_rms_error": float(np.sqrt(np.mean((ya - yb) ** 2)) / max(np.sqrt(np.mean(ya ** 2)), 1e-12)),
           "max_abs_error": float(np.abs(ya - yb).max()), "output_scale": float(np.abs(ya).max())}
    if labels:
        row["acc_before"] = float((ya.argmax(-1) == y).mean() * 100)
        row["acc_after"] = float((yb.argmax(-1) == y).mean() * 100)
        row["acc_change"] = row["acc_after"] - row["acc_before"]
    return row


ROUNDS = 31


def latency(float_model, q_model, source, inputs, batch: int, threads: int) -> dict:
    feeds, used = benchmark_feeds(list(inputs), source, batch)
    comp = compare_models_latency([float_model, q_model], feeds,
                                  CompareOptions(threads=threads, batch_size=used, rounds=ROUNDS, round_ms=25.0))
    r = comp.ratios[1]
    return {"batch": used, "threads": threads, "load_average": os.getloadavg()[0],
            "float_ms": comp.latencies[0].median_ms, "quant_ms": comp.latencies[1].median_ms,
            "ratio": r.ratio, "low": r.low, "high": r.high, "verdict": r.verdict}


def with_methods(passes: tuple, methods: list[str]) -> tuple:
    """The INT8 entries once per activation calibration method (``--calib-methods``); other passes as they are."""
    if not methods:
        return passes
    return tuple((f"{label} {m}", name, dict(options, calib_method=m)) if name == "quantize-int8"
                 else (label, name, options) for label, name, options in passes for m in methods
                 if name == "quantize-int8" or m == methods[0])


def run_case(case: Case, threads: int, workdir: Path, methods: list[str] | None = None) -> list[dict]:
    loaded, path, source, n_calib, labels = open_case(case, workdir)
    inputs = loaded.graph.inputs
    float_model = to_model_proto(loaded.graph, loaded.ctx)
    float_bytes = path.stat().st_size
    fixed = fixed_batch(inputs, source.per_sample) is not None
    rows = []
    for label, pass_name, options in with_methods(case.passes, methods or []):
        q_model, result, seconds = quantize(loaded, source, n_calib, pass_name, options, threads)
        row = {"model": case.name, "quantizer": label, "pass": pass_name, "options": options,
               "pass_seconds": seconds, "layers_quantized": result.count("layers_quantized"),
               "pass_notes": list(result.notes),
               "pass_verdict": next((n.split(": ", 1)[1] for n in result.notes if "vs FP32 at batch" in n), ""),
               "bytes_before": float_bytes, "bytes_after": q_model.ByteSize(),
               "calibration_samples": n_calib}
        row["size_ratio"] = row["bytes_after"] / row["bytes_before"]
        row.update(score(float_model, q_model, source, inputs, n_calib, threads, labels))
        row["latency_b1"] = latency(float_model, q_model, source, inputs, 1, threads)
        row["latency_b32"] = (latency(float_model, q_model, source, inputs, 32, threads)
                              if case.batch32 and not fixed else None)
        rows.append(row)
        print(f"  {case.name:14s} {label:16s} b1 {row['latency_b1']['verdict']:>16s}  "
              f"b32 {(row['latency_b32'] or {}).get('verdict', 'n/a'):>16s}  "
              f"acc {row.get('acc_change', float('nan')):+.2f}  agree {row['agreement']:.4f}  "
              f"size {row['size_ratio']:.3f}", flush=True)
    return rows


# ---- calibration memory ----------------------------------------------------------------------------------------
MEMORY_CHILD = r"""
import sys, json
sys.path.insert(0, {tests!r})
from onnx_lincomp.calibration import input_specs, open_calibration
from onnx_lincomp.calibration.activations import CalibrationData
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.model_io import load_model
from onnx_lincomp.rewrite.ort_quantize import FeedReader, Workspace, calibrate_ranges, export_float, pre_process

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # MiB
loaded = load_model({model!r})
canonicalize(loaded.graph, ctx=loaded.ctx)
source = open_calibration({calib!r}, input_specs(loaded.graph))
data = CalibrationData(source, loaded.ctx, {samples}, batch_size=32, max_samples={samples})
with Workspace() as ws:
    pre = pre_process(export_float(loaded.graph, loaded.ctx, 13), ws)
    reader = FeedReader(data, loaded.graph.inputs)
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current resident size
        fh.write("5")
    base = status("VmRSS")
    if {mode!r} == "ours":
        calibrate_ranges(pre, reader, {method!r}, ws)
    else:  # onnxruntime's own loop: one collect_data over every batch
        from onnxruntime.quantization.calibrate import create_calibrator
        from onnx_lincomp.rewrite.ort_quantize import ort_method, quiet_onnxruntime
        with quiet_onnxruntime():
            cal = create_calibrator(pre, None, augmented_model_path=str(ws.file("aug.onnx")),
                                    calibrate_method=ort_method({method!r}))
            cal.collect_data(reader)
            cal.compute_data()
    peak = status("VmHWM")
print(json.dumps({{"base_mib": base, "peak_mib": peak}}))
"""


def memory(workdir: Path) -> list[dict]:
    model = SHARED / "models" / "trained" / "own_fmnist_cnn_bn.onnx"
    calib = calibration_file(RealModel("trained/own_fmnist_cnn_bn.onnx", "fmnist-4d", 4096), workdir)
    rows = []
    plan = [("ours", "minmax", 256), ("ours", "minmax", 4096), ("ours", "entropy", 256), ("ours", "entropy", 4096),
            ("onnxruntime", "entropy", 256), ("onnxruntime", "entropy", 1024)]
    for mode, method, samples in plan:
        code = MEMORY_CHILD.format(tests=str(HERE.parent / "tests"), model=str(model), calib=calib, samples=samples,
                                   mode=mode, method=method)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        row = {"calibrator": mode, "method": method, "samples": samples, "seconds": time.perf_counter() - start,
               "base_mib": got["base_mib"], "peak_mib": got["peak_mib"],
               "growth_mib": got["peak_mib"] - got["base_mib"]}
        rows.append(row)
        print(f"  memory {mode:12s} {method:8s} {samples:5d} samples: peak {row['peak_mib']:7.1f} MiB "
              f"(+{row['growth_mib']:.1f} over the process before calibrating)", flush=True)
    return rows


def _calib_shift(float_model, q_model, source, inputs, n_calib: int, threads: int) -> float:
    ya, _ = outputs(float_model, source, inputs, 0, n_calib, threads, None)
    yb, _ = outputs(q_model, source, inputs, 0, n_calib, threads, None)
    return float(np.abs((yb - ya).reshape(len(ya), -1).mean(axis=0)).mean())


def bias_correction_ab(case: Case, threads: int, workdir: Path) -> list[dict]:
    """Every quantizer of a labelled case with bias correction off, then on."""
    loaded, _, source, n_calib, labels = open_case(case, workdir)
    if labels is None:
        return []
    inputs = loaded.graph.inputs
    float_model = to_model_proto(loaded.graph, loaded.ctx)
    rows = []
    for label, pass_name, options in case.passes:
        if pass_name == "quantize-dynamic":
            continue
        for on in (False, True):
            q_model, result, seconds = quantize(loaded, source, n_calib, pass_name,
                                                dict(options, bias_correction=on), threads)
            row = {"model": case.name, "quantizer": label, "bias_correction": on, "pass_seconds": seconds,
                   "calib_mean_shift": _calib_shift(float_model, q_model, source, inputs, n_calib, threads),
                   "notes": [n for n in result.notes if "bias correction" in n]}
            row.update(score(float_model, q_model, source, inputs, n_calib, threads, labels))
            rows.append(row)
            print(f"  {case.name:14s} {label:16s} correction {'on ' if on else 'off'}  acc {row['acc_before']:.2f} -> "
                  f"{row['acc_after']:.2f} ({row['acc_change']:+.2f})  calib mean shift "
                  f"{row['calib_mean_shift']:.4g}  held-out rel rms {row['rel_rms_error']:.4g}", flush=True)
    return rows


def exclusion(case: Case, budget: float, threads: int, workdir: Path) -> list[dict]:
    """quantize-int8 plain and with exclude_sensitive auto within ``budget`` points."""
    loaded, _, source, n_calib, labels = open_case(case, workdir)
    if labels is None or not any(p == "quantize-int8" for _, p, _ in case.passes):
        return []
    inputs = loaded.graph.inputs
    float_model = to_model_proto(loaded.graph, loaded.ctx)
    rows = []
    for options in ({}, {"exclude_sensitive": "auto", "max_drop": budget}):
        q_model, result, seconds = quantize(loaded, source, n_calib, "quantize-int8", options, threads)
        row = {"model": case.name, "options": options, "pass_seconds": seconds,
               "layers_quantized": result.count("layers_quantized"),
               "layers_excluded_sensitive": result.count("layers_excluded_sensitive"),
               "notes": [n for n in result.notes if "sensitiv" in n or "kept float" in n]}
        row.update(score(float_model, q_model, source, inputs, n_calib, threads, labels))
        rows.append(row)
        print(f"  {case.name:14s} {json.dumps(options):45s} held-out acc {row['acc_before']:.2f} -> "
              f"{row['acc_after']:.2f} ({row['acc_change']:+.2f}), {row['layers_excluded_sensitive']} kept float, "
              f"{seconds:.1f} s", flush=True)
        for note in row["notes"]:
            print(f"      {note}")
    return rows


def _ratio(lat: dict | None) -> str:
    return f"{lat['ratio']:.2f} ({lat['verdict']})" if lat else "n/a"


def table(rows: list[dict]) -> str:
    head = ("| model | quantizer | b1 ratio (q/fp32) | b32 ratio | pass verdict (b1) | accuracy change | agreement | "
            "max abs error / output scale | size ratio |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        acc = (f"{r['acc_before']:.2f} -> {r['acc_after']:.2f} ({r['acc_change']:+.2f})" if "acc_change" in r
               else "n/a (no labels)")
        lines.append(f"| {r['model']} | {r['quantizer']} | {_ratio(r['latency_b1'])} | {_ratio(r['latency_b32'])} | "
                     f"{r['pass_verdict'].split(' (')[0]} | {acc} | {r['agreement']:.4f} | "
                     f"{r['max_abs_error']:.3g} / {r['output_scale']:.3g} | "
                     f"{r['size_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="Comma-separated case names (default: all).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--calib-methods", default="", help="INT8 once per activation calibration method, e.g. "
                                                        "minmax,percentile,entropy (default: the pass default)")
    ap.add_argument("--bias-correction-ab", action="store_true", help="Bias correction off/on on the labelled cases.")
    ap.add_argument("--exclude-sensitive", type=float, metavar="BUDGET",
                    help="quantize-int8 with exclude_sensitive auto within BUDGET points, against plain INT8.")
    args = ap.parse_args()
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    if args.bias_correction_ab or args.exclude_sensitive is not None:
        side_study(args, only)
        return
    rows, mem = [], []
    with tempfile.TemporaryDirectory(prefix="lincomp-qbench-") as tmp:
        for case in CASES:
            if only and case.name not in only:
                continue
            rows.extend(run_case(case, args.threads, Path(tmp), [m for m in args.calib_methods.split(",") if m]))
        if not args.skip_memory:
            mem = memory(Path(tmp))
    print()
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "quantize.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    done = {r["model"] for r in rows}  # a partial run (--only, --skip-memory) keeps the other rows and memory figures
    rows = [r for r in previous.get("rows", []) if r["model"] not in done] + rows
    mem = mem or previous.get("memory", [])
    out.write_text(json.dumps({"threads": args.threads, "rows": rows, "memory": mem}, indent=1, default=str))
    print(f"\nwrote {out}")


def side_study(args, only: set[str]) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lincomp-qbench-") as tmp:
        for case in CASES:
            if only and case.name not in only:
                continue
            if args.bias_correction_ab:
                rows.extend(bias_correction_ab(case, args.threads, Path(tmp)))
            else:
                rows.extend(exclusion(case, args.exclude_sensitive, args.threads, Path(tmp)))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("quantize_bias_correction.json" if args.bias_correction_ab else "quantize_exclude_sensitive.json")
    previous = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {r["model"] for r in rows}
    merged = [r for r in previous if r["model"] not in done] + rows
    out.write_text(json.dumps({"threads": args.threads, "rows": merged}, indent=1, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
