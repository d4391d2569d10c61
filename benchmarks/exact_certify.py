"""Exact-mode certification on L1-regularised MLPs and the Serra et al. models, against onnxsim.

    python benchmarks/exact_certify.py [--time-limit 240] [--skip-onnxsim]

Trains L1-regularised MLPs (numpy, Adam, L1 subgradient) on scikit-learn digits and on Fashion-MNIST
(first 8,000 test images; ../shared/data), then certifies every model on the box [0, 1]^n and reports
per layer how many units interval bounds, the linear relaxation (CROWN-style) and the MILP prove stable,
how many samples / witness search / MILP show unstable, what stayed open, and the wall time.
onnxsim's ``stable_relu_prune.analyze`` (interval + CROWN) runs on the same models and boxes for
comparison when onnxsim is installed (benchmark environment only: ``pip install onnxsim``).
Prints a table and writes benchmarks/results/exact_certify.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lincomp.analysis.model_report import model_report
from onnx_lincomp.calibration import input_specs
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.exact import CertifyOptions, certify, parse_domain
from onnx_lincomp.exact.compress import compress_exact
from onnx_lincomp.model_io import load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import SHARED, read_idx  # noqa: E402  (the IDX reader the tests use)

RESULTS = HERE / "results"


def train_l1_mlp(x, y, widths, l1, epochs, seed=0, lr=1e-3):
    """Plain numpy MLP (Relu hidden layers, softmax cross-entropy) with an L1 penalty on all weights."""
    rng = np.random.default_rng(seed)
    ws = [rng.normal(0, np.sqrt(2 / a), (b, a)) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    bs = [np.zeros(b) for b in widths[1:]]
    params = ws + bs
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), 64):
            idx = order[s:s + 64]
            hs = [x[idx]]
            for w, b in zip(ws[:-1], bs[:-1], strict=True):
                hs.append(np.maximum(hs[-1] @ w.T + b, 0))
            logits = hs[-1] @ ws[-1].T + bs[-1]
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1
            g = p / len(idx)
            gws, gbs = [None] * len(ws), [None] * len(bs)
            for k in range(len(ws) - 1, -1, -1):
                gws[k] = g.T @ hs[k] + l1 * np.sign(ws[k])
                gbs[k] = g.sum(0)
                if k:
                    g = (g @ ws[k]) * (hs[k] > 0)
            step += 1
            for j, (par, gr) in enumerate(zip(params, gws + gbs, strict=True)):
                m[j] = 0.9 * m[j] + 0.1 * gr
                v[j] = 0.999 * v[j] + 0.001 * gr**2
                par -= lr * (m[j] / (1 - 0.9**step)) / (np.sqrt(v[j] / (1 - 0.999**step)) + 1e-8)
    return ws, bs


def to_onnx(ws, bs, path: Path) -> None:
    nodes, inits, x = [], [], "input"
    for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        out = f"z{i}" if i < len(ws) - 1 else "logits"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
        if i < len(ws) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    graph = helper.make_graph(nodes, path.stem,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", ws[0].shape[1]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", ws[-1].shape[0]])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def trained_models(out: Path) -> list[Path]:
    from sklearn.datasets import load_digits

    out.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    xd, yd = (d.data / 16.0), d.target
    paths = []
    for name, widths, l1, epochs in (("digits_l1_64x64", [64, 64, 64, 10], 1e-3, 60),
                                     ("digits_l1_100x100", [64, 100, 100, 10], 5e-4, 60)):
        path = out / f"{name}.onnx"
        if not path.exists():
            to_onnx(*train_l1_mlp(xd[:1400], yd[:1400], widths, l1, epochs), path)
        paths.append(path)
    fm = SHARED / "data" / "fashion-mnist"
    if fm.is_dir():
        x = read_idx(fm / "t10k-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
        y = read_idx(fm / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
        path = out / "fmnist_l1_100x100.onnx"
        if not path.exists():
            to_onnx(*train_l1_mlp(x[:8000], y[:8000], [784, 100, 100, 10], 2e-4, 15), path)
        paths.append(path)
    return paths


def ours(path: Path, time_limit: float) -> dict:
    loaded = load_model(path)
    canonicalize(loaded.graph)
    start = time.perf_counter()
    cert = certify(loaded.graph, loaded.ctx, parse_domain(["0,1"], input_specs(loaded.graph)),
                   options=CertifyOptions(time_limit=time_limit, solve_limit=min(60.0, time_limit)))
    seconds = time.perf_counter() - start
    # exact compression with that certificate, checked on 10,000 random points of the box
    result = compress_exact(load_model(path), ("0,1",), certificate=cert, check_points=10000)
    before, after = model_report(result.original), model_report(result.model)
    return {"seconds": seconds, "complete": cert.complete, "stage_seconds": cert.seconds,
            "layers": [layer.as_dict() for layer in cert.layers], "params_before": before.params,
            "params_after": after.params,
            "box_check_max_abs": result.box_check.max_abs, "box_check_rel": result.box_check.rel_max,
            "box_check_within_1e-5": result.box_check.within(1e-5),
            "witnesses_confirmed": result.witness_check.confirmed,
            "claimed_unstable": result.witness_check.channels_claimed_unstable}


def theirs(path: Path) -> dict | None:
    try:
        from onnxsim import stable_relu_prune
    except ImportError:
        return None
    model = onnx.load(path)
    name = model.graph.input[0].name
    start = time.perf_counter()
    rep = stable_relu_prune.analyze(model, {name: (0.0, 1.0)})
    return {"seconds": time.perf_counter() - start,
            "layers": [{"relu": layer.relu, "dead": layer.dead, "on": layer.always_on,
                        "by_method": {k: list(v) for k, v in layer.by_method.items()}}
                       for layer in rep.layers]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=240.0)
    ap.add_argument("--skip-onnxsim", action="store_true")
    args = ap.parse_args()
    models = trained_models(RESULTS / "models")
    for rel in ("trained/own_fmnist_mlp_l1.onnx", "exact-compression/serra_cifar10_400x400_l1_pruned.onnx",
                "exact-compression/serra_cifar100_400x400_l1_pruned.onnx", "exact-compression/serra_mnist_100x100.onnx",
                "exact-compression/serra_mnist_200x200.onnx"):
        if (SHARED / "models" / rel).exists():
            models.append(SHARED / "models" / rel)
    rows = []
    for path in models:
        mine = ours(path, args.time_limit)
        other = None if args.skip_onnxsim else theirs(path)
        rows.append({"model": path.name, "ours": mine, "onnxsim": other})
        print(f"\n{path.name}: ours {mine['seconds']:.2f} s, {'complete' if mine['complete'] else 'INCOMPLETE'}"
              + ("" if other is None else f"; onnxsim {other['seconds']:.2f} s")
              + f"; params {mine['params_before']:,} -> {mine['params_after']:,}; 10,000 box points max abs err "
              f"{mine['box_check_max_abs']:.2g} (within 1e-5 rel: {mine['box_check_within_1e-5']}); witnesses "
              f"{mine['witnesses_confirmed']}/{mine['claimed_unstable']}")
        print(f"  {'relu':<10} {'units':>5} {'interval a/i':>12} {'+relax a/i':>11} {'+milp a/i':>10} "
              f"{'total a/i':>10} {'unstable s/w/m':>15} {'open':>5} {'onnxsim a/i':>12}")
        for k, layer in enumerate(mine["layers"]):
            tot = (layer["interval"]["active"] + layer["relaxation"]["active"] + layer["milp"]["active"],
                   layer["interval"]["inactive"] + layer["relaxation"]["inactive"] + layer["milp"]["inactive"])
            theirs_s = "-" if other is None else f"{other['layers'][k]['on']}/{other['layers'][k]['dead']}"
            print(f"  {layer['relu'][:10]:<10} {layer['units']:>5} "
                  f"{layer['interval']['active']:>5}/{layer['interval']['inactive']:<6} "
                  f"{layer['relaxation']['active']:>4}/{layer['relaxation']['inactive']:<6} "
                  f"{layer['milp']['active']:>4}/{layer['milp']['inactive']:<5} "
                  f"{tot[0]:>4}/{tot[1]:<5} "
                  f"{layer['sampled_unstable']:>5}/{layer['search']['unstable']}/{layer['milp']['unstable']:<5} "
                  f"{layer['unproven']:>5} {theirs_s:>12}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "exact_certify.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
