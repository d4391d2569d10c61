"""Smoke run of the whole optimize path on a model over 2 GiB (external data).

    python benchmarks/big_model_smoke.py [--dim 16384] [--workdir /tmp/big]

Builds Gemm(dim x dim)-Relu-Gemm(dim x dim)-Relu-Gemm(dim x 10) with external data (two 1 GiB
matrices at dim 16384, 2.1 GB in all), plants dead units, then runs `onnx-lincomp optimize` on it
with random calibration data and checks the output loads and is smaller. Then reports both models with
the one counter (parameters by dtype, non-zeros, parameter bytes, bytes on disk, MACs) and checks that
shapes are re-inferred on the loaded output (the weightless path: it is over 2 GiB). Peak RSS of the optimize
process is printed against the model size (goal <= 2.5x); the model is built in a child process so that
this process is small when it launches optimize (a child's peak includes its parent's size at fork). Not
part of the test suite. Writes benchmarks/results/big_model_smoke.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lincomp.analysis.model_report import graph_figures, model_report
from onnx_lincomp.graph_edit import refresh_shapes
from onnx_lincomp.model_io import load_model, read_model_proto, size_on_disk


def build(dim: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i, out in enumerate((dim, dim, 10)):
        w = (rng.standard_normal((out, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
        b = np.zeros(out, np.float32)
        if i < 2:
            b[: out // 4] = -100.0  # a quarter of the units are dead
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        y = f"z{i}" if i < 2 else "y"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], name=f"fc{i}", transB=1))
        if i < 2:
            nodes.append(helper.make_node("Relu", [y], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
        del w
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    (path.parent / (path.name + ".data")).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
                    save_as_external_data=True, location=path.name + ".data")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=16384)
    ap.add_argument("--workdir", default="/tmp/big")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "big.onnx", work / "big_small.onnx"
    start = time.perf_counter()
    # built in a child process: a child's peak RSS includes what its parent held when it forked (Linux keeps
    # the pre-exec high-water mark), so this process stays small before it launches optimize
    here = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); from big_model_smoke import "
                    f"build; from pathlib import Path; build({args.dim}, Path({str(src)!r}))"], check=True)
    size = src.stat().st_size + (work / "big.onnx.data").stat().st_size
    print(f"built {src} ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    command = [sys.executable, "-m", "onnx_lincomp", "optimize", str(src), "--calib", "random:32", "-o", str(out),
               "--no-latency", "--batch-size", "8", "--max-output-change", "off"]  # random data: a smoke run
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    # this child's own peak (wait4), not RUSAGE_CHILDREN: that is the largest of all children, the builder too
    _, status, usage = os.wait4(proc.pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    peak = usage.ru_maxrss * 1024  # Linux: KiB
    print(output[-4000:])
    print(f"optimize exit {returncode} in {seconds:.1f} s; peak RSS {peak / 2**30:.2f} GiB = "
          f"{peak / size:.2f}x the model size (goal <= 2.5x)")
    out_json = Path(__file__).resolve().parent / "results" / "big_model_smoke.json"
    out_json.parent.mkdir(exist_ok=True)
    out_json.write_text(json.dumps({"model_bytes": size, "seconds": seconds, "peak_rss_bytes": peak,
                                    "peak_over_model": peak / size, "exit": returncode}, indent=2))
    if returncode == 0:
        print(f"output {out} with its external data: {size_on_disk(out) / 2**30:.2f} GiB")
        onnx.checker.check_model(str(out))
    for path in (src, out) if returncode == 0 else (src,):
        report(path)


def report(path: Path) -> None:
    """The one counter on a model file, then shape refresh and graph figures on its loaded graph."""
    start = time.perf_counter()
    rep = model_report(read_model_proto(path), size_bytes=size_on_disk(path))
    print(f"{path.name}: params {rep.params:,} {rep.params_by_dtype} nonzeros {rep.nonzeros:,} "
          f"param bytes {rep.param_bytes:,} on disk {rep.size_bytes:,} MACs {rep.macs:,} "
          f"({time.perf_counter() - start:.1f} s)")
    graph = load_model(path).graph
    start = time.perf_counter()
    refreshed = refresh_shapes(graph)
    print(f"  refresh_shapes: {refreshed} ({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    figures = graph_figures(graph)
    print(f"  graph_figures: {figures.as_dict()} ({time.perf_counter() - start:.1f} s)")
    assert refreshed.inferred, refreshed.reason
    assert (figures.params, figures.nonzeros, figures.param_bytes) == (rep.params, rep.nonzeros, rep.param_bytes)


if __name__ == "__main__":
    main()
