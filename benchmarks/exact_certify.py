"""Exact-mode certification on L1-regularised MLPs and the Serra et al. models: per-unit LP/MILP stage
against today's network-wide MILP stage, and against onnxsim.

    python benchmarks/exact_certify.py [--time-limit 300] [--unit-time-limit 60] [--jobs 1]
        [--methods units,network] [--models digits,own_fmnist] [--skip-onnxsim] [--skip-compress]
        [--marks 60,120,180,300]
    python benchmarks/exact_certify.py --models digits_l1_100x100 --speedup-jobs 1,2

Trains L1-regularised MLPs (numpy, Adam, L1 subgradient) on scikit-learn digits and on Fashion-MNIST
(first 8,000 test images; ../shared/data), then certifies every model on the box [0, 1]^n with each method
and reports per layer the units proven stably active / inactive, shown unstable (samples, witness search,
MILP witnesses), left open, and the wall and CPU time. CPU seconds are the honest figure on a shared
machine: they count the certifying process (and, with --jobs, its workers' solver time).

Soundness: every claimed stable unit is checked on 10,000 random points and 2,000 corners of the box in
onnxruntime (its pre-activations), every witness is re-run in onnxruntime, and the exact compression is
compared with the original on 10,000 random box points.
onnxsim's ``stable_relu_prune.analyze`` (interval + CROWN) runs on the same models and boxes when onnxsim is
installed (benchmark environment only: ``pip install onnxsim``).
For the per-unit stage the decision timeline of the last layer is summarised: stably inactive units proven
and candidates still open at 60, 120, 180 and 300 CPU seconds (and wall seconds; ``--marks`` changes them).
``--speedup-jobs 1,2`` instead certifies each selected model once per jobs count and reports the wall-clock
speed-up of the per-unit stage (with the load average before each run: on a shared machine other work
takes cores too) and whether the outcomes are identical.
Prints a table and writes benchmarks/results/exact_certify.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lincomp.calibration import CollectOptions, collect_relu_stats, input_specs
from onnx_lincomp.calibration.data_source import CalibrationSource
from onnx_lincomp.canonicalize import canonicalize
from onnx_lincomp.exact import CertifyOptions, certify, parse_domain
from onnx_lincomp.exact.chain import extract_chain
from onnx_lincomp.exact.witness_check import check_witnesses
from onnx_lincomp.model_io import load_model
from onnx_lincomp.optimize import compress_exact

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


def _im2col(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, H*W, C*9): the 3x3 patches of a zero-padded input, (c, di, dj) order."""
    n, c, h, w = x.shape
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(pad, (3, 3), axis=(2, 3))  # (N, C, H, W, 3, 3)
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n, h * w, c * 9)


