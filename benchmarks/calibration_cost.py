"""Cost of the statistics pass against plain inference and two alternatives, and its peak memory.

    python benchmarks/calibration_cost.py [--samples 1024] [--batch-size 16] [--repeats 3]

Model: 6 Conv 3x3 layers of 64 channels with Relu at 32x32, global average pool, Gemm (random weights).
Variants, timed over the same batches in one run (medians of --repeats, interleaved):
* plain       onnxruntime inference, default optimisations
* lincomp     onnx-lincomp's collect_relu_stats (all statistics of every Relu)
* ort-minmax  onnxruntime.quantization MinMaxCalibrater, per channel, on the Relu tensors
* dump-numpy  Relu inputs exposed as graph outputs, min/max/positive count/sum reduced in numpy
Peak memory: the statistics pass in a fresh process at 256, 1024 and 4096 samples (ru_maxrss).
Prints a table and writes benchmarks/results/calibration_cost.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_lincomp.calibration import CollectOptions, collect_relu_stats, input_specs, open_calibration
from onnx_lincomp.model_io import model_from_proto

RESULTS = Path(__file__).resolve().parent / "results"


def conv_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x, c_in = [], [], "x", 3
    for i in range(6):
        w = rng.normal(0, np.sqrt(2 / (9 * c_in)), (64, c_in, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.1, 64).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x, c_in = f"r{i}", 64
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (10, 64)).astype(np.float32), "wf"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "wf"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "calib_bench",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def session(model: onnx.ModelProto, threads: int, disable: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    if disable:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_plain(model, data, bs, threads):
    sess = session(model, threads)
    start = time.perf_counter()
    for i in range(0, len(data), bs):
        sess.run(None, {"x": np.ascontiguousarray(data[i:i + bs])})
    return time.perf_counter() - start


def run_lincomp(model, data_path, bs, threads):
    loaded = model_from_proto(model)
    source = open_calibration(data_path, input_specs(loaded.graph))
    start = time.perf_counter()
    collect_relu_stats(loaded.graph, loaded.ctx, source, CollectOptions(batch_size=bs, threads=threads))
    return time.perf_counter() - start


def run_dump(model, data, bs, threads):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [f"c{i}" for i in range(6)]
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    sess = session(m, threads)
    start = time.perf_counter()
    for i in range(0, len(data), bs):
        for z in sess.run(names, {"x": np.ascontiguousarray(data[i:i + bs])}):
            z.min(axis=(0, 2, 3)), z.max(axis=(0, 2, 3)), (z > 0).sum(axis=(0, 2, 3)), z.sum(axis=(0, 2, 3))
            z.max(axis=(2, 3))  # per-sample activity
    return time.perf_counter() - start


def run_ort_minmax(model, data, bs, threads, workdir):
    from onnxruntime.quantization.calibrate import CalibrationDataReader, MinMaxCalibrater

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(data):
                return None
            batch = {"x": np.ascontiguousarray(data[self.i:self.i + bs])}
            self.i += bs
            return batch

    path = Path(workdir) / "m.onnx"
    onnx.save(model, path)
    cal = MinMaxCalibrater(path, op_types_to_calibrate=["Relu"], augmented_model_path=str(Path(workdir) / "aug.onnx"),
                           per_channel=True)
    cal.augment_graph()
    so_threads = threads
    cal.create_inference_session()
    cal.infer_session = session(onnx.load(Path(workdir) / "aug.onnx"), so_threads, disable=True)
    start = time.perf_counter()
    cal.collect_data(Reader())
    cal.compute_data()
    return time.perf_counter() - start


def peak_memory(samples: int, bs: int, threads: int, workdir: str) -> float:
    """Peak RSS (MiB) of a fresh process computing statistics over ``samples`` memory-mapped samples."""
    data_path = Path(workdir) / f"mem_{samples}.npy"
    arr = np.lib.format.open_memmap(data_path, mode="w+", dtype=np.float32, shape=(samples, 3, 32, 32))
    rng = np.random.default_rng(1)
    for i in range(0, samples, 256):
        arr[i:i + 256] = rng.normal(size=(min(256, samples - i), 3, 32, 32))
    arr.flush()
    del arr
    model_path = Path(workdir) / "mem_model.onnx"
    onnx.save(conv_model(), model_path)
    code = ("import resource,sys,onnx\n"
            "from onnx_lincomp.calibration import CollectOptions, collect_relu_stats, input_specs, open_calibration\n"
            "from onnx_lincomp.model_io import load_model\n"
            f"m = load_model({str(model_path)!r})\n"
            f"s = open_calibration({str(data_path)!r}, input_specs(m.graph))\n"
            f"collect_relu_stats(m.graph, m.ctx, s, CollectOptions(batch_size={bs}, threads={threads}))\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    model = conv_model()
    with tempfile.TemporaryDirectory() as workdir:
        data = np.random.default_rng(0).normal(size=(args.samples, 3, 32, 32)).astype(np.float32)
        data_path = Path(workdir) / "data.npy"
        np.save(data_path, data)
        data = np.load(data_path, mmap_mode="r")
        times: dict[str, list[float]] = {k: [] for k in ("plain", "lincomp", "ort-minmax", "dump-numpy")}
        for _ in range(args.repeats):
            times["plain"].append(run_plain(model, data, args.batch_size, args.threads))
            times["lincomp"].append(run_lincomp(model, data_path, args.batch_size, args.threads))
            times["ort-minmax"].append(run_ort_minmax(model, data, args.batch_size, args.threads, workdir))
            times["dump-numpy"].append(run_dump(model, data, args.batch_size, args.threads))
        med = {k: statistics.median(v) for k, v in times.items()}
        memory = {} if args.no_memory else {n: peak_memory(n, args.batch_size, args.threads, workdir)
                                            for n in (256, 1024, 4096)}
    print(f"statistics pass, {args.samples} samples, batch {args.batch_size}, {args.threads} threads, median of "
          f"{args.repeats}")
    print(f"{'variant':<12} {'seconds':>8} {'ratio to plain':>15}")
    for k, v in med.items():
        print(f"{k:<12} {v:>8.3f} {v / med['plain']:>15.3f}")
    if memory:
        print("peak RSS of the statistics pass (fresh process, memory-mapped data)")
        for n, mib in memory.items():
            print(f"{n:>6} samples {mib:>8.1f} MiB")
        spread = (max(memory.values()) - min(memory.values())) / min(memory.values())
        print(f"spread 256..4096 samples: {100 * spread:.1f}%")
    RESULTS.mkdir(exist_ok=True)
    out = {"samples": args.samples, "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
           "seconds": times, "median_seconds": med, "ratio_to_plain": {k: v / med["plain"] for k, v in med.items()},
           "peak_rss_mib": memory, "onnxruntime": ort.__version__}
    (RESULTS / "calibration_cost.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
