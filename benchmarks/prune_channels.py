"""Structured channel pruning (prune-channels) on conv models: accuracy, size, MACs and latency.

    python benchmarks/prune_channels.py [--quick] [--models NAME,...] [--channel-multiple 16] [--rows ...]
    python benchmarks/prune_channels.py --conv-widths     # single Conv layers in onnxruntime at many widths

For each model, prune-channels at 25 / 50 / 75 % of the linear layers' MACs removed (``target_macs``
0.75 / 0.5 / 0.25), with least-squares reconstruction (the default) and without (plain removal, the removed
channels' mean folded into the consumers' bias). own_fmnist_cnn_bn also at 25 / 50 / 75 % of the units of
every layer (``sparsity``), the setting its accuracy targets are stated for.

Data: the bundled digits CNN on its calibration file (half calibrates, half is held out); own_fmnist_cnn_bn
and onnxzoo mnist-8 on the Fashion-MNIST / MNIST test sets (2,000 calibrate, 8,000 held out);
UltraFace on random data (64 samples calibrate, 64 fresh ones verify: output error instead of accuracy); the PP-OCR
models on MNIST digits set as text (``tests/text_images.py``; random data gives PP-OCRv4 det an all-zero output):
PP-OCR cls on 512 lines of 48x192, half turned 180 degrees (its label; 256 calibrate, 256 held out: accuracy), PP-OCRv4
det on 64 pages of 160x160 (32 calibrate, 32 held out: output error; at 320x320 with 64 samples one
reconstructing run took over 15 minutes on 2 cores). Latency: onnxruntime, one pinned thread, interleaved rounds
(the optimize report's ratios, after / before; below 1 is faster) at batch 1 and batch 32 (batch 32 only where the
model takes a batch axis). A ``floor`` row per model prunes every channel group to one channel (plain removal): the
time no pruning goes below (per-run and per-node costs). From it the targets print the best speed-up any pruning to
50 % of the MACs could give, taking time as affine in MACs above the floor. A run whose output the report's not-
worse gate rejects (slower at batch 1) is rerun with allow_larger and marked so. ``channel_multiple`` is the pass
default unless given: 0, this CPU's NCHWc block (16 with AVX-512, 8 otherwise;
:mod:`onnx_lincomp.analysis.layer_latency`). ``--conv-widths`` times single Conv layers (3x3, 1x1, depthwise;
40x40, one thread) at widths 24..72 to show the block steps that model is built on. Prints a table and the targets,
writes benchmarks/results/prune_channels.json after every run (``--merge`` keeps the rows there this run does not
redo).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SHARED  # noqa: E402
from onnx_lincomp.errors import VerificationGateError  # noqa: E402
from onnx_lincomp.examples import example_paths  # noqa: E402
from onnx_lincomp.optimize import OptimizeOptions, optimize  # noqa: E402
from onnx_lincomp.recipe import CalibrationSettings, PassSpec, Recipe  # noqa: E402
from real_models import RealModel, calibration_file  # noqa: E402

RESULTS = HERE / "results" / "prune_channels.json"
MAC_TARGETS = (0.75, 0.5, 0.25)  # keep fractions: 25 / 50 / 75 % of the MACs removed
SPARSITIES = (0.25, 0.5, 0.75)
FMNIST_TARGETS = {0.25: 0.8933, 0.5: 0.8869, 0.75: 0.8645}  # accuracy at each per-layer sparsity (the issue)
SPEEDUP_TARGET = 1.6  # at 50 % of the MACs removed
FLOOR_SPARSITY = 0.999  # every channel group down to one channel (min_channels)
BATCH = 32
LEVEL_NAMES = {"target_macs": "macs", "target_latency": "lat", "sparsity": "units"}


@dataclass(frozen=True)
class Case:
    name: str
    path: Callable[[], Path]
    calib: Callable[[Path], str]
    split: float
    labels: str | None = None
    shapes: dict = field(default_factory=dict)
    sparsity_rows: bool = False
    quick: bool = False


def _shared(rel: str) -> Callable[[], Path]:
    return lambda: SHARED / "models" / rel


def _real(rel: str, data: str, n: int) -> Callable[[Path], str]:
    return lambda tmp: calibration_file(RealModel(rel, data, n), tmp)


def _random(n: int) -> Callable[[Path], str]:
    return lambda tmp: f"random:{n}"


def cases(samples: int, det_side: int, det_samples: int) -> list[Case]:
    return [
        Case("digits_cnn (bundled)", lambda: Path(example_paths("digits-cnn")[0]),
             lambda tmp: str(example_paths("digits-cnn")[1]), 0.5, "y", quick=True),
        Case("own_fmnist_cnn_bn", _shared("trained/own_fmnist_cnn_bn.onnx"),
             _real("trained/own_fmnist_cnn_bn.onnx", "fmnist-4d", 10000), 0.8, "y", sparsity_rows=True, quick=True),
        Case("onnxzoo_mnist-8", _shared("real/onnxzoo_mnist-8.onnx"),
             _real("real/onnxzoo_mnist-8.onnx", "mnist-raw", 10000), 0.8, "y"),
        Case("ultraface_RFB-320_bnfolded", _shared("real/ortexamples_ultraface_RFB-320_bnfolded.onnx"),
             _random(samples), 0.0),
        Case("ppocr_mobile_v2.0_cls", _shared("real/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
             _real("real/ch_ppocr_mobile_v2.0_cls_infer.onnx", "text-lines", 8 * samples), 0.5, "y",
             shapes={"x": (1, 3, 48, 192)}),
        Case(f"PP-OCRv4_det {det_side}x{det_side}", _shared("real/ch_PP-OCRv4_det_infer.onnx"),
             lambda tmp: calibration_file(RealModel("real/ch_PP-OCRv4_det_infer.onnx", "text-pages", 2 * det_samples,
                                                    {"x": (1, 3, det_side, det_side)}), tmp), 0.5,
             shapes={"x": (1, 3, det_side, det_side)}),
    ]


def _options(case: Case, prune: dict, allow_larger: bool, threads: int) -> OptimizeOptions:
    max_samples = 10000 if case.labels else None
    recipe = Recipe((PassSpec.of("prune-channels", prune),),
                    CalibrationSettings(verify_split=case.split, max_samples=max_samples,
                                        input_shapes=tuple(case.shapes.items())))
    # min_samples 1: prune-channels does not use the Relu statistics the minimum guards (random data is small)
    return OptimizeOptions(recipe, labels=case.labels, latency=True, threads=threads, batch_size=BATCH,
                           allow_larger=allow_larger, min_samples=1)


def run_one(case: Case, calib: str, level: tuple[str, float], reconstruct: bool, extra: dict, threads: int) -> dict:
    kind, value = level
    prune = {kind: value, "reconstruct": reconstruct, **extra}
    if kind == "floor":  # every group at one channel, no block rounding: what the time cannot drop below
        prune = {**extra, "sparsity": value, "channel_multiple": 1, "reconstruct": False}
    row = {"model": case.name, "level": kind, "value": value, "reconstruct": reconstruct, "options": prune,
           "data": calib if calib.startswith("random") else Path(calib).name, "threads": threads}
    start = time.perf_counter()
    try:
        try:
            result = optimize(case.path(), calib, _options(case, prune, False, threads))
            row["allow_larger"] = False
        except VerificationGateError as exc:  # larger or slower: measured anyway, and said so
            row["allow_larger"] = str(exc)
            result = optimize(case.path(), calib, _options(case, prune, True, threads))
    except Exception as exc:  # noqa: BLE001 - a failed run is a row of the table, not the end of the benchmark
        row.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=4),
                   seconds=time.perf_counter() - start)
        return row
    row["seconds"] = time.perf_counter() - start
    row.update(figures(result.report))
    return row


def figures(r) -> dict:
    held = r.on_heldout
    pr = r.passes[0].result
    agree = [o.top1_agreement for o in held.outputs if o.top1_agreement is not None]
    b, a = r.before, r.after
    return {
        "calibration_samples": r.calibration_samples, "heldout_samples": held.samples,
        "acc_before": held.accuracy_before, "acc_after": held.accuracy_after,
        "agreement": min(agree) if agree else None,
        "rel_max": held.rel_max, "mean_rel": max(o.mean_abs / max(o.scale, 1e-12) for o in held.outputs),
        "non_finite": held.non_finite,
        "params_before": b.params, "params_after": a.params, "size_before": b.size_bytes, "size_after": a.size_bytes,
        "macs_before": b.macs, "macs_after": a.macs,
        "lat_b1_ms": [b.latency_b1.median_ms if b.latency_b1 else None,
                      a.latency_b1.median_ms if a.latency_b1 else None],
        "lat_ratio_b1": a.change_b1.ratio if a.change_b1 else None,
        "lat_change_b1": a.change_b1.as_dict() if a.change_b1 else None,
        "lat_batch_ms": [b.latency_batch.median_ms if b.latency_batch else None,
                         a.latency_batch.median_ms if a.latency_batch else None],
        "lat_ratio_batch": a.change_batch.ratio if a.change_batch else None,
        "lat_change_batch": a.change_batch.as_dict() if a.change_batch else None,
        "counts": dict(pr.counts), "skipped": dict(pr.skipped), "messages": list(r.messages),
    }


# ---- table and targets ----------------------------------------------------------------------------------------
def _f(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _quality(r: dict) -> str:
    if r.get("acc_after") is not None:
        return f"{100 * r['acc_before']:.2f}->{100 * r['acc_after']:.2f}"
    agree = "" if r.get("agreement") is None else f" agr {100 * r['agreement']:.1f}%"
    return f"rel {r['mean_rel']:.4f}/{r['rel_max']:.3f}{agree}"


def print_table(rows: list[dict], header: bool = True) -> None:
    head = (f"{'model':<28} {'level':<10} {'rec':<3} {'accuracy / rel err mean/max':<29} {'params':>17} "
            f"{'size KB':>13} {'MACs':>9} {'lat b1':>6} {'b32':>6} {'s':>5}")
    if header:
        print(head)
        print("-" * len(head))
    for r in rows:
        level = "floor" if r["level"] == "floor" else f"{LEVEL_NAMES.get(r['level'], r['level'])} {r['value']:g}"
        rec = "yes" if r["reconstruct"] else "no"
        if "error" in r:
            print(f"{r['model'][:28]:<28} {level:<10} {rec:<3} FAILED: {r['error'][:110]}")
            continue
        params = f"{r['params_before']:,}->{r['params_after'] / r['params_before']:.2f}x"
        size = f"{r['size_before'] / 1024:.0f}->{r['size_after'] / r['size_before']:.2f}x"
        macs = f"{r['macs_after'] / r['macs_before']:.3f}x"
        flag = " (allow_larger)" if r.get("allow_larger") else ""
        print(f"{r['model'][:28]:<28} {level:<10} {rec:<3} {_quality(r):<29} {params:>17} {size:>13} {macs:>9} "
              f"{_f(r['lat_ratio_b1'], '.3f'):>6} {_f(r['lat_ratio_batch'], '.3f'):>6} {r['seconds']:>5.0f}{flag}")


def _find(rows, model, level, value, rec):
    return next((r for r in rows if r["model"] == model and r["level"] == level and r["value"] == value
                 and r["reconstruct"] == rec and "error" not in r), None)


def targets(rows: list[dict]) -> dict:
    """The issue's targets, each with the figures it was judged on."""
    out: dict = {"speedup_at_50pct_macs": [], "reconstruct_vs_plain": [], "fmnist_sparsity_accuracy": []}
    for model in dict.fromkeys(r["model"] for r in rows):
        r = _find(rows, model, "target_macs", 0.5, True)
        if r is not None:
            speed = {k: (None if r[k] is None else 1.0 / r[k]) for k in ("lat_ratio_b1", "lat_ratio_batch")}
            met = all(v is None or v >= SPEEDUP_TARGET for v in speed.values())
            floor = next((x for x in rows if x["model"] == model and x["level"] == "floor" and "error" not in x), None)
            out["speedup_at_50pct_macs"].append({"model": model, "macs_ratio": r["macs_after"] / r["macs_before"],
                                                 "speedup_b1": speed["lat_ratio_b1"],
                                                 "speedup_b32": speed["lat_ratio_batch"], "met": met,
                                                 **(_bounds(floor) if floor is not None else {})})
        for value in (0.5, 0.25):
            rec, plain = (_find(rows, model, "target_macs", value, x) for x in (True, False))
            entry = {"model": model, "macs_removed": f"{100 * (1 - value):.0f}%"}
            if rec is None or plain is None:
                failed = [x for x in rows if x["model"] == model and x["value"] == value and "error" in x]
                entry.update(met=None, note="; ".join(f"reconstruct={x['reconstruct']}: {x['error'][:100]}"
                                                      for x in failed) or "not run")
            elif rec.get("acc_after") is not None:
                gap = 100 * (rec["acc_after"] - plain["acc_after"])
                entry.update(acc_reconstruct=rec["acc_after"], acc_plain=plain["acc_after"], gap_points=gap,
                             met=gap > 0)
            else:
                entry.update(mean_rel_reconstruct=rec["mean_rel"], mean_rel_plain=plain["mean_rel"],
                             error_ratio=plain["mean_rel"] / max(rec["mean_rel"], 1e-30),
                             met=rec["mean_rel"] < plain["mean_rel"])
            out["reconstruct_vs_plain"].append(entry)
    for s, goal in FMNIST_TARGETS.items():
        r = _find(rows, "own_fmnist_cnn_bn", "sparsity", s, True)
        if r is not None:
            out["fmnist_sparsity_accuracy"].append({"sparsity": s, "accuracy": r["acc_after"], "target": goal,
                                                    "met": r["acc_after"] >= goal})
    return out


