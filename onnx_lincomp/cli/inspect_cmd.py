"""Commands that inspect without rewriting: ``report``, ``bench``, ``certify``."""
from __future__ import annotations

import click

from .app import EXIT_CODES_HELP, main, shapes, write_json
from .render import print_bench, print_certificate, print_report


@main.command(epilog="Example: onnx-lincomp certify model.onnx --input-range 0,1 --json -\n\n" + EXIT_CODES_HELP)
@click.argument("model")
@click.option("--input-range", "input_range", multiple=True, required=True,
              help="Domain: LO,HI, NAME=LO,HI, bounds.npz, or from-calib.")
@click.option("--calib", help="Calibration data: its points disprove stability cheaply (and give from-calib ranges).")
@click.option("--input-shape", multiple=True, help="NAME=D1,D2,... for dynamic dimensions.")
@click.option("--milp-time-limit", default=240.0, show_default=True, type=click.FloatRange(min=1))
@click.option("--no-milp", is_flag=True, help="Stop after the bound stages.")
@click.option("--json", "json_out", help="Write the certificate as JSON ('-' for stdout).")
def certify(model, input_range, calib, input_shape, milp_time_limit, no_milp, json_out):
    """Prove which ReLU units are stable on an input box; report only (writes no model)."""
    from ..calibration import input_specs, open_calibration
    from ..canonicalize import canonicalize
    from ..exact.compress import certify_for
    from ..model_io import load_model
    from ..recipe import ExactSettings

    loaded = load_model(model)
    canonicalize(loaded.graph, ctx=loaded.ctx)
    overrides = dict(shapes(input_shape))
    source = open_calibration(calib, input_specs(loaded.graph), shape_overrides=overrides) if calib else None
    if not no_milp:
        click.echo(f"certifying: samples, bounds, witness search, then the MILP stage (at most {milp_time_limit:g} s; "
                   "-v shows progress)", err=True)
    outcome = certify_for(loaded, source, ExactSettings(tuple(input_range), milp_time_limit, not no_milp), overrides)
    cert, witness = outcome.certificate, outcome.witness_check
    if json_out:
        write_json(json_out, dict(cert.as_dict(), model=model, witness_check=witness.as_dict()))
        if json_out == "-":
            return
    click.echo(model)
    print_certificate(cert)
    click.echo(f"witnesses: {witness.confirmed}/{witness.channels_claimed_unstable} claimed-unstable channels "
               "confirmed in onnxruntime")


@main.command(epilog="Example: onnx-lincomp bench a.onnx b.onnx --batch-size 8\n\n" + EXIT_CODES_HELP)
@click.argument("models", nargs=-1, required=True)
@click.option("--rounds", default=21, show_default=True, type=click.IntRange(3),
              help="Interleaved rounds (each runs every model once in a block).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="onnxruntime intra-op threads (pinned).")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1))
@click.option("--input-shape", multiple=True, help="NAME=D1,D2,... for dynamic dimensions.")
@click.option("--json", "json_out", help="Write results as JSON to this file ('-' for stdout).")
def bench(models, rounds, threads, batch_size, input_shape, json_out):
    """onnxruntime latency of one or more models in interleaved rounds, each judged against the first
    (median ratio, its interval, and 'no change' when the difference is inside the noise)."""
    from ..calibration import input_specs, open_calibration
    from ..model_io import load_model, to_model_proto
    from ..runtime.feeds import benchmark_feeds
    from ..runtime.latency import CompareOptions, compare_models_latency

    loaded = [load_model(p) for p in models]
    source = open_calibration(f"random:{batch_size}", input_specs(loaded[0].graph),
                              shape_overrides=dict(shapes(input_shape)))
    feeds, used = benchmark_feeds(loaded[0].graph, source, batch_size)
    protos = [to_model_proto(m.graph, m.ctx, infer_shapes=False) for m in loaded]
    comparison = compare_models_latency(protos, feeds, CompareOptions(rounds=rounds, threads=threads, batch_size=used))
    if json_out:
        write_json(json_out, {"batch_size": used, **comparison.as_dict(), "names": list(models)})
        if json_out == "-":
            return
    print_bench(comparison, list(models))


@main.command(epilog="Example: onnx-lincomp report model.onnx --json -\n\n" + EXIT_CODES_HELP)
@click.argument("model")
@click.option("--input-shape", multiple=True, help="NAME=D1,D2,... for dynamic dimensions.")
@click.option("--per-node", is_flag=True, help="List MACs and parameters of every node.")
@click.option("--json", "json_out", help="Write the report as JSON to this file ('-' for stdout).")
def report(model, input_shape, per_node, json_out):
    """Parameters (by dtype), MACs per sample, file size and op histogram of a model."""
    from ..analysis.model_report import model_report
    from ..model_io import read_model_proto, size_on_disk

    proto = read_model_proto(model)
    rep = model_report(proto, dict(shapes(input_shape)), size_bytes=size_on_disk(model))
    if json_out:
        write_json(json_out, rep.as_dict(per_node=per_node))
        if json_out == "-":
            return
    print_report(model, rep, per_node)
