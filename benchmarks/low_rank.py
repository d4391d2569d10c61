"""low-rank: ALDS against uniform SVD and the energy threshold, each with and without data-aware SVD.

    python benchmarks/low_rank.py [--only SUBSTRING] [--no-latency] [--keeps 0.8,0.6,0.4] [--methods alds,...]
                                  [--allocation-only] [--latency-check]
    python benchmarks/low_rank.py --rotations 5 --only fmnist_mlp --keeps 0.4 --methods alds,uniform

Models: the bundled digits MLP and CNN (their 540 labelled samples, half calibration, half held out),
``trained/own_fmnist_cnn_bn.onnx`` and ``trained/own_fmnist_mlp_l1.onnx`` (Fashion-MNIST test set:
calibration on the first 2,000 images, held out the other 8,000) and ``real/onnxzoo_mnist-8.onnx``
(MNIST test set, same split); PP-OCR cls on 512 lines of MNIST digits set as text, half turned 180 degrees
(``tests/text_images.py``; the turn is the label: 256 calibrate, 256 held out); UltraFace RFB-320 (BN folded)
on random data (64 samples calibrate, 64 fresh ones held out) and PP-OCRv4 det on 64 pages of such text at
160x160 (32 calibrate, 32 held out; on noise it outputs zeros), both judged by the relative output error per
held-out sample (``||y' - y|| / ||y - mean y||`` over every float output, the mean over samples of the
denominator). For every keep
ratio of the parameters, method and data-awareness one
``optimize`` run with the ``low-rank`` pass only: parameters and MACs after / before, onnxruntime latency
ratio at batch 1 and 32 (interleaved rounds, pinned threads; mnist-8 takes batch 1 only), held-out
accuracy, and the per-layer choices (k, rank). Per factorised layer it also reports the error on the
held-out samples (at most 2,000), which the pass never sees: the relative operator-norm error of the layer
alone on held-out activations (the layer's original input fed to its factorised form; the same measure as
the pass's "data error" on the calibration part) and the relative RMS change of the layer's output in the
factorised model (errors of earlier layers included). Prints markdown tables and writes
benchmarks/results/low_rank.json (rewritten after every run, so a partial run keeps its rows; rows of
other models, methods and keeps already there are kept). First it times the decompositions and the ALDS
allocation of a synthetic 50-layer model.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SHARED  # noqa: E402
from onnx_lincomp.calibration.activations import with_outputs  # noqa: E402
from onnx_lincomp.evaluate.evaluator import model_correct  # noqa: E402
from onnx_lincomp.evaluate.paired import drop_interval  # noqa: E402
from onnx_lincomp.examples import example_paths  # noqa: E402
from onnx_lincomp.linear_layer import LinearLayer, match_linear_layer  # noqa: E402
from onnx_lincomp.model_io import to_model_proto  # noqa: E402
from onnx_lincomp.optimize import OptimizeOptions, optimize  # noqa: E402
from onnx_lincomp.prepared import Prepared, prepare  # noqa: E402
from onnx_lincomp.recipe import CalibrationSettings, PassSpec, Recipe  # noqa: E402
from onnx_lincomp.runtime.feeds import iterate_feeds  # noqa: E402
from onnx_lincomp.runtime.session import SessionOptions, SessionScope  # noqa: E402
from real_models import RealModel, calibration_file  # noqa: E402

KEEPS = (0.8, 0.6, 0.4)
METHODS = ("alds", "uniform", "energy")
OUT = HERE / "results" / "low_rank.json"
LAYER_SAMPLES = 2000  # held-out samples the per-layer errors read




def models(tmp: Path) -> list[tuple[str, str, str, CalibrationSettings, str | None]]:
    """(label, model path, calibration path, calibration settings, labels key or None)."""
    out = []
    for name in ("digits-mlp", "digits-cnn"):
        model, calib = example_paths(name)
        out.append((name, str(model), str(calib), CalibrationSettings(verify_split=0.5), "y"))
    split = CalibrationSettings(verify_split=0.8, max_samples=10000)
    for path, data in (("trained/own_fmnist_cnn_bn.onnx", "fmnist-4d"), ("trained/own_fmnist_mlp_l1.onnx", "fmnist"),
                       ("real/onnxzoo_mnist-8.onnx", "mnist-raw")):
        calib = calibration_file(RealModel(path, data, 10000), tmp)
        out.append((Path(path).stem, str(SHARED / "models" / path), calib, split, "y"))
    ultraface = "real/ortexamples_ultraface_RFB-320_bnfolded.onnx"
    out.append(("ultraface_RFB-320_bnfolded", str(SHARED / "models" / ultraface), "random:64",
                CalibrationSettings(verify_split=0.0), None))
    cls, det = "real/ch_ppocr_mobile_v2.0_cls_infer.onnx", "real/ch_PP-OCRv4_det_infer.onnx"
    out.append(("ppocr_mobile_v2.0_cls", str(SHARED / "models" / cls),
                calibration_file(RealModel(cls, "text-lines", 512), tmp), CalibrationSettings(verify_split=0.5), "y"))
    shape = (1, 3, 160, 160)
    out.append(("PP-OCRv4_det 160x160", str(SHARED / "models" / det),
                calibration_file(RealModel(det, "text-pages", 64, {"x": shape}), tmp),
                CalibrationSettings(verify_split=0.5, input_shapes=(("x", shape),)), None))
    return out


class _Moments:
    """Streamed mean and second moment of the rows of a ``rows x features`` matrix."""

    def __init__(self):
        self.n, self.total, self.gram = 0, 0.0, 0.0

    def add(self, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64)
        self.n += len(rows)
        self.total = self.total + rows.sum(axis=0)
        self.gram = self.gram + rows.T @ rows

    def covariance(self) -> np.ndarray:
        mean = self.total / max(self.n, 1)
        return self.gram / max(self.n, 1) - np.outer(mean, mean)


def _rows(value: np.ndarray, conv: bool) -> np.ndarray:
    """A layer output as rows of features (Conv: channels, one row per sample and position)."""
    return (np.moveaxis(value, 1, -1) if conv else value).reshape(-1, value.shape[1 if conv else -1])


def _top(a: np.ndarray) -> float:
    return max(float(np.linalg.eigvalsh((a + a.T) / 2)[-1]), 0.0)


def _layer_alone(model: onnx.ModelProto, x: str, y: str) -> onnx.ModelProto:
    """The part of ``model`` from tensor ``x`` to tensor ``y`` (a factorised layer) as a model."""
    g = gs.import_onnx(model)
    tensors = g.tensors()
    for name in (x, y):
        if tensors[name].dtype is None:
            tensors[name].dtype = np.float32
    g.inputs, g.outputs = [tensors[x]], [tensors[y]]
    g.cleanup()
    return gs.export_onnx(g)


def heldout_layer_errors(prep: Prepared, factorised: onnx.ModelProto, sites: list[str]) -> dict[str, dict]:
    """Per factorised layer (node name in ``sites``), on up to :data:`LAYER_SAMPLES` held-out samples:
    ``isolated``, the relative operator-norm error ``sqrt(top eig cov(Y^ - Y) / top eig cov(Y))`` of the layer
    alone (its factorised form fed the original model's input to the layer; the pass's "data error" is the
    same measure on the calibration part), and ``cumulative``, the relative RMS change ``||Y' - Y||_F / ||Y -
    mean Y||_F`` of the layer's output tensor in the factorised model (earlier layers' errors included)."""
    graph = prep.loaded.graph
    layers: dict[str, LinearLayer] = {}
    for name in sites:
        node = next(n for n in graph.nodes if n.name == name)
        layers[name] = match_linear_layer(graph, node)
    ins = list(dict.fromkeys(v.input.name for v in layers.values()))
    outs = list(dict.fromkeys(v.output.name for v in layers.values()))
    original = with_outputs(to_model_proto(graph, prep.loaded.ctx, infer_shapes=False), ins + outs)
    changed = with_outputs(onnx.ModelProto.FromString(factorised.SerializeToString()), outs)
    stats = {name: (_Moments(), _Moments(), [0.0]) for name in layers}  # Y, Y^ - Y (alone), [sum (Y' - Y)^2]
    samples = 0
    options = SessionOptions(threads=1, optimize=False)
    with SessionScope(prefix="lowrank-bench-") as scope:
        before, after = scope.open(original, options), scope.open(changed, options)
        alone = {name: scope.open(_layer_alone(factorised, v.input.name, v.output.name), options)
                 for name, v in layers.items()}
        held = prep.heldout_split()
        stop = min(len(held.source), held.start + LAYER_SAMPLES)
        for feeds, _ in iterate_feeds(graph, held.source, 250, held.start, stop):
            ref = dict(zip(ins + outs, before.run(ins + outs, feeds), strict=True))
            got = dict(zip(outs, after.run(outs, feeds), strict=True))
            samples += len(ref[outs[0]])
            for name, v in layers.items():
                conv = v.kind == "conv"
                y = _rows(ref[v.output.name], conv)
                iso = _rows(alone[name].run(None, {v.input.name: ref[v.input.name]})[0], conv)
                ys, ds, acc = stats[name]
                ys.add(y)
                ds.add(iso - y)
                acc[0] += float(((_rows(got[v.output.name], conv) - y).astype(np.float64) ** 2).sum())
    out = {}
    for name, (ys, ds, acc) in stats.items():
        spread = float(np.trace(ys.covariance())) * ys.n
        out[name] = {"isolated": float(np.sqrt(_top(ds.covariance()) / max(_top(ys.covariance()), 1e-300))),
                     "cumulative": float(np.sqrt(acc[0] / max(spread, 1e-300))), "samples": samples}
    return out


def heldout_output_errors(prep: Prepared, model: onnx.ModelProto) -> list[float]:
    """Per held-out sample, the relative output error ``sqrt(sum_o ||y'_o - y_o||^2 / mean_s sum_o ||y_o - mean
    y_o||^2)`` of ``model`` against the original over every float output (the models without labels)."""
    held = prep.heldout_split()
    names = [o.name for o in prep.original.graph.output]
    errs, spread, refs = [], [], []
    options = SessionOptions(threads=1, optimize=False)
    with SessionScope(prefix="lowrank-bench-") as scope:
        before, after = scope.open(prep.original, options), scope.open(model, options)
        for feeds, _ in iterate_feeds(prep.loaded.graph, held.source, 64, held.start, held.stop):
            ref, got = before.run(names, feeds), after.run(names, feeds)
            floats = [i for i, v in enumerate(ref) if np.issubdtype(v.dtype, np.floating)]
            n = len(ref[floats[0]])
            errs.append(sum(((got[i].astype(np.float64) - ref[i]) ** 2).reshape(n, -1).sum(axis=1) for i in floats))
            refs.append([ref[i].astype(np.float64).reshape(n, -1) for i in floats])
    for j in range(len(refs[0])):
        values = np.concatenate([r[j] for r in refs])
        spread.append(float(((values - values.mean(axis=0)) ** 2).sum(axis=1).mean()))
    return [float(v) for v in np.sqrt(np.concatenate(errs) / max(sum(spread), 1e-300))]


def heldout_correct(prep: Prepared, model: onnx.ModelProto, labels: str = "y") -> str | None:
    """Per held-out sample, whether ``model``'s top-1 is the label: packed bits, base64 (None without labels)."""
    correct = model_correct(model, prep.loaded.graph, prep.source, labels, prep.n_calib, None, 250, threads=1)
    if correct is None or not correct.size:
        return None
    return base64.b64encode(np.packbits(correct).tobytes()).decode()