def _col2im(cols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n, c, h, w = shape
    g = cols.reshape(n, h, w, c, 3, 3)
    pad = np.zeros((n, c, h + 2, w + 2))
    for di in range(3):
        for dj in range(3):
            pad[:, :, di:di + h, dj:dj + w] += g[:, :, :, :, di, dj].transpose(0, 3, 1, 2)
    return pad[:, :, 1:-1, 1:-1]


class ResidualCnn:
    """conv1(1->C)-Relu-MaxPool2-conv2(C->C)-Relu-conv3(C->C)+pool-Relu-Flatten-fc(10), 3x3 convs with pad 1,
    on 1x8x8 inputs; numpy forward/backward for a small L1-regularised training run."""

    def __init__(self, channels: int, rng: np.random.Generator):
        c = channels
        self.p = {"w1": rng.normal(0, np.sqrt(2 / 9), (9, c)), "b1": np.zeros(c),
                  "w2": rng.normal(0, np.sqrt(2 / (9 * c)), (9 * c, c)), "b2": np.zeros(c),
                  "w3": rng.normal(0, np.sqrt(1 / (9 * c)), (9 * c, c)), "b3": np.zeros(c),
                  "w4": rng.normal(0, np.sqrt(2 / (16 * c)), (16 * c, 10)), "b4": np.zeros(10)}
        self.c = c

    def _conv(self, x, w, b):
        cols = _im2col(x)
        y = cols @ w + b  # (N, HW, Cout)
        n, _, h, wd = x.shape
        return y.transpose(0, 2, 1).reshape(n, -1, h, wd), cols

    def loss_grad(self, x: np.ndarray, y: np.ndarray, l1: float) -> dict:
        p, n, c = self.p, len(x), self.c
        z1, cols1 = self._conv(x, p["w1"], p["b1"])
        r1 = np.maximum(z1, 0)
        blocks = r1.reshape(n, c, 4, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 4, 4, 4)
        arg = blocks.argmax(axis=-1)
        m = blocks.max(axis=-1)
        z2, cols2 = self._conv(m, p["w2"], p["b2"])
        r2 = np.maximum(z2, 0)
        g3, cols3 = self._conv(r2, p["w3"], p["b3"])
        z3 = g3 + m
        r3 = np.maximum(z3, 0)
        flat = r3.reshape(n, -1)
        logits = flat @ p["w4"] + p["b4"]
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        prob[np.arange(n), y] -= 1
        d = prob / n
        g = {"w4": flat.T @ d, "b4": d.sum(0)}
        dz3 = (d @ p["w4"].T).reshape(r3.shape) * (z3 > 0)
        dm = dz3.copy()
        dg = dz3.transpose(0, 2, 3, 1).reshape(n, 16, c)
        g["w3"], g["b3"] = np.einsum("npk,npc->kc", cols3, dg), dg.sum((0, 1))
        dz2 = _col2im(dg @ p["w3"].T, r2.shape) * (z2 > 0)
        dg2 = dz2.transpose(0, 2, 3, 1).reshape(n, 16, c)
        g["w2"], g["b2"] = np.einsum("npk,npc->kc", cols2, dg2), dg2.sum((0, 1))
        dm += _col2im(dg2 @ p["w2"].T, m.shape)
        dblocks = np.zeros(blocks.shape)
        np.put_along_axis(dblocks, arg[..., None], dm[..., None], axis=-1)
        dr1 = dblocks.reshape(n, c, 4, 4, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(r1.shape)
        dz1 = (dr1 * (z1 > 0)).transpose(0, 2, 3, 1).reshape(n, 64, c)
        g["w1"], g["b1"] = np.einsum("npk,npc->kc", cols1, dz1), dz1.sum((0, 1))
        for k in ("w1", "w2", "w3", "w4"):
            g[k] = g[k] + l1 * np.sign(p[k])
        return g

    def fit(self, x, y, l1: float, epochs: int, seed: int = 0, lr: float = 2e-3) -> None:
        rng = np.random.default_rng(seed)
        m = {k: np.zeros_like(v) for k, v in self.p.items()}
        v = {k: np.zeros_like(val) for k, val in self.p.items()}
        step = 0
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for s in range(0, len(x), 64):
                idx = order[s:s + 64]
                g = self.loss_grad(x[idx], y[idx], l1)
                step += 1
                for k in self.p:
                    m[k] = 0.9 * m[k] + 0.1 * g[k]
                    v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
                    self.p[k] -= lr * (m[k] / (1 - 0.9**step)) / (np.sqrt(v[k] / (1 - 0.999**step)) + 1e-8)

    def to_onnx(self, path: Path) -> None:
        p, c = self.p, self.c

        def conv_w(w, cin):
            return w.reshape(cin, 3, 3, c).transpose(3, 0, 1, 2).astype(np.float32)

        weights = {"w1": conv_w(p["w1"], 1), "w2": conv_w(p["w2"], c), "w3": conv_w(p["w3"], c),
                   "w4": p["w4"].T.astype(np.float32)}
        weights.update({f"b{i}": p[f"b{i}"].astype(np.float32) for i in range(1, 5)})
        inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
        pads = [1, 1, 1, 1]
        nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=pads),
                 helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                 helper.make_node("MaxPool", ["r1"], ["m"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
                 helper.make_node("Conv", ["m", "w2", "b2"], ["c2"], name="conv2", pads=pads),
                 helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
                 helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=pads),
                 helper.make_node("Add", ["c3", "m"], ["s3"], name="residual"),
                 helper.make_node("Relu", ["s3"], ["r3"], name="relu3"),
                 helper.make_node("Flatten", ["r3"], ["f"], name="flatten", axis=1),
                 helper.make_node("Gemm", ["f", "w4", "b4"], ["logits"], name="fc", transB=1)]
        graph = helper.make_graph(nodes, path.stem,
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
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
    path = out / "digits_residual_cnn_l1.onnx"
    if not path.exists():
        net = ResidualCnn(8, np.random.default_rng(0))
        net.fit(xd[:1400].reshape(-1, 1, 8, 8), yd[:1400], 2e-3, 30)
        net.to_onnx(path)
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


def _claims_hold(loaded, cert, points: int = 10000, corners: int = 2000, seed: int = 0) -> dict:
    """Every claimed stable channel keeps its sign on random points and corners of the box (onnxruntime)."""
    rng = np.random.default_rng(seed)
    d = cert.domain
    x = np.concatenate([d.sample(rng, points), np.where(rng.random((corners, d.size)) < 0.5, d.lower, d.upper)])
    source = CalibrationSource(input_specs(loaded.graph), arrays=d.feeds(x), description="box points")
    stats = collect_relu_stats(loaded.graph, loaded.ctx, source, CollectOptions(batch_size=512, mode="pre"))
    claimed = broken = 0
    for lc in cert.layers:
        s = stats.get(lc.relu)
        claimed += int(lc.stably_active.sum() + lc.stably_inactive.sum())
        broken += int((s.pre_max[lc.stably_inactive] > 0).sum() + (s.pre_min[lc.stably_active] < 0).sum())
    return {"points": len(x), "claimed": claimed, "broken": broken}


def _timeline(cert, relu_layers: list[int], before_cpu: float, before_wall: float,
              marks=(60, 120, 180, 300)) -> dict | None:
    """The deepest layer with per-unit solves: stably inactive units proven and candidates open at each mark
    (CPU and wall seconds). ``relu_layers``: the chain index of each certified Relu layer."""
    if not cert.unit_records:
        return None
    last = max(r.layer for r in cert.unit_records)  # the chain's index of it
    lc = cert.layers[relu_layers.index(last)]
    bound_inactive = lc.interval_inactive + lc.relaxed_inactive
    queried = {(r.unit, r.sign) for r in cert.unit_records if r.layer == last}
    events = [e for e in cert.unit_events if e[2] == last]
    out = {}
    for clock, idx, offset in (("cpu", 1, before_cpu), ("wall", 0, before_wall)):
        rows = []
        for m in marks:
            done = [e for e in events if e[idx] + offset <= m]
            rows.append({"at": m, "inactive": bound_inactive + sum(1 for e in done if e[4] > 0 and e[5] == "stable"),
                         "open": len(queried) - len({(e[3], e[4]) for e in done if (e[3], e[4]) in queried})})
        out[clock] = rows
    return out


def ours(path: Path, method: str, time_limit: float, unit_limit: float, jobs: int, compress: bool,
         marks: tuple[float, ...] = (60, 120, 180, 300)) -> dict:
    loaded = load_model(path)
    canonicalize(loaded.graph)
    domain = parse_domain(["0,1"], input_specs(loaded.graph))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    cert = certify(loaded.graph, loaded.ctx, domain,
                   options=CertifyOptions(time_limit=time_limit, method=method, jobs=jobs,
                                          solve_limit=unit_limit if method == "units" else min(60.0, time_limit)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    worker_cpu = sum(r.cpu_seconds for r in cert.unit_records) if jobs > 1 else 0.0
    before_wall = cert.seconds["total"] - cert.seconds["milp"]
    # the network-wide MILP reads chains only: on a DAG (residual, pool) certify runs the per-unit stage instead
    ran = method if cert.method == method else f"{method}->{cert.method}"
    row = {"method": ran, "seconds": wall, "cpu_seconds": cpu + worker_cpu, "complete": cert.complete,
           "stage_seconds": cert.seconds, "milp_solves": cert.milp_solves, "lp_solves": cert.lp_solves,
           "bounds_tightened": cert.tightened, "layers": [], "claims": _claims_hold(loaded, cert),
           "timeline": _timeline(cert, extract_chain(loaded.graph, domain.shapes, loaded.ctx.default_opset).relu_layers,
                                 cert.seconds["cpu_before_milp"], before_wall, marks)}
    for lc in cert.layers:
        row["layers"].append({"relu": lc.relu, "units": lc.units, "active": int(lc.stably_active.sum()),
                              "inactive": int(lc.stably_inactive.sum()),
                              "unstable": lc.sampled_unstable + lc.search_unstable + lc.milp_unstable,
                              "milp_unstable": lc.milp_unstable, "open": lc.unproven,
                              "by_stage": lc.as_dict()})
    check = check_witnesses(loaded.graph, loaded.ctx, cert)
    row["witnesses"] = {"claimed_unstable": check.channels_claimed_unstable, "confirmed": check.confirmed}
    if compress:
        result = compress_exact(load_model(path), ("0,1",), certificate=cert, check_points=10000)
        box = result.report.on_calibration
        row.update({"params_before": result.report.before.params, "params_after": result.report.after.params,
                    "box_check_max_abs": box.max_abs, "box_check_rel": box.rel_max,
                    "box_check_within_1e-5": box.within(1e-5)})
    if cert.unit_records:
        row["unit_solves"] = [r.as_dict() for r in cert.unit_records if r.stage == "milp"]
    return row


def jobs_speedup(path: Path, jobs_list: list[int], time_limit: float, unit_limit: float) -> dict:
    """The per-unit stage of one model with each number of worker processes: wall and CPU seconds (whole certify
    and its per-unit stage), the load average before each run (other work on the machine), and whether every
    run proved, disproved and left open the same units (the stage's outcome must not depend on ``jobs``)."""
    loaded = load_model(path)
    canonicalize(loaded.graph)
    domain = parse_domain(["0,1"], input_specs(loaded.graph))
    runs, outcomes = [], []
    for jobs in jobs_list:
        load = os.getloadavg()[0]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        cert = certify(loaded.graph, loaded.ctx, domain,
                       options=CertifyOptions(time_limit=time_limit, solve_limit=unit_limit, jobs=jobs))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        worker_cpu = sum(r.cpu_seconds for r in cert.unit_records) if jobs > 1 else 0.0
        outcomes.append([(lc.stably_active.tolist(), lc.stably_inactive.tolist(), lc.open_units)
                         for lc in cert.layers])
        runs.append({"jobs": jobs, "wall_seconds": wall, "stage_wall_seconds": cert.seconds["milp"],
                     "cpu_seconds": cpu + worker_cpu, "load_average_before": load, "complete": cert.complete,
                     "unit_solves": len(cert.unit_records)})
    base = runs[0]
    for row in runs:
        row["speedup"] = base["wall_seconds"] / row["wall_seconds"]
        row["stage_speedup"] = base["stage_wall_seconds"] / row["stage_wall_seconds"]
    return {"model": path.name, "runs": runs, "same_outcome": all(o == outcomes[0] for o in outcomes)}


def _print_speedup(result: dict) -> None:
    print(f"\n{result['model']}: jobs speed-up (same outcome for every jobs: {result['same_outcome']})")
    print(f"  {'jobs':>4} {'wall s':>7} {'stage s':>7} {'cpu s':>7} {'speedup':>7} {'stage x':>7} {'load':>5}")
    for r in result["runs"]:
        print(f"  {r['jobs']:>4} {r['wall_seconds']:>7.1f} {r['stage_wall_seconds']:>7.1f} {r['cpu_seconds']:>7.1f} "
              f"{r['speedup']:>7.2f} {r['stage_speedup']:>7.2f} {r['load_average_before']:>5.2f}")


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
            "layers": [{"relu": layer.relu, "dead": layer.dead, "on": layer.always_on} for layer in rep.layers]}


def _print(name: str, rows: list[dict], other: dict | None) -> None:
    print(f"\n{name}" + ("" if other is None else f"  (onnxsim {other['seconds']:.2f} s)"))
    print(f"  {'method':<14} {'relu':<10} {'units':>5} {'active':>6} {'inact':>6} {'unstab':>6} {'open':>5} "
          f"{'onnxsim a/i':>11} {'wall s':>7} {'cpu s':>7} {'claims ok':>10} {'witness':>9}")
    for row in rows:
        for k, layer in enumerate(row["layers"]):
            theirs_layer = next((t for t in (other or {}).get("layers", []) if t["relu"] == layer["relu"]), None)
            theirs_s = "-" if theirs_layer is None else f"{theirs_layer['on']}/{theirs_layer['dead']}"
            first = k == 0
            print(f"  {row['method'] if first else '':<14} {layer['relu'][:10]:<10} {layer['units']:>5} "
                  f"{layer['active']:>6} {layer['inactive']:>6} {layer['unstable']:>6} {layer['open']:>5} "
                  f"{theirs_s:>11} " + (f"{row['seconds']:>7.1f} {row['cpu_seconds']:>7.1f} "
                                        f"{row['claims']['claimed'] - row['claims']['broken']:>4}/"
                                        f"{row['claims']['claimed']:<5} {row['witnesses']['confirmed']:>4}/"
                                        f"{row['witnesses']['claimed_unstable']:<4}" if first else ""))
        if "params_before" in row:
            print(f"  {'':<14} params {row['params_before']:,} -> {row['params_after']:,}; 10,000 box points max abs "
                  f"err {row['box_check_max_abs']:.2g} (within 1e-5: {row['box_check_within_1e-5']})")
        if row.get("timeline"):
            marks = ", ".join(f"{c['at']} s: {c['inactive']} inactive / {c['open']} open"
                              for c in row["timeline"]["cpu"])
            print(f"  {'':<14} deepest solved layer by CPU time: {marks}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=300.0, help="wall seconds for the MILP stage")
    ap.add_argument("--unit-time-limit", type=float, default=60.0, help="CPU seconds per unit MILP")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--methods", default="units,network")
    ap.add_argument("--models", default="", help="comma-separated substrings of model names (default: all)")
    ap.add_argument("--skip-onnxsim", action="store_true")
    ap.add_argument("--skip-compress", action="store_true")
    ap.add_argument("--marks", default="60,120,180,300",
                    help="seconds (CPU and wall, from the start of certify) at which to read the deepest layer")
    ap.add_argument("--speedup-jobs", default="",
                    help="e.g. 1,2: only time the per-unit stage of the selected models with each --jobs count")
    ap.add_argument("--out", default=str(RESULTS / "exact_certify.json"))
    args = ap.parse_args()
    models = trained_models(RESULTS / "models")
    models.append(HERE.parent / "onnx_lincomp" / "examples" / "digits_cnn.onnx")
    for rel in ("trained/own_fmnist_mlp_l1.onnx", "exact-compression/serra_cifar10_400x400_l1_pruned.onnx",
                "exact-compression/serra_cifar100_400x400_l1_pruned.onnx", "exact-compression/serra_mnist_100x100.onnx",
                "exact-compression/serra_mnist_200x200.onnx"):
        if (SHARED / "models" / rel).exists():
            models.append(SHARED / "models" / rel)
    wanted = [w for w in args.models.split(",") if w]
    models = [m for m in models if not wanted or any(w in m.name for w in wanted)]
    results = []
    if args.speedup_jobs:
        for path in models:
            results.append(jobs_speedup(path, [int(j) for j in args.speedup_jobs.split(",")], args.time_limit,
                                        args.unit_time_limit))
            _print_speedup(results[-1])
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        return
    for path in models:
        marks = tuple(float(m) for m in args.marks.split(",") if m)
        rows = [ours(path, method, args.time_limit, args.unit_time_limit, args.jobs, not args.skip_compress, marks)
                for method in args.methods.split(",")]
        other = None if args.skip_onnxsim else theirs(path)
        _print(path.name, rows, other)
        results.append({"model": path.name, "runs": rows, "onnxsim": other})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