def _bounds(floor: dict) -> dict:
    """The floor row's figures (every group at one channel: its speed-up is what no pruning beats; per-run and
    per-node costs that do not shrink with channels set it) and an estimate of the speed-up at 50 % of the MACs:
    with time affine in MACs between the floor and the original, ``t(m) = f + (1 - f)(m - m_f)/(1 - m_f)`` (``f``,
    ``m_f``: the floor's time and MAC ratios), ``1 / t(0.5)``. Blocked kernels make time step rather than slope
    with width, so the estimate is a guide, not a limit."""
    m_f = floor["macs_after"] / floor["macs_before"]
    out = {"floor_macs_ratio": m_f}
    for key, name in (("lat_ratio_b1", "b1"), ("lat_ratio_batch", "b32")):
        f = floor[key]
        out[f"floor_ratio_{name}"] = f
        out[f"bound_{name}"] = None if f is None or m_f >= 0.5 else 1.0 / (f + (1 - f) * (0.5 - m_f) / (1 - m_f))
    return out


def print_targets(t: dict) -> None:
    print(f"\nTarget: >= {SPEEDUP_TARGET}x faster at 50 % of the MACs removed (with reconstruction). floor: the "
          "speed-up with every channel group at one channel, which no pruning beats; at 50%: the speed-up if time "
          "were affine in MACs above the floor (an estimate)")
    for e in t["speedup_at_50pct_macs"]:
        floor = "".join(f"  {name}: floor {1 / e['floor_ratio_' + name]:.2f}x, at 50% {_f(e['bound_' + name], '.2f')}x"
                        for name in ("b1", "b32") if e.get("floor_ratio_" + name) is not None)
        print(f"  {e['model']:<30} MACs {e['macs_ratio']:.3f}x  b1 {_f(e['speedup_b1'], '.2f')}x  "
              f"b32 {_f(e['speedup_b32'], '.2f') + 'x' if e['speedup_b32'] else 'n/a (fixed batch)'}  "
              f"{'met' if e['met'] else 'MISSED'}{floor}")
    print("Target: reconstruction clearly better than plain removal at 50 / 75 % of the MACs removed")
    for e in t["reconstruct_vs_plain"]:
        if e.get("met") is None:
            print(f"  {e['model']:<30} {e['macs_removed']:>4}  n/a ({e['note']})")
        elif "gap_points" in e:
            print(f"  {e['model']:<30} {e['macs_removed']:>4}  {100 * e['acc_reconstruct']:.2f} vs "
                  f"{100 * e['acc_plain']:.2f}  gap {e['gap_points']:+.2f} points  {'met' if e['met'] else 'MISSED'}")
        else:
            print(f"  {e['model']:<30} {e['macs_removed']:>4}  mean rel error {e['mean_rel_reconstruct']:.4f} vs "
                  f"{e['mean_rel_plain']:.4f} ({e['error_ratio']:.1f}x lower)  {'met' if e['met'] else 'MISSED'}")
    print("Target: own_fmnist_cnn_bn accuracy at 25 / 50 / 75 % of the units of every layer")
    for e in t["fmnist_sparsity_accuracy"]:
        print(f"  sparsity {e['sparsity']:.2f}: {100 * e['accuracy']:.2f} (target {100 * e['target']:.2f})  "
              f"{'met' if e['met'] else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the digits and Fashion-MNIST CNNs")
    ap.add_argument("--models", default="", help="comma-separated substrings of the model names to run")
    ap.add_argument("--samples", type=int, default=64,
                    help="UltraFace's random samples (PP-OCR cls: 8x as many text lines)")
    ap.add_argument("--det-side", type=int, default=160, help="PP-OCRv4 det input side")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads (pinned) for the latency rounds")
    ap.add_argument("--channel-multiple", type=int, default=None,
                    help="prune-channels channel_multiple (default: the pass's, 0 = the CPU's NCHWc block)")
    ap.add_argument("--rows", default="target_macs,floor",
                    help="comma-separated level kinds to run: target_macs, target_latency, floor (every group at "
                         "one channel, plain removal: the time pruning cannot go below)")
    ap.add_argument("--values", default="0.75,0.5,0.25", help="comma-separated keep fractions of the target rows")
    ap.add_argument("--recon", default="yes,no", help="reconstruct settings to run: yes, no or yes,no")
    ap.add_argument("--conv-widths", action="store_true", help="time single Conv layers at many widths, then exit")
    ap.add_argument("--importance", default="reconstruction", help="prune-channels importance")
    ap.add_argument("--det-samples", type=int, default=32,
                    help="PP-OCRv4 det's calibration pages (as many held out; the slowest)")
    ap.add_argument("--merge", action="store_true", help="keep the rows already in --out that this run does not redo")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--table-only", action="store_true", help="print the table and targets of --out, run nothing")
    args = ap.parse_args()
    if args.conv_widths:
        conv_widths()
        return
    if args.table_only:
        rows = json.loads(args.out.read_text())["rows"]
        print_table(rows)
        print_targets(targets(rows))
        return
    chosen = [c for c in cases(args.samples, args.det_side, args.det_samples) if (c.quick or not args.quick)
              and (not args.models or any(m in c.name for m in args.models.split(",")))]
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: running the bundled model only")
        chosen = [c for c in chosen if "bundled" in c.name]
    extra = {"importance": args.importance}
    if args.channel_multiple is not None:
        extra["channel_multiple"] = args.channel_multiple
    kinds = args.rows.split(",")
    recon = [r == "yes" for r in args.recon.split(",")]

    def levels_of(case: Case) -> list[tuple[str, float]]:
        out = [(kind, float(t)) for kind in kinds if kind != "floor" for t in args.values.split(",")]
        out += [("sparsity", s) for s in SPARSITIES] if case.sparsity_rows and "target_macs" in kinds else []
        return out + ([("floor", FLOOR_SPARSITY)] if "floor" in kinds else [])

    def runs_of(case: Case) -> list[tuple[tuple[str, float], bool]]:
        return [(level, rec) for level in levels_of(case) for rec in (recon if level[0] != "floor" else [False])]

    redo = {(c.name, kind, value, rec) for c in chosen for (kind, value), rec in runs_of(c)}
    kept = [r for r in json.loads(args.out.read_text())["rows"]
            if (r["model"], r["level"], r["value"], r["reconstruct"]) not in redo] \
        if args.merge and args.out.exists() else []
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print_table([])
    with tempfile.TemporaryDirectory() as tmp:
        for case in chosen:
            calib = case.calib(Path(tmp))
            for level, reconstruct in runs_of(case):
                rows.append(run_one(case, calib, level, reconstruct, extra, args.threads))
                print_table(rows[-1:], header=False)
                sys.stdout.flush()
                _write(args, kept + rows)
    print()
    print_table(kept + rows)
    print_targets(_write(args, kept + rows))


