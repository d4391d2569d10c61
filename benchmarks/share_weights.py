"""k-means weight sharing (share-weights): held-out accuracy, file size, session start-up and latency.

    OPENBLAS_NUM_THREADS=1 python benchmarks/share_weights.py [--models digits,fmnist,mnist8] [--bits 8,4,3,2]

For each model and bit width, five ways of choosing the shared weights (every shareable layer at that
width): ``plain`` (k-means, nearest centroid: Deep Compression without retraining), ``refit`` (nearest,
then the least-squares codebook refit and bias correction), ``gptq`` (GPTQ-style sequential rounding
with the calibration Hessian, bias correction, no refit), ``gptq+refit`` (both), each layer judged on
the float model's activations (input moments collected once per model), and ``default`` (the pass's
defaults, run through the pipeline as ``optimize`` does: gptq + refit + bias correction with the layers
shared in graph order, each on the inputs the shared layers before it produce, refit first to the float
outputs).

Data: the bundled digits MLP on its calibration file (432 calibrate, 108 held out); own_fmnist_mlp_l1 on
the Fashion-MNIST test set and onnxzoo mnist-8 on the MNIST test set (2,000 calibrate, 8,000 held out).
For the ``default`` model: file size ratio (FP32 file / shared file), session start-up time (median of
interleaved creations, onnxruntime's default optimisations, which fold the codebooks back) against the
FP32 file, and the latency after start-up against FP32 (interleaved rounds, batch 1, 2 threads).
Single-threaded BLAS is advised on a shared machine: the moments are many small matrix products, which
a multi-threaded BLAS makes far slower when the cores are busy. Writes benchmarks/results/share_weights.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import onnxruntime as ort  # noqa: E402

from conftest import SHARED  # noqa: E402
from onnx_lincomp.examples import example_paths  # noqa: E402
from onnx_lincomp.gates import compare_two, latency_feeds  # noqa: E402
from onnx_lincomp.model_io import save_model_proto, to_model_proto  # noqa: E402
from onnx_lincomp.optimize import compress  # noqa: E402
from onnx_lincomp.passes.share_weights import ShareWeights, ShareWeightsOptions, layer_moments  # noqa: E402
from onnx_lincomp.prepared import calibration_data, prepare  # noqa: E402
from onnx_lincomp.recipe import CalibrationSettings, PassSpec, Recipe  # noqa: E402
from real_models import RealModel, calibration_file  # noqa: E402

RESULTS = HERE / "results" / "share_weights.json"
METHODS = {  # independent layers, on moments collected once per model
    "plain": {"rounding": "nearest", "refit_codebook": False, "bias_correction": False},
    "refit": {"rounding": "nearest", "refit_codebook": True, "bias_correction": True},
    "gptq": {"rounding": "gptq", "refit_codebook": False, "bias_correction": True},
    "gptq+refit": {"rounding": "gptq", "refit_codebook": True, "bias_correction": True},
}
DEFAULT = "default"  # the pass's defaults with data: gptq + refit + bias correction, sequential, via the pipeline
REFERENCE = {  # the figures (test accuracy; mnist-8 FP32 98.96)
    "mnist8": {"plain": {8: 98.94, 4: 98.84, 3: 98.39, 2: 96.10}, "gptq": {8: 98.96, 4: 98.92, 3: 98.90, 2: 98.61}},
}


def cases(tmp: Path) -> dict:
    digits = example_paths("digits-mlp")
    return {
        "digits": ("digits_mlp (bundled)", str(digits[0]), lambda: str(digits[1]), 0.2, None),
        "fmnist": ("own_fmnist_mlp_l1", str(SHARED / "models/trained/own_fmnist_mlp_l1.onnx"),
                   lambda: calibration_file(RealModel("trained/own_fmnist_mlp_l1.onnx", "fmnist", 10000), tmp),
                   0.8, 10000),
        "mnist8": ("onnxzoo_mnist-8", str(SHARED / "models/real/onnxzoo_mnist-8.onnx"),
                   lambda: calibration_file(RealModel("real/onnxzoo_mnist-8.onnx", "mnist-raw", 10000), tmp),
                   0.8, 10000),
    }


def startup_ms(paths: list[str], repeats: int = 7) -> list[float]:
    """Median session creation time of each file (interleaved, onnxruntime's default optimisations)."""
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(repeats):
        for i, p in enumerate(paths):
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            so.log_severity_level = 3
            start = time.perf_counter()
            ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
            times[i].append(1000 * (time.perf_counter() - start))
    return [statistics.median(t) for t in times]


def build(prep, moments, options: ShareWeightsOptions):
    graph = prep.loaded.graph.copy()
    p = ShareWeights(options)
    result = p.apply(graph, p.plan_with_moments(graph, moments, p.rounding_for(True)))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return to_model_proto(graph, prep.loaded.ctx), result


def run_model(key: str, case, bits_list, tmp: Path) -> list[dict]:
    name, path, calib, split, max_samples = case
    cal = CalibrationSettings(verify_split=split, max_samples=max_samples)
    prep = prepare(path, calib(), Recipe(calibration=cal), "y")
    start = time.perf_counter()
    moments = layer_moments(prep.loaded.graph, calibration_data(prep), 0)
    moment_s = time.perf_counter() - start
    judge = prep.evaluator("heldout", 2)
    rows = []
    for bits in bits_list:
        row = {"model": name, "bits": bits, "calibration_samples": prep.n_calib, "heldout_samples": prep.heldout_count,
               "moments_s": moment_s}
        for method, opts in METHODS.items():
            start = time.perf_counter()
            model, _ = build(prep, moments, replace(ShareWeightsOptions(), bits=bits, **opts))
            v = judge.score(model)
            row["fp32_acc"] = 100 * v.accuracy_before
            row[f"{method}_acc"] = 100 * v.accuracy_after
            row[f"{method}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model, records = compress(prep, None, Recipe((PassSpec.of("share-weights", {"bits": bits}),), cal))
        row[f"{DEFAULT}_acc"] = 100 * judge.score(model).accuracy_after
        row[f"{DEFAULT}_s"] = time.perf_counter() - start
        row.update(storage(prep, path, model, records[-1].result, tmp / f"{key}_{bits}.onnx"))
        rows.append(row)
        print(line(row), flush=True)
    return rows


def storage(prep, path: str, model, result, out: Path) -> dict:
    """File size, Huffman estimate, session start-up and latency after start-up against the FP32 file."""
    save_model_proto(model, out)
    fp32_size = Path(path).stat().st_size
    s_fp32, s_shared = startup_ms([path, str(out)])
    lat = compare_two(prep.original, model, latency_feeds(prep, 1, {})[0], 2).ratios[1]
    return {"file_bytes": out.stat().st_size, "fp32_bytes": fp32_size, "size_ratio": fp32_size / out.stat().st_size,
            "notes": list(result.notes), "huffman_index_bytes": result.count("huffman_index_bytes"),
            "index_bytes": result.count("index_bytes"), "startup_ms_fp32": s_fp32, "startup_ms_shared": s_shared,
            "startup_ratio": s_shared / s_fp32, "latency_ratio": lat.ratio, "latency_low": lat.low,
            "latency_high": lat.high, "latency_verdict": lat.verdict}


HEADER = (f"{'model':<22} {'bits':>4} {'FP32':>6} {'plain':>6} {'refit':>6} {'gptq':>6} {'g+refit':>7} {'default':>7} "
          f"{'size x':>7} {'Huffman':>7} {'start-up':>14} {'latency after start-up':>24}")


def line(r: dict) -> str:
    start = f"{r['startup_ms_shared']:.1f}/{r['startup_ms_fp32']:.1f}ms"
    return (f"{r['model']:<22} {r['bits']:>4} {r['fp32_acc']:>6.2f} {r['plain_acc']:>6.2f} {r['refit_acc']:>6.2f} "
            f"{r['gptq_acc']:>6.2f} {r['gptq+refit_acc']:>7.2f} {r['default_acc']:>7.2f} {r['size_ratio']:>7.1f} "
            f"{r['huffman_index_bytes'] / max(r['index_bytes'], 1):>7.0%} {start:>14} "
            f"{r['latency_ratio']:>6.3f} ({r['latency_verdict']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,fmnist,mnist8")
    ap.add_argument("--bits", default="8,4,3,2")
    args = ap.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lincomp-share-") as tmp:
        table = cases(Path(tmp))
        print(HEADER)
        for key in args.models.split(","):
            rows += run_model(key, table[key], bits_list, Path(tmp))
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps({"rows": rows, "reference": REFERENCE, "onnxruntime": ort.__version__},
                                          indent=2))
    print(f"(accuracy: held-out %, methods as in the docstring; size x: FP32 file / shared file (default); "
          f"Huffman: coded indices / packed indices; start-up: shared/FP32 session creation; latency: shared/FP32 "
          f"batch 1, 2 threads)\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