def _bits(row: dict) -> np.ndarray | None:
    code, n = row.get("heldout_correct"), row.get("heldout_samples")
    if not code or not n:
        return None
    return np.unpackbits(np.frombuffer(base64.b64decode(code), np.uint8))[:n].astype(bool)


def one_run(model: str, calib: str, settings: CalibrationSettings, keep: float, method: str, aware: bool,
            latency: bool, check_latency: bool = False, labels: str | None = "y") -> dict:
    options = {"keep_params": keep, "method": method, "data_aware": aware, "check_latency": check_latency}
    recipe = Recipe((PassSpec.of("low-rank", options),), settings)
    start = time.perf_counter()
    # min_samples 1: low-rank reads no Relu statistics, and the random sets of the unlabelled models are small
    result = optimize(model, calib, OptimizeOptions(recipe, labels=labels, latency=latency, batch_size=32,
                                                     max_output_change=None, allow_larger=True, min_samples=1))
    seconds = time.perf_counter() - start
    rep = result.report
    held = rep.on_heldout
    record = rep.passes[0]
    sites = [n.split(": ")[0] for n in record.result.notes if not n.startswith("allocation: ")]
    prep = prepare(model, calib, recipe, labels=labels)
    layer_errors = heldout_layer_errors(prep, result.model, sites) if sites and prep.heldout_count else {}
    correct = heldout_correct(prep, result.model) if prep.heldout_count and labels else None
    sample_errors = heldout_output_errors(prep, result.model) if prep.heldout_count and not labels else None
    b1, b32 = rep.after.change_b1, rep.after.change_batch
    return {"keep": keep, "method": method, "data_aware": aware,
            "params_ratio": rep.after.params / rep.before.params,
            "macs_ratio": rep.after.macs / max(rep.before.macs, 1),
            "latency_b1": b1.ratio if b1 else None, "latency_b32": b32.ratio if b32 else None,
            "latency_b1_verdict": b1.verdict if b1 else None, "latency_b32_verdict": b32.verdict if b32 else None,
            "accuracy_before": held.accuracy_before, "accuracy_after": held.accuracy_after,
            "agreement": held.agreement, "heldout_samples": held.samples, "seconds": seconds,
            "pass_seconds": record.seconds, "layers": list(record.result.notes),
            "layer_errors": layer_errors, "skipped": dict(record.result.skipped), "heldout_correct": correct,
            "output_errors": sample_errors,
            "mean_output_error": float(np.mean(sample_errors)) if sample_errors else None}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _chosen(r: dict) -> str:
    """Which candidate allocation the pass kept (alds with calibration data), or '-'."""
    note = next((n for n in r["layers"] if n.startswith("allocation: ")), None)
    return note.removeprefix("allocation: ").split(" chosen")[0] if note else "-"


