"""Command-line interface. Exit codes: 0 success, 1 runtime error, 2 usage error,
3 invalid model or calibration data, 4 a verification gate (--max-abs-error, --max-accuracy-drop) failed."""
from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .errors import LincompError

EXIT_CODES_HELP = "Exit codes: 0 ok, 1 runtime error, 2 usage error, 3 invalid model/data, 4 verification gate failed."


def _progress(label: str):
    """A click progress bar on stderr, driven by the library's (done, total) callback."""
    state = {"bar": None}

    def update(done: int, total: int) -> None:
        if state["bar"] is None:
            state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)
            state["bar"].__enter__()
        bar = state["bar"]
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    return update


def _write_json(target: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=_json_default)
    if target == "-":
        click.echo(text)
    else:
        tmp = Path(target + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _resolve(model: str | None, calib: str | None, example: str | None) -> tuple[str, str | None]:
    if example:
        from .examples import example_paths

        m, c = example_paths(example)
        return str(m), calib or str(c)
    if model is None:
        raise click.UsageError("give a MODEL path or --example NAME")
    return model, calib


def _shapes(items) -> tuple:
    from .calibration.data_source import parse_input_shapes

    return tuple(parse_input_shapes(items).items())


def _fmt_int(n) -> str:
    return "?" if n is None else f"{n:,}"


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LincompError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="onnx-lincomp")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """onnx-lincomp: make ReLU networks in ONNX smaller and faster from calibration statistics."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


common_calib = [
    click.option("--calib", "calib", help="Calibration data: .npz/.npy, a folder of shards, or random[:N]."),
    click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Samples per onnxruntime run."),
    click.option("--max-samples", type=click.IntRange(1), help="Use at most this many samples."),
    click.option("--input-shape", "input_shape", multiple=True, help="NAME=D1,D2,... for dynamic dimensions (random data, MACs)."),
    click.option("--threads", default=0, type=click.IntRange(0), help="onnxruntime intra-op threads (0: default)."),
    click.option("--example", type=click.Choice(["digits-mlp", "digits-cnn"]), help="Use a bundled example model and data."),
]


def _with(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


@main.command(epilog="Example: onnx-lincomp analyze --example digits-mlp\n\n" + EXIT_CODES_HELP)
@click.argument("model", required=False)
@_with(common_calib)
@click.option("--save-stats", type=click.Path(dir_okay=False), help="Write the statistics to this .npz.")
@click.option("--stats", "stats_file", type=click.Path(exists=True, dir_okay=False), help="Reuse statistics saved earlier.")
@click.option("--json", "json_out", help="Write the analysis as JSON to this file ('-' for stdout).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw activation-rate distributions to this PNG (extra 'plot').")
def analyze(model, calib, batch_size, max_samples, input_shape, threads, example, save_stats, stats_file, json_out, plot):
    """Report dead and always-active ReLU units per layer and what removing/folding them could save."""
    from .analysis.analyze import analyze as run_analysis, plot_rates
    from .calibration import CollectOptions, StatsSet, collect_relu_stats, input_specs, open_calibration
    from .canonicalize import canonicalize
    from .model_io import load_model

    model, calib = _resolve(model, calib, example)
    loaded = load_model(model)
    canonicalize(loaded.graph, ctx=loaded.ctx)
    if stats_file:
        stats = StatsSet.load(stats_file)
    else:
        if not calib:
            raise click.UsageError("give --calib DATA (or --stats FILE)")
        source = open_calibration(calib, input_specs(loaded.graph), max_samples=max_samples,
                                  shape_overrides=dict(_shapes(input_shape)))
        stats = collect_relu_stats(loaded.graph, loaded.ctx, source, CollectOptions(batch_size=batch_size, threads=threads),
                                   progress=_progress("calibrating"))
    if save_stats:
        stats.save(save_stats)
    result = run_analysis(loaded.graph, loaded.ctx, stats)
    if plot:
        try:
            plot_rates(stats, plot)
        except ImportError as exc:
            raise LincompError("--plot needs matplotlib: pip install 'onnx-lincomp[plot]'") from exc
    if json_out:
        _write_json(json_out, dict(result.as_dict(), model=model))
        if json_out == "-":
            return
    _print_analysis(model, result)


def _print_analysis(model: str, a) -> None:
    src = f"{a.calibration} ({a.samples} samples{', RANDOM data: rates say little about real inputs' if a.random else ''})"
    click.echo(f"{model}\ncalibration: {src}")
    click.echo(f"{'relu':<34} {'width':>6} {'dead':>6} {'always':>6} {'med.rate':>8} {'dead params':>11}  note")
    for l in a.layers:
        click.echo(f"{l.relu[:34]:<34} {l.width:>6} {l.dead:>6} {l.always_active:>6} {l.median_position_rate:>8.3f} "
                   f"{l.dead_params:>11,}  {'' if l.rewritable else 'not rewritable: ' + l.reason}")
    for name, why in a.not_analysed:
        click.echo(f"{name[:34]:<34} not analysed: {why}")
    click.echo(f"parameters {a.params:,} -> {a.params_after:,} and MACs {a.macs:,} -> {a.macs_after:,} "
               f"with the exact passes (remove-dead, fold-linear, merge-affine at rates 0 and 1)")


exact_options = [
    click.option("--exact", is_flag=True, help="Prove stability over --input-range (bounds + MILP) instead of using statistics."),
    click.option("--input-range", "input_range", multiple=True, help="Domain: LO,HI for every feature, NAME=LO,HI, bounds.npz (lower/upper), or from-calib."),
    click.option("--milp-time-limit", default=240.0, show_default=True, type=click.FloatRange(min=1), help="Seconds for the MILP stage in total."),
    click.option("--no-milp", is_flag=True, help="Stop after the bound stages (sound, possibly incomplete)."),
    click.option("--check-points", default=10000, show_default=True, type=click.IntRange(1), help="Random points of the box to compare outputs on before saving."),
]


@main.command(epilog="Example: onnx-lincomp optimize --example digits-mlp -o small.onnx\n\n" + EXIT_CODES_HELP)
@click.argument("model", required=False)
@_with(common_calib)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the optimised model.")
@click.option("--passes", default="remove-dead,fold-linear,merge-affine", show_default=True, help="Comma-separated passes, in order.")
@click.option("--dead-rate", type=click.FloatRange(0, 1, max_open=True), help="Remove units active on at most this fraction of samples (default 0: exact).")
@click.option("--linear-rate", type=click.FloatRange(0, 1, min_open=True), help="Fold units positive on at least this fraction of positions (default 1: exact).")
@click.option("--layer-threshold", default="auto", show_default=True, help="Fold a layer when it has more than N (int) / F (fraction) linear units, or 'auto' (when it saves parameters).")
@click.option("--verify-split", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="Fraction of the data held out for verification.")
@click.option("--labels", help="Key of the labels array in the calibration data (accuracy report).")
@click.option("--max-accuracy-drop", type=click.FloatRange(0), help="Gate: fail (exit 4) if held-out accuracy drops by more points; without explicit rates, search the most aggressive rate within it.")
@click.option("--max-abs-error", type=click.FloatRange(0), help="Gate: fail (exit 4) if any held-out output differs by more.")
@click.option("--json", "json_out", help="Write the report as JSON to this file ('-' for stdout).")
@click.option("--save-stats", type=click.Path(dir_okay=False), help="Write the calibration statistics to this .npz.")
@click.option("--stats", "stats_file", type=click.Path(exists=True, dir_okay=False), help="Reuse statistics saved earlier.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--overwrite", is_flag=True, help="Allow writing over the input model.")
@click.option("--channel-multiple", default=1, show_default=True, type=click.IntRange(1),
              help="Keep layer widths at multiples of N (some dead units stay); 8 suits onnxruntime's blocked Conv kernels.")
@_with(exact_options)
def optimize(model, calib, batch_size, max_samples, input_shape, threads, example, output, passes, dead_rate, linear_rate,
             layer_threshold, verify_split, labels, max_accuracy_drop, max_abs_error, json_out, save_stats, stats_file,
             no_latency, overwrite, channel_multiple, exact, input_range, milp_time_limit, no_milp, check_points):
    """Remove dead units, fold linear ones, merge layers; verify in onnxruntime and save.

    With --exact the dead and linear sets are proven over the --input-range box instead of observed.
    """
    if exact:
        return _optimize_exact(model, calib, example, output, passes, layer_threshold, input_range, milp_time_limit,
                               no_milp, check_points, input_shape, json_out, overwrite)
    from .calibration import StatsSet
    from .model_io import save_model_proto
    from .optimize import OptimizeOptions, optimize as run_optimize
    from .passes.fold_linear_relu import parse_layer_threshold

    model, calib = _resolve(model, calib, example)
    if example and labels is None:
        labels = "y"
    if not calib:
        raise click.UsageError("give --calib DATA")
    try:
        threshold = parse_layer_threshold(layer_threshold)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--layer-threshold") from exc
    options = OptimizeOptions(
        passes=tuple(p.strip() for p in passes.split(",") if p.strip()),
        dead_rate=dead_rate or 0.0, linear_rate=linear_rate or 1.0, layer_threshold=threshold,
        verify_split=verify_split, labels=labels, max_accuracy_drop=max_accuracy_drop, max_abs_error=max_abs_error,
        batch_size=batch_size, max_samples=max_samples, threads=threads, latency=not no_latency,
        search=max_accuracy_drop is not None and dead_rate is None and linear_rate is None,
        input_shapes=_shapes(input_shape), channel_multiple=channel_multiple)
    stats = StatsSet.load(stats_file) if stats_file else None
    if save_stats and stats is None:
        from .optimize import calibrate, prepare

        stats = calibrate(prepare(model, calib, options), options, _progress("calibrating"))
        stats.save(save_stats)
    result = run_optimize(model, calib, options, stats=stats, progress=_progress("calibrating"))
    save_model_proto(result.model, output, overwrite_input=None if overwrite else model)
    if json_out:
        _write_json(json_out, dict(result.report.as_dict(), output=output))
        if json_out == "-":
            return
    _print_optimize(result.report, output)


def _certify_options(milp_time_limit: float, no_milp: bool):
    from .exact import CertifyOptions

    if not no_milp:
        click.echo(f"certifying: samples, bounds, witness search, then the MILP stage (at most {milp_time_limit:g} s; -v shows progress)",
                   err=True)
    return CertifyOptions(milp=not no_milp, time_limit=milp_time_limit, solve_limit=min(60.0, milp_time_limit))


def _optimize_exact(model, calib, example, output, passes, layer_threshold, input_range, milp_time_limit, no_milp,
                    check_points, input_shape, json_out, overwrite):
    from .exact.compress import compress_exact
    from .model_io import load_model, save_model_proto
    from .analysis.model_report import model_report
    from .passes.fold_linear_relu import parse_layer_threshold

    model, calib = _resolve(model, calib, example)
    result = compress_exact(load_model(model), tuple(input_range), calib=calib,
                            options=_certify_options(milp_time_limit, no_milp),
                            passes=tuple(p.strip() for p in passes.split(",") if p.strip()),
                            layer_threshold=parse_layer_threshold(layer_threshold), check_points=check_points,
                            input_shapes=dict(_shapes(input_shape)))
    save_model_proto(result.model, output, overwrite_input=None if overwrite else model)
    before, after = model_report(result.original), model_report(result.model)
    payload = dict(result.as_dict(), model=model, output=output, before=before.as_dict(), after=after.as_dict(),
                   passes=[p.as_dict() for p in result.passes])
    if json_out:
        _write_json(json_out, payload)
        if json_out == "-":
            return
    click.echo(f"{model} -> {output}")
    _print_certificate(result.certificate)
    w = result.witness_check
    click.echo(f"witnesses: {w.confirmed}/{w.channels_claimed_unstable} claimed-unstable channels confirmed in onnxruntime")
    for p in result.passes:
        click.echo(f"{p.result.name:<14} removed {p.result.neurons_removed:>5}  folded {p.result.neurons_folded:>5}  "
                   f"params {p.params_before:,} -> {p.params_after:,}")
    click.echo(f"parameters {before.params:,} -> {after.params:,}; MACs/sample {before.macs:,} -> {after.macs:,}")
    b = result.box_check
    click.echo(f"check on {b.samples} random points of the box: max abs error {b.max_abs:.3g} (relative {b.rel_max:.3g})")


def _print_certificate(cert) -> None:
    click.echo(f"domain: {cert.domain.description}")
    click.echo(f"{'relu':<20} {'units':>6} {'sampled':>8} {'search':>7} {'interval a/i':>13} {'relax a/i':>10} {'milp a/i':>9} "
               f"{'milp unst':>9} {'open':>5} {'stable a/i ch':>14}")
    for l in cert.layers:
        click.echo(f"{l.relu[:20]:<20} {l.units:>6} {l.sampled_unstable:>8} {l.search_unstable:>7} "
                   f"{l.interval_active:>6}/{l.interval_inactive:<6} {l.relaxed_active:>4}/{l.relaxed_inactive:<5} "
                   f"{l.milp_active:>4}/{l.milp_inactive:<4} {l.milp_unstable:>9} {l.unproven:>5} "
                   f"{int(l.stably_active.sum()):>6}/{int(l.stably_inactive.sum()):<7}")
    for r in cert.not_certified:
        click.echo(f"{r[:20]:<20} not certified: {cert.stop_reason}")
    t = cert.seconds
    click.echo(f"verdict: {'COMPLETE (every unit decided)' if cert.complete else 'INCOMPLETE (open units are kept)'}; "
               f"{cert.milp_solves} MILP solves; seconds: bounds {t['bounds']:.2f}, search {t['search']:.2f}, "
               f"milp {t['milp']:.2f}, total {t['total']:.2f}")


def _lat(l) -> str:
    return "-" if l is None else f"{l.median_ms:.3f} ms"


def _print_optimize(r, output: str) -> None:
    click.echo(f"{r.model} -> {output}")
    click.echo(f"calibration: {r.calibration}, {r.calibration_samples} samples"
               f"{' (RANDOM data)' if r.random_calibration else ''}; held-out: {r.heldout_samples}")
    c = r.canonicalize
    click.echo(f"canonicalised: {c.batchnorms_folded} BatchNorm folded, {c.constants_lifted} Constant nodes lifted"
               + "".join(f"; skipped {n}x: {why}" for why, n in c.skipped.items()))
    click.echo(f"{'pass':<14} {'removed':>8} {'folded':>7} {'params before':>14} {'after':>12} {'time':>8}")
    for p in r.passes:
        res = p.result
        click.echo(f"{res.name:<14} {res.neurons_removed:>8} {res.neurons_folded:>7} {p.params_before:>14,} "
                   f"{p.params_after:>12,} {p.seconds * 1000:>6.1f}ms")
        for why, n in res.skipped.items():
            click.echo(f"{'':<14} skipped {n}x: {why}")
        for note in res.notes:
            click.echo(f"{'':<14} {note}")
    b, a = r.before, r.after
    click.echo(f"{'':<14} {'before':>14} {'after':>14} {'ratio':>7}")
    for label, x, y in (("parameters", b.params, a.params), ("MACs/sample", b.macs, a.macs), ("file bytes", b.size_bytes, a.size_bytes)):
        click.echo(f"{label:<14} {x:>14,} {y:>14,} " + (f"{y / x:>7.3f}" if x else f"{'-':>7}"))
    for label, x, y in (("latency b=1", b.latency_b1, a.latency_b1), ("latency batch", b.latency_batch, a.latency_batch)):
        if x and y:
            click.echo(f"{label:<14} {_lat(x):>14} {_lat(y):>14} {y.median_ms / x.median_ms:>7.3f}")
    for label, v in (("calibration", r.on_calibration), ("held-out", r.on_heldout)):
        if v is None:
            continue
        acc = "" if v.accuracy_before is None else f", accuracy {100 * v.accuracy_before:.2f}% -> {100 * v.accuracy_after:.2f}%"
        agree = [o.top1_agreement for o in v.outputs if o.top1_agreement is not None]
        click.echo(f"{label}: max abs error {v.max_abs:.3g} (relative {v.rel_max:.3g}) on {v.samples} samples"
                   + (f", top-1 agreement {100 * min(agree):.2f}%" if agree else "") + acc)
    click.echo("exact on the calibration data (rates 0 and 1)" if r.exact_on_calibration
               else f"approximate: dead rate {r.dead_rate}, linear rate {r.linear_rate}")
    for m in r.messages:
        click.echo(m)
    for name, why in r.not_analysed:
        click.echo(f"not analysed: {name} ({why})")


@main.command(epilog="Example: onnx-lincomp certify model.onnx --input-range 0,1 --json -\n\n" + EXIT_CODES_HELP)
@click.argument("model")
@click.option("--input-range", "input_range", multiple=True, required=True, help="Domain: LO,HI, NAME=LO,HI, bounds.npz, or from-calib.")
@click.option("--calib", help="Calibration data: its points disprove stability cheaply (and give from-calib ranges).")
@click.option("--input-shape", multiple=True, help="NAME=D1,D2,... for dynamic dimensions.")
@click.option("--milp-time-limit", default=240.0, show_default=True, type=click.FloatRange(min=1))
@click.option("--no-milp", is_flag=True, help="Stop after the bound stages.")
@click.option("--json", "json_out", help="Write the certificate as JSON ('-' for stdout).")
def certify(model, input_range, calib, input_shape, milp_time_limit, no_milp, json_out):
    """Prove which ReLU units are stable on an input box; report only (writes no model)."""
    from .calibration import input_specs, open_calibration
    from .canonicalize import canonicalize
    from .exact import certify as run_certify, parse_domain
    from .exact.witness_check import check_witnesses
    from .model_io import load_model

    loaded = load_model(model)
    canonicalize(loaded.graph, ctx=loaded.ctx)
    shapes = dict(_shapes(input_shape))
    specs = input_specs(loaded.graph)
    source = open_calibration(calib, specs, shape_overrides=shapes) if calib else None
    domain = parse_domain(input_range, specs, calib=source, overrides=shapes)
    cert = run_certify(loaded.graph, loaded.ctx, domain, source, _certify_options(milp_time_limit, no_milp))
    witness = check_witnesses(loaded.graph, loaded.ctx, cert)
    if json_out:
        _write_json(json_out, dict(cert.as_dict(), model=model, witness_check=witness.as_dict()))
        if json_out == "-":
            return
    click.echo(model)
    _print_certificate(cert)
    click.echo(f"witnesses: {witness.confirmed}/{witness.channels_claimed_unstable} claimed-unstable channels confirmed in onnxruntime")


@main.command(epilog="Example: onnx-lincomp bench a.onnx b.onnx --batch-size 8\n\n" + EXIT_CODES_HELP)
@click.argument("models", nargs=-1, required=True)
@click.option("--runs", default=50, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(0))
@click.option("--threads", default=0, type=click.IntRange(0), help="onnxruntime intra-op threads (0: default).")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1))
@click.option("--input-shape", multiple=True, help="NAME=D1,D2,... for dynamic dimensions.")
@click.option("--json", "json_out", help="Write results as JSON to this file ('-' for stdout).")
def bench(models, runs, warmup, threads, batch_size, input_shape, json_out):
    """onnxruntime latency (median, p90) and throughput of one or more models, side by side."""
    from .calibration import input_specs, open_calibration
    from .calibration.collector import iterate_feeds
    from .latency import LatencyOptions, measure_latency
    from .model_io import load_model, to_model_proto

    rows = []
    for path in models:
        loaded = load_model(path)
        source = open_calibration(f"random:{batch_size}", input_specs(loaded.graph), shape_overrides=dict(_shapes(input_shape)))
        feeds = next(iter(iterate_feeds(loaded.graph, source, batch_size)))[0]
        lat = measure_latency(to_model_proto(loaded.graph, loaded.ctx, infer_shapes=False), feeds,
                              LatencyOptions(runs=runs, warmup=warmup, threads=threads, batch_size=batch_size))
        rows.append({"model": path, **lat.as_dict()})
    if json_out:
        _write_json(json_out, {"results": rows})
        if json_out == "-":
            return
    base = rows[0]["median_ms"]
    click.echo(f"{'model':<48} {'median ms':>10} {'p90 ms':>9} {'samples/s':>10} {'vs first':>8}")
    for r in rows:
        click.echo(f"{r['model'][-48:]:<48} {r['median_ms']:>10.3f} {r['p90_ms']:>9.3f} {r['throughput_per_s']:>10.1f} {r['median_ms'] / base:>8.3f}")


@main.command(epilog="Example: onnx-lincomp report model.onnx --json -\n\n" + EXIT_CODES_HELP)
@click.argument("model")
@click.option("--input-shape", multiple=True, help="NAME=D1,D2,... for dynamic dimensions.")
@click.option("--per-node", is_flag=True, help="List MACs and parameters of every node.")
@click.option("--json", "json_out", help="Write the report as JSON to this file ('-' for stdout).")
def report(model, input_shape, per_node, json_out):
    """Parameters, MACs per sample, file size and op histogram of a model."""
    from .model_io import read_model_proto, size_on_disk
    from .analysis.model_report import model_report

    proto = read_model_proto(model)
    rep = model_report(proto, dict(_shapes(input_shape)), size_bytes=size_on_disk(model))
    if json_out:
        _write_json(json_out, rep.as_dict(per_node=per_node))
        if json_out == "-":
            return
    click.echo(f"{model}\nparameters {rep.params:,}\nMACs/sample {rep.macs:,}"
               + (f" ({rep.nodes_without_shapes} nodes without static shapes not counted)" if rep.nodes_without_shapes else "")
               + f"\nfile bytes {rep.size_bytes:,}\nops: " + ", ".join(f"{k} {v}" for k, v in rep.op_histogram.items()))
    if per_node:
        for n in rep.nodes:
            click.echo(f"  {n.name[:40]:<40} {n.op:<18} {_fmt_int(n.macs):>14} {n.params:>10,}")


@main.command(epilog="Example: onnx-lincomp sweep --example digits-mlp --csv sweep.csv --plot sweep.png\n\n" + EXIT_CODES_HELP)
@click.argument("model", required=False)
@_with(common_calib)
@click.option("--labels", help="Key of the labels array in the calibration data.")
@click.option("--verify-split", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--layer-threshold", default="auto", show_default=True)
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write the table as CSV.")
@click.option("--json", "json_out", help="Write the table as JSON ('-' for stdout).")
@click.option("--plot", type=click.Path(dir_okay=False), help="PNG of size and accuracy against threshold (extra 'plot').")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement per threshold.")
def sweep(model, calib, batch_size, max_samples, input_shape, threads, example, labels, verify_split, layer_threshold,
          csv_out, json_out, plot, no_latency):
    """Compress at the 20 linear-rate thresholds 0.05..1.00 from one calibration pass and compare."""
    from .optimize import OptimizeOptions, sweep as run_sweep
    from .passes.fold_linear_relu import parse_layer_threshold

    model, calib = _resolve(model, calib, example)
    if example and labels is None:
        labels = "y"
    if not calib:
        raise click.UsageError("give --calib DATA")
    options = OptimizeOptions(labels=labels, verify_split=verify_split, layer_threshold=parse_layer_threshold(layer_threshold),
                              batch_size=batch_size, max_samples=max_samples, threads=threads, latency=not no_latency,
                              input_shapes=_shapes(input_shape))
    rows = run_sweep(model, calib, options, progress=_progress("calibrating"))
    if csv_out:
        with open(csv_out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if plot:
        _plot_sweep(rows, plot, model)
    if json_out:
        _write_json(json_out, {"model": model, "rows": rows})
        if json_out == "-":
            return
    click.echo(f"{'threshold':>9} {'params':>10} {'layer':>10} {'skip':>8} {'MACs':>10} {'lat ms':>8} {'accuracy':>9}")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}"
        click.echo(f"{r['threshold']:>9.2f} {r['params']:>10,} {r['layer_params']:>10,} {r['skip_params']:>8,} {r['macs']:>10,} {lat:>8} {acc:>9}")


def _plot_sweep(rows, path, model) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LincompError("--plot needs matplotlib: pip install 'onnx-lincomp[plot]'") from exc
    t = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t, [r["layer_params"] for r in rows], "o-", label="layer params")
    ax.plot(t, [r["skip_params"] for r in rows], "s-", label="skip params")
    ax.plot(t, [r["params"] for r in rows], "k--", label="total params")
    ax.set_xlabel("linear-rate threshold")
    ax.set_ylabel("parameters")
    if any(r["accuracy"] is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(t, [100 * (r["accuracy"] or 0) for r in rows], "r^-", label="accuracy")
        ax2.set_ylabel("held-out accuracy %", color="r")
    ax.legend(loc="center left")
    ax.set_title(Path(model).name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
