"""Is the latency comparison's verdict stable on a shared machine?

    python benchmarks/latency_noise.py [--repeats 10] [--batch-size 1] [--background-load N]

For the bundled digits CNN and a seeded MLP of about 400k parameters: a byte-identical copy of the file
(the verdict should be "no change") and a variant that computes the whole graph twice on copies of the
weights and averages the two results (about 2x the work; the verdict should be "slower"). Each pair is
compared ``--repeats`` times with :func:`onnx_lincomp.runtime.latency.compare_models_latency`, the way
``bench`` compares two files. Next to each verdict, ``old`` is the ratio the previous ``bench`` gave
(each model timed on its own, one after the other, onnxruntime's default threads). ``--background-load N``
keeps N busy-looping processes running meanwhile, to imitate other jobs on the machine. Prints one line
per run and writes benchmarks/results/latency_noise.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lincomp.runtime.latency import CompareOptions, LatencyOptions, compare_models_latency, measure_latency

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLES = Path(__file__).resolve().parents[1] / "onnx_lincomp" / "examples"


def mlp(widths: tuple[int, ...] = (256, 512, 512, 10), seed: int = 0) -> onnx.ModelProto:
    """Gemm + Relu chain with seeded weights (opset 17)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        inits += [numpy_helper.from_array(rng.normal(0, a ** -0.5, (b, a)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"z{i}"], transB=1))
        x = f"z{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
            x = f"h{i}"
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", widths[0]])]
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", widths[-1]])]
    graph = helper.make_graph(nodes, "mlp", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def doubled(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph twice (second copy on weights scaled by 0.999, so no pass can merge them), outputs averaged."""
    g = model.graph
    inputs = {i.name for i in g.input}
    rename = lambda n: n if (not n or n in inputs) else f"dup_{n}"  # noqa: E731
    dup_nodes = [helper.make_node(n.op_type, [rename(i) for i in n.input], [rename(o) for o in n.output],
                                  name=f"dup_{n.name or k}", domain=n.domain) for k, n in enumerate(g.node)]
    for new, old in zip(dup_nodes, g.node, strict=True):
        new.attribute.extend(old.attribute)
    dup_inits = [numpy_helper.from_array(numpy_helper.to_array(t) * (0.999 if t.data_type == TensorProto.FLOAT else 1),
                                         rename(t.name)) for t in g.initializer]
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    outs, nodes = [], list(g.node) + dup_nodes
    for o in g.output:
        nodes += [helper.make_node("Add", [o.name, rename(o.name)], [f"sum_{o.name}"]),
                  helper.make_node("Mul", [f"sum_{o.name}", "half"], [f"avg_{o.name}"])]
        outs.append(helper.make_tensor_value_info(f"avg_{o.name}", o.type.tensor_type.elem_type, None))
    graph = helper.make_graph(nodes, g.name, list(g.input), outs, list(g.initializer) + dup_inits + [half])
    return helper.make_model(graph, opset_imports=list(model.opset_import))


def feeds_for(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else batch for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rng.random(dims, dtype=np.float32)
    return feeds


def old_ratio(a: Path, b: Path, feeds) -> float:
    """What the previous ``bench`` reported: each file measured on its own, one after the other."""
    first, second = (measure_latency(onnx.load(str(p)), feeds, LatencyOptions(runs=50, warmup=5)) for p in (a, b))
    return second.median_ms / first.median_ms


def run_pair(name: str, kind: str, a: Path, b: Path, feeds, options: CompareOptions, repeats: int) -> list[dict]:
    rows = []
    for run in range(repeats):
        t0 = time.perf_counter()
        cmp = compare_models_latency([a, b], feeds, options)
        seconds = time.perf_counter() - t0
        est, lat = cmp.ratios[1], cmp.latencies
        old = old_ratio(a, b, feeds)
        rows.append({"model": name, "pair": kind, "run": run + 1, "ratio": est.ratio, "low": est.low, "high": est.high,
                     "change": est.change, "verdict": est.verdict, "median_ms_a": lat[0].median_ms,
                     "median_ms_b": lat[1].median_ms, "iqr_ms_a": lat[0].iqr_ms, "iqr_ms_b": lat[1].iqr_ms,
                     "seconds": seconds, "old_ratio": old})
        print(f"{name:<8} {kind:<9} {run + 1:>3} {est.ratio:>7.3f} [{est.low:.3f}, {est.high:.3f}] "
              f"{lat[0].median_ms:>8.4f} {lat[1].median_ms:>8.4f} {seconds:>5.2f} {old:>6.3f}  {est.verdict}",
              flush=True)
    return rows


def _summary(rows: list[dict]) -> dict:
    same = [r for r in rows if r["pair"] == "identical"]
    slow = [r for r in rows if r["pair"] == "2x"]
    return {"identical_no_change": sum(r["change"] == "no change" for r in same), "identical_runs": len(same),
            "doubled_slower": sum(r["change"] == "slower" for r in slow), "doubled_runs": len(slow),
            "old_identical_within_5pct": sum(abs(r["old_ratio"] - 1) <= 0.05 for r in same),
            "old_identical_worst": max((abs(r["old_ratio"] - 1) for r in same), default=0.0)}


def _spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--background-load", type=int, default=0, help="busy-looping processes to run meanwhile")
    args = ap.parse_args()
    load = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.background_load)]
    for p in load:
        p.start()
    try:
        run_all(args)
    finally:
        for p in load:
            p.terminate()


def run_all(args: argparse.Namespace) -> None:
    options = CompareOptions(threads=args.threads, batch_size=args.batch_size)
    models = {"cnn": onnx.load(str(EXAMPLES / "digits_cnn.onnx")), "mlp400k": mlp()}
    rows, start = [], time.perf_counter()
    print(f"{'model':<8} {'pair':<9} {'run':>3} {'ratio':>7} {'interval':<16} {'a ms':>8} {'b ms':>8} {'s':>5} "
          f"{'old':>6}  verdict")
    with tempfile.TemporaryDirectory(prefix="lincomp-noise-") as tmp:
        for name, model in models.items():
            a, copy, slow = Path(tmp, f"{name}.onnx"), Path(tmp, f"{name}_copy.onnx"), Path(tmp, f"{name}_2x.onnx")
            onnx.save(model, str(a))
            shutil.copyfile(a, copy)
            onnx.save(doubled(model), str(slow))
            feeds = feeds_for(model, args.batch_size)
            rows += run_pair(name, "identical", a, copy, feeds, options, args.repeats)
            rows += run_pair(name, "2x", a, slow, feeds, options, args.repeats)
    seconds = time.perf_counter() - start
    summary = {name: _summary([r for r in rows if r["model"] == name]) for name in models}
    for name, s in summary.items():
        print(f"{name}: identical copies 'no change' in {s['identical_no_change']}/{s['identical_runs']}, 2x model "
              f"'slower' in {s['doubled_slower']}/{s['doubled_runs']}; old bench: identical copies within 5% in "
              f"{s['old_identical_within_5pct']}/{s['identical_runs']}, worst {s['old_identical_worst']:.1%} off")
    print(f"total {seconds:.1f} s")
    RESULTS.mkdir(exist_ok=True)
    out = {"options": options.__dict__, "background_load": args.background_load, "seconds": seconds,
           "summary": summary, "runs": rows}
    (RESULTS / "latency_noise.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
