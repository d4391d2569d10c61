"""Commands that inspect without rewriting: ``report``, ``bench``, ``certify``."""
from __future__ import annotations

from contextlib import contextmanager

import click

from ..errors import LincompError
from .app import EXIT_CODES_HELP, checked_shapes, main, stage_json
from .render import print_bench, print_certificate, print_report


@main.command(epilog="Example: onnx-lincomp certify model.onnx --input-range 0,1 --json -\n\n" + EXIT_CODES_HELP)
@click.argument("model")
@click.option("--input-range", "input_range", multiple=True, required=True,
              help="Domain, repeatable: LO,HI or bounds.npz or from-calib for every input, NAME=LO,HI or "
                   "NAME=file.npz for one input (later values override earlier ones).")
@click.option("--calib", help="Calibration data: its points disprove stability cheaply (and give from-calib ranges).")
@click.option("--input-shape", multiple=True, help="NAME=D1,D2,... for dynamic dimensions.")
@click.option("--milp-time-limit", default=240.0, show_default=True, type=click.FloatRange(min=1),
              help="Wall-clock seconds for the whole MILP stage.")
@click.option("--unit-time-limit", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
              help="CPU seconds per unit MILP (a unit that runs out stays open; the stage goes on).")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1),
              help="Processes solving units in parallel (the result does not depend on it).")
@click.option("--milp-method", type=click.Choice(["units", "network"]), default="units", show_default=True,
              help="One small LP and MILP per unit, or one network-wide MILP.")
@click.option("--no-milp", is_flag=True, help="Stop after the bound stages.")
@click.option("--json", "json_out", help="Write the certificate as JSON ('-' for stdout).")
def certify(model, input_range, calib, input_shape, milp_time_limit, unit_time_limit, jobs, milp_method, no_milp,
            json_out):
    """Prove which ReLU units are stable on an input box; report only (writes no model)."""
    from ..calibration import input_specs, open_calibration
    from ..canonicalize import canonicalize
    from ..exact.compress import certify_for
    from ..model_io import load_model
    from ..outputs import OutputPlan
    from ..recipe import ExactSettings

    plan = OutputPlan({"MODEL": model, "--calib": calib, "--input-range": input_range[-1]})
    plan.add("--json", json_out)
    with plan.check() as outputs:
        loaded = load_model(model)
        canonicalize(loaded.graph, ctx=loaded.ctx)
        overrides = checked_shapes(input_shape, input_specs(loaded.graph))
        source = open_calibration(calib, input_specs(loaded.graph), shape_overrides=overrides) if calib else None
        if not no_milp:
            click.echo(f"certifying: samples, bounds, witness search, then the MILP stage (at most "
                       f"{milp_time_limit:g} s; -v shows progress)", err=True)
        settings = ExactSettings(tuple(input_range), milp_time_limit, not no_milp)
        outcome = certify_for(loaded, source, settings, overrides, jobs=jobs, unit_time_limit=unit_time_limit,
                              method=milp_method)
        cert, witness = outcome.certificate, outcome.witness_check
        stdout_json = stage_json(outputs, json_out, dict(cert.as_dict(), model=model, witness_check=witness.as_dict()))
        outputs.commit()
    if stdout_json is not None:
        click.echo(stdout_json)
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
    from ..model_io import load_model
    from ..outputs import OutputPlan
    from ..runtime.feeds import benchmark_feeds
    from ..runtime.latency import CompareOptions, compare_latency

    plan = OutputPlan({("MODEL" if i == 0 else f"MODEL {i + 1}"): m for i, m in enumerate(models)})
    plan.add("--json", json_out)
    with plan.check() as outputs:
        loaded = [load_model(p) for p in models]
        specs = input_specs(loaded[0].graph)
        source = open_calibration(f"random:{batch_size}", specs,
                                  shape_overrides=checked_shapes(input_shape, specs))
        feeds, used = benchmark_feeds(loaded[0].graph, source, batch_size)
        if used != batch_size:
            click.echo(f"note: {models[0]} takes a fixed batch of {used}: timing batch {used}, not --batch-size "
                       f"{batch_size}", err=True)
        with _bench_sessions(models, loaded, feeds, threads) as sessions:
            comparison = compare_latency(sessions, feeds, CompareOptions(rounds=rounds, threads=threads,
                                                                         batch_size=used))
        stdout_json = stage_json(outputs, json_out, {"batch_size": used, "batch_size_requested": batch_size,
                                                     **comparison.as_dict(), "names": list(models)})
        outputs.commit()
    if stdout_json is not None:
        click.echo(stdout_json)
        return
    print_bench(comparison, list(models), used)


@contextmanager
def _bench_sessions(paths, loaded, feeds, threads: int):
    """A pinned session per model, each run once on the feeds: a model that cannot load or run them is named."""
    from ..model_io import to_model_proto
    from ..runtime.latency import SessionScope, pinned_options
    from ..runtime.session import run_session

    with SessionScope(prefix="lincomp-bench-") as scope:
        sessions = []
        for path, m in zip(paths, loaded, strict=True):
            try:
                session = scope.open(to_model_proto(m.graph, m.ctx, infer_shapes=False), pinned_options(threads))
            except LincompError as exc:
                named = type(exc)(f"{path}: {exc}")
                named.exit_code = exc.exit_code
                raise named from exc
            run_session(session, None, feeds, what=path)
            sessions.append(session)
        yield sessions


@main.command(epilog="Example: onnx-lincomp report model.onnx --json -\n\n" + EXIT_CODES_HELP)
@click.argument("model")
@click.option("--input-shape", multiple=True, help="NAME=D1,D2,... for dynamic dimensions.")
@click.option("--per-node", is_flag=True, help="List MACs and parameters of every node.")
@click.option("--json", "json_out", help="Write the report as JSON to this file ('-' for stdout).")
def report(model, input_shape, per_node, json_out):
    """Parameters (by dtype), MACs per sample, file size and op histogram of a model."""
    from ..analysis.model_report import model_report
    from ..model_io import read_model_proto, size_on_disk
    from ..outputs import OutputPlan

    plan = OutputPlan({"MODEL": model})
    plan.add("--json", json_out)
    with plan.check() as outputs:
        proto = read_model_proto(model)
        overrides = checked_shapes(input_shape, _proto_specs(proto))
        rep = model_report(proto, overrides, size_bytes=size_on_disk(model))
        stdout_json = stage_json(outputs, json_out, rep.as_dict(per_node=per_node))
        outputs.commit()
    if stdout_json is not None:
        click.echo(stdout_json)
        return
    print_report(model, rep, per_node)


def _proto_specs(proto):
    """The graph inputs of a ModelProto (initializers excluded) as InputSpecs."""
    from onnx import helper

    from ..calibration.data_source import InputSpec

    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else None
        # a negative dim_value (Paddle's -1) is a dynamic dimension, as in input_specs
        shape = (tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                       for d in t.shape.dim)
                 if t.HasField("shape") else None)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs
