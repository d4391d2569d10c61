"""``analyze``: calibrate (or reuse statistics) and show per-layer statistics and the passes' plans."""
from __future__ import annotations

import click

from .app import EXIT_CODES_HELP, common_calib, main, progress, resolve, shapes, with_options, write_json
from .render import print_analysis


@main.command(epilog="Example: onnx-lincomp analyze --example digits-mlp\n\n" + EXIT_CODES_HELP)
@click.argument("model", required=False)
@with_options(common_calib)
@click.option("--save-stats", type=click.Path(dir_okay=False), help="Write the statistics to this .npz.")
@click.option("--stats", "stats_file", type=click.Path(exists=True, dir_okay=False),
              help="Reuse statistics saved earlier.")
@click.option("--json", "json_out", help="Write the analysis as JSON to this file ('-' for stdout).")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Draw activation-rate distributions to this PNG (extra 'plot').")
def analyze(model, calib, batch_size, max_samples, input_shape, threads, example, save_stats, stats_file, json_out,
            plot):
    """Report dead and always-active ReLU units per layer and what removing/folding them could save."""
    from ..analyze import analyze as run_analysis
    from ..calibration import CollectOptions, StatsSet, collect_relu_stats, input_specs, open_calibration
    from ..canonicalize import canonicalize
    from ..model_io import load_model
    from .plots import plot_rates, pyplot

    model, calib = resolve(model, calib, example)
    if plot:
        pyplot()  # a missing optional dependency fails before any work
    loaded = load_model(model)
    canonicalize(loaded.graph, ctx=loaded.ctx)
    if stats_file:
        stats = StatsSet.load(stats_file)
    else:
        if not calib:
            raise click.UsageError("give --calib DATA (or --stats FILE)")
        source = open_calibration(calib, input_specs(loaded.graph), max_samples=max_samples,
                                  shape_overrides=dict(shapes(input_shape)))
        stats = collect_relu_stats(loaded.graph, loaded.ctx, source,
                                   CollectOptions(batch_size=batch_size, threads=threads),
                                   progress=progress("calibrating"))
    if save_stats:
        stats.save(save_stats)
    result = run_analysis(loaded.graph, loaded.ctx, stats)
    if plot:
        plot_rates(stats, plot)
    if json_out:
        write_json(json_out, dict(result.as_dict(), model=model))
        if json_out == "-":
            return
    print_analysis(model, result)
