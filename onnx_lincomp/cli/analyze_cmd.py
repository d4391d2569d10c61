"""``analyze``: calibrate (or reuse statistics) and show per-layer statistics and the passes' plans."""
from __future__ import annotations

import click

from ..errors import OptionError
from .app import EXIT_CODES_HELP, checked_shapes, common_calib, main, progress, resolve, stage_json, with_options
from .render import print_analysis


@main.command(epilog="Example: onnx-lincomp analyze --example digits-mlp\n\n" + EXIT_CODES_HELP)
@click.argument("model", required=False)
@with_options(common_calib)
@click.option("--save-stats", metavar="FILE", help="Write the statistics to this .npz.")
@click.option("--stats", "stats_file", type=click.Path(exists=True, dir_okay=False),
              help="Reuse statistics saved earlier.")
@click.option("--json", "json_out", help="Write the analysis as JSON to this file ('-' for stdout).")
@click.option("--plot", metavar="FILE",
              help="Draw activation-rate distributions to this PNG (extra 'plot').")
def analyze(model, calib, batch_size, max_samples, input_shape, threads, example, save_stats, stats_file, json_out,
            plot):
    """Report dead and always-active ReLU units per layer and what removing/folding them could save."""
    from ..analyze import analyze as run_analysis
    from ..calibration import CollectOptions, StatsSet, collect_relu_stats, input_specs, open_calibration
    from ..canonicalize import canonicalize
    from ..model_io import load_model
    from ..outputs import OutputPlan
    from .plots import plot_rates, pyplot

    model, calib = resolve(model, calib, example)
    if not calib and not stats_file:
        raise OptionError("give --calib DATA (or --stats FILE)")
    plan = OutputPlan({"MODEL": model, "--calib": calib, "--stats": stats_file})
    plan.add("--save-stats", save_stats)
    plan.add("--plot", plot, requires=pyplot)  # a missing optional dependency fails before any work
    plan.add("--json", json_out)
    with plan.check() as outputs:
        loaded = load_model(model)
        canonicalize(loaded.graph, ctx=loaded.ctx)
        if stats_file:
            stats = StatsSet.load(stats_file)
        else:
            overrides = checked_shapes(input_shape, input_specs(loaded.graph))
            source = open_calibration(calib, input_specs(loaded.graph), max_samples=max_samples,
                                      shape_overrides=overrides)
            stats = collect_relu_stats(loaded.graph, loaded.ctx, source,
                                       CollectOptions(batch_size=batch_size, threads=threads),
                                       progress=progress("calibrating"))
        result = run_analysis(loaded.graph, loaded.ctx, stats)
        if save_stats:
            with outputs.writing("--save-stats") as path:
                stats.save(path)
        if plot:
            with outputs.writing("--plot") as path:
                plot_rates(stats, str(path))
        stdout_json = stage_json(outputs, json_out, dict(result.as_dict(), model=model))
        outputs.commit()
    if stdout_json is not None:
        click.echo(stdout_json)
        return
    print_analysis(model, result)