def _quality(r: dict) -> str:
    """Held-out accuracy before -> after, or the mean relative output error (models without labels)."""
    if r.get("mean_output_error") is not None:
        return f"output error {r['mean_output_error']:.4f}"
    return f"{_pct(r['accuracy_before'])} -> {_pct(r['accuracy_after'])}"


def table(rows: list[dict]) -> str:
    lines = ["| model | keep | method | data-aware | params | MACs | latency b1 | latency b32 | accuracy / error | "
             "agreement | choices (k/rank) | allocation kept |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        picks = ", ".join(n.split(": ")[1].split(":")[0].replace(" rank ", "/").replace("k=", "")
                          for n in r["layers"] if not n.startswith("allocation: ")) or "none"
        lines.append(f"| {r['model']} | {r['keep']} | {r['method']} | {'yes' if r['data_aware'] else 'no'} | "
                     f"{r['params_ratio']:.3f} | {r['macs_ratio']:.3f} | {_ratio(r['latency_b1'])} | "
                     f"{_ratio(r['latency_b32'])} | {_quality(r)} | "
                     f"{_pct(r['agreement'])} | {picks} | {_chosen(r)} |")
    return "\n".join(lines)


def _note_value(note: str, key: str) -> str:
    return note.split(key + " ")[1].split(" ")[0].rstrip(",;") if key + " " in note else "-"


def layer_table(rows: list[dict]) -> str:
    """Per factorised layer: its weight-space error, the data error the pass measured on the calibration part,
    and the errors on held-out activations (see :func:`heldout_layer_errors`)."""
    lines = ["| model | keep | method | data-aware | layer | k/rank | op-norm error (weights) | data error "
             "(calibration) | data error (held-out, layer alone) | output change (held-out, cumulative) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for note in r["layers"]:
            if note.startswith("allocation: "):
                continue
            name, rest = note.split(": ", 1)
            held = r.get("layer_errors", {}).get(name, {})
            lines.append(f"| {r['model']} | {r['keep']} | {r['method']} | {'yes' if r['data_aware'] else 'no'} | "
                         f"{name} | {rest.split(':')[0].replace(' rank ', '/').replace('k=', '')} | "
                         f"{_note_value(note, 'op-norm error')} | {_note_value(note, 'data error')} | "
                         f"{held.get('isolated', float('nan')):.3g} | {held.get('cumulative', float('nan')):.3g} |")
    return "\n".join(lines)


def paired_error(a: dict, b: dict) -> tuple[float, float, float] | None:
    """Mean relative output error of row ``a`` minus row ``b`` per held-out sample (the same samples), with its
    95 % normal interval, or None when a row has no per-sample errors."""
    x, y = a.get("output_errors"), b.get("output_errors")
    if not x or not y or len(x) != len(y):
        return None
    d = np.asarray(x) - np.asarray(y)
    half = 1.96 * float(d.std(ddof=1)) / np.sqrt(d.size) if d.size > 1 else float("inf")
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half


def paired(a: dict, b: dict) -> tuple[float, float, float] | None:
    """Accuracy of row ``a`` minus row ``b`` on the same held-out samples, with its 95 % paired interval
    (points), or None when a row has no per-sample record."""
    x, y = _bits(a), _bits(b)
    if x is None or y is None or x.shape != y.shape:
        return None
    iv = drop_interval(int((y & ~x).sum()), int((x & ~y).sum()), x.size)  # b's drop to a: minus a's gain
    return -100 * iv.estimate, -100 * iv.upper, -100 * iv.lower


def gain(a: dict, b: dict) -> tuple[float, float, float] | None:
    """How much better row ``a`` is than row ``b`` on the same held-out samples, with its paired 95 % interval:
    accuracy points with labels, the reduction of the mean relative output error without. None without
    per-sample records."""
    if a.get("output_errors"):
        d = paired_error(a, b)
        return None if d is None else (-d[0], -d[2], -d[1])
    return paired(a, b)


def _cell(a: dict, b: dict) -> str:
    d = gain(a, b)
    if a.get("output_errors"):
        text = f"error {a['mean_output_error']:.4f} vs {b['mean_output_error']:.4f}"
        return text if d is None else f"{text}, reduction {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"
    text = f"{100 * a['accuracy_after']:.2f} vs {100 * b['accuracy_after']:.2f}"
    return text if d is None else f"{text}, diff {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"


def _better(a: dict, b: dict) -> float:
    """Point estimate of how much better ``a`` is than ``b`` (where no per-sample record exists)."""
    if a.get("mean_output_error") is not None:
        return b["mean_output_error"] - a["mean_output_error"]
    return a["accuracy_after"] - b["accuracy_after"]


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets, judged on paired 95 % intervals of the held-out difference (the same samples under
    both models; accuracy with labels, the relative output error without): ALDS at least as accurate as
    uniform at every budget (no interval wholly on the worse side) and more accurate at one (an interval wholly
    on the better side); data-aware above weight space at 0.4. Point estimates alone are also shown:
    differences of a few tenths on 270 samples are one sample."""
    out = []
    by = {(r["model"], r["keep"], r["method"], r["data_aware"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for aware in (False, True):
            pairs = [(k, by.get((model, k, "alds", aware)), by.get((model, k, "uniform", aware))) for k in KEEPS]
            pairs = [(k, a, u) for k, a, u in pairs if a is not None and u is not None]
            if not pairs:
                continue
            diffs = [gain(a, u) for _, a, u in pairs]
            if all(d is not None for d in diffs):
                ok = all(d[2] >= 0 for d in diffs) and any(d[1] > 0 for d in diffs)
                rule = "paired"
            else:
                ok = all(_better(a, u) >= 0 for _, a, u in pairs) and any(_better(a, u) > 0 for _, a, u in pairs)
                rule = "point estimates"
            detail = "; ".join(f"{k}: {_cell(a, u)}" for k, a, u in pairs)
            out.append(f"{model} ({'data-aware' if aware else 'weight space'}): ALDS vs uniform "
                       f"{'MET' if ok else 'MISSED'} ({rule}; {detail})")
        a, w = by.get((model, 0.4, "alds", True)), by.get((model, 0.4, "alds", False))
        if a is not None and w is not None:
            d = gain(a, w)
            ok = d[1] > 0 if d is not None else _better(a, w) > 0
            out.append(f"{model}: data-aware ALDS vs weight-space ALDS at 0.4 {'MET' if ok else 'MISSED'} "
                       f"({_cell(a, w)})")
    return out


def allocation_timing(layers: int = 50, width: int = 64) -> dict:
    """Seconds to decompose (every k <= 8, exact grouped errors) and to allocate ``layers`` Conv layers of
    ``width`` -> ``width`` channels, 3x3, in weight space (a 50-layer model)."""
    import numpy as np

    from onnx_lincomp.analysis.low_rank_alloc import Allocator, Spectrum, choices, divisors

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    tables = []
    for _ in range(layers):
        sp = Spectrum(rng.normal(size=(width, width * 9)), width)
        tables.append({k: choices(sp.errors(k, "exact"), k, width, width * 9, 1.0, 1) for k in divisors(width, 8)})
    spectra = time.perf_counter() - start
    start = time.perf_counter()
    alloc = Allocator(tables, 0.4 * layers * width * width * 9).alds((2, 3, 4, 5, 8), 4)
    return {"layers": layers, "shape": [width, width, 3, 3], "decompose_seconds": spectra,
            "allocate_seconds": time.perf_counter() - start, "max_error": alloc.max_error if alloc else None}


def rotations(count: int, only: str, keeps: list[float], methods: list[str]) -> None:
    """ALDS against uniform on ``count`` calibration / held-out splits of each labelled model whose split is fixed
    (the Fashion-MNIST and MNIST test sets): split ``i`` calibrates on the ``i``-th block of samples (the data
    rotated by ``i`` blocks, the pass still reading the first ``1 - verify_split`` of it) and holds out the rest.
    One split's verdict can hang on a few dozen samples; over the splits a difference that is real keeps its
    sign. Writes benchmarks/results/low_rank_rotations.json."""
    out, rows = OUT.with_name("low_rank_rotations.json"), []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, calib, settings, labels in models(Path(tmp)):
            if only not in label or not labels or calib.startswith("random") or settings.verify_split != 0.8:
                continue
            with np.load(calib) as z:
                data = {k: z[k] for k in z.files}
            block = round(len(data[labels]) * (1 - settings.verify_split))
            splits = min(count, len(data[labels]) // block)  # beyond that the rotation repeats a split
            for i in range(splits):
                path = Path(tmp) / f"{label}_rot{i}.npz"
                np.savez(path, **{k: np.roll(v, -i * block, axis=0) for k, v in data.items()})
                for keep in keeps:
                    for aware in (False, True):
                        runs = {m: one_run(model, str(path), settings, keep, m, aware, False, labels=labels)
                                for m in methods}
                        for m, r in runs.items():
                            rows.append({"model": label, "split": i, "keep": keep, "method": m, "data_aware": aware,
                                         **{k: r[k] for k in ("accuracy_before", "accuracy_after", "agreement",
                                                              "heldout_samples", "layers")}})
                        if "alds" in runs and "uniform" in runs:
                            d = paired(runs["alds"], runs["uniform"])
                            rows[-1]["alds_minus_uniform"] = d
                            print(f"{label} split {i} keep {keep} {'data-aware' if aware else 'weight space'}: "
                                  f"ALDS {_pct(runs['alds']['accuracy_after'])} (agreement "
                                  f"{_pct(runs['alds']['agreement'])}) vs uniform "
                                  f"{_pct(runs['uniform']['accuracy_after'])} ({_pct(runs['uniform']['agreement'])}),"
                                  f" diff {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]", flush=True)
                        out.write_text(json.dumps({"rows": rows}, indent=1))
    diffs = [r["alds_minus_uniform"] for r in rows if r.get("alds_minus_uniform")]
    if diffs:
        mean = float(np.mean([d[0] for d in diffs]))
        print(f"\nALDS minus uniform over {len(diffs)} (split, keep, mode) cells: mean {mean:+.3f} points; "
              f"below zero with 95 % confidence in {sum(d[2] < 0 for d in diffs)}, above in "
              f"{sum(d[1] > 0 for d in diffs)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the models whose label contains this")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--allocation-only", action="store_true", help="only time a 50-layer allocation (added to the "
                                                                        "existing JSON)")
    ap.add_argument("--latency-check", action="store_true",
                    help="run the pass with check_latency (rows go to low_rank_latency_check.json)")
    ap.add_argument("--rotations", type=int, default=0,
                    help="ALDS vs uniform (no latency) on this many calibration / held-out splits of the labelled "
                         "models with a fixed split (rows go to low_rank_rotations.json), then exit")
    args = ap.parse_args()
    if args.rotations:
        methods = [m for m in args.methods.split(",") if m in ("alds", "uniform")]
        rotations(args.rotations, args.only, [float(k) for k in args.keeps.split(",")], methods)
        return
    out = OUT.with_name("low_rank_latency_check.json") if args.latency_check else OUT
    timing = allocation_timing()
    print(f"50 Conv layers 64x64x3x3: decompositions {timing['decompose_seconds']:.1f}s, allocation "
          f"{timing['allocate_seconds']:.2f}s")
    if args.allocation_only:
        saved = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps(dict(saved, allocation_50_layers=timing), indent=1))
        return
    keeps = [float(k) for k in args.keeps.split(",")]
    rows: list[dict] = []
    kept = json.loads(out.read_text()).get("rows", []) if out.exists() else []

    def key(r: dict) -> tuple:
        return r["model"], r["keep"], r["method"], r["data_aware"]
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, calib, settings, labels in models(Path(tmp)):
            if args.only not in label:
                continue
            data = calib if calib.startswith("random") else Path(calib).name
            # rows of this model on other data (an earlier data set) no longer compare with the new ones
            kept = [r for r in kept if r["model"] != label or r.get("data", data) == data]
            for keep in keeps:
                for method in args.methods.split(","):
                    for aware in (False, True):
                        row = {"model": label, "data": data, **one_run(model, calib, settings, keep, method, aware,
                                                                       not args.no_latency, args.latency_check, labels)}
                        rows.append(row)
                        print(table([row]).splitlines()[-1], f"({row['seconds']:.0f}s)", flush=True)
                        fresh = {key(r) for r in rows}
                        every = [r for r in kept if key(r) not in fresh] + rows
                        out.write_text(json.dumps({"rows": every, "verdicts": verdicts(every),
                                                   "allocation_50_layers": timing}, indent=1))
    print()
    print(table(rows))
    print()
    print(layer_table(rows))
    print()
    print("\n".join(verdicts(rows)))


if __name__ == "__main__":
    main()