def _conv_model(cin: int, cout: int, k: int, group: int, side: int):
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((cout, cin // group, k, k)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[k // 2] * 4, group=group, kernel_shape=[k, k]),
             helper.make_node("Relu", ["y"], ["z"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                            [1, cin, side, side])],
                              [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, cout, side, side])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def conv_widths(side: int = 40) -> None:
    """Median time of one Conv (+Relu) per width, one pinned thread, full graph optimisations (NCHWc)."""
    import numpy as np

    from onnx_lincomp.analysis.layer_latency import nchwc_block
    from onnx_lincomp.runtime.latency import LatencyOptions, measure_latency

    print(f"NCHWc block of this CPU: {nchwc_block()}")
    for kind, k, dw in (("3x3 Conv C->C", 3, False), ("1x1 Conv C->C", 1, False), ("depthwise 3x3", 3, True)):
        for c in range(24, 73, 4):
            model = _conv_model(c, c, k, c if dw else 1, side)
            feeds = {"x": np.random.default_rng(1).standard_normal((1, c, side, side)).astype(np.float32)}
            lat = measure_latency(model, feeds, LatencyOptions(runs=50, threads=1))
            macs = c * (1 if dw else c) * k * k * side * side
            print(f"{kind}  C={c:3d}  {lat.median_ms:8.4f} ms  {macs / lat.median_ms / 1e6:6.1f} GMAC/s", flush=True)


def _write(args, rows: list[dict]) -> dict:
    t = targets(rows)
    settings = {"threads": args.threads, "batch": BATCH, "samples": args.samples, "det_side": args.det_side,
                "det_samples": args.det_samples, "channel_multiple": args.channel_multiple,
                "importance": args.importance}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows, "targets": t}, indent=2, default=str))
    return t


if __name__ == "__main__":
    main()
