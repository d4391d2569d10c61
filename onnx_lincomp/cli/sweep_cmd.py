"""``sweep``: the 20 linear-rate thresholds from one calibration pass."""
from __future__ import annotations

import click

from ..errors import OptionError
from .app import EXIT_CODES_HELP, common_calib, main, progress, resolve, shapes, stage_json, with_options, write_csv
from .render import print_sweep


@main.command(epilog="Example: onnx-lincomp sweep --example digits-mlp --csv sweep.csv --plot sweep.png\n\n"
              + EXIT_CODES_HELP)
@click.argument("model", required=False)
@with_options(common_calib)
@click.option("--labels", help="Key of the labels array in the calibration data.")
@click.option("--verify-split", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--layer-threshold", default="auto", show_default=True,
              help="fold-linear's layer threshold (N, F or 'auto').")
@click.option("--csv", "csv_out", metavar="FILE", help="Write the table as CSV.")
@click.option("--json", "json_out", help="Write the table as JSON ('-' for stdout).")
@click.option("--plot", metavar="FILE",
              help="PNG of size and accuracy against threshold (extra 'plot').")
@click.option("--no-latency", is_flag=True, help="Skip latency measurement per threshold.")
def sweep(model, calib, batch_size, max_samples, input_shape, threads, example, labels, verify_split, layer_threshold,
          csv_out, json_out, plot, no_latency):
    """Compress at the 20 linear-rate thresholds 0.05..1.00 from one calibration pass and compare."""
    from ..optimize import OptimizeOptions
    from ..optimize import sweep as run_sweep
    from ..outputs import OutputPlan
    from ..recipe import CalibrationSettings, recipe_from_flags
    from .plots import plot_sweep, pyplot

    model, calib = resolve(model, calib, example)
    if example and labels is None:
        labels = "y"
    if not calib:
        raise OptionError("give --calib DATA")
    recipe = recipe_from_flags(("remove-dead", "fold-linear", "merge-affine"), {"--layer-threshold": layer_threshold},
                               CalibrationSettings(verify_split, max_samples, shapes(input_shape)))
    options = OptimizeOptions(recipe, labels=labels, batch_size=batch_size, threads=threads, latency=not no_latency)
    plan = OutputPlan({"MODEL": model, "--calib": calib})
    plan.add("--csv", csv_out)
    plan.add("--plot", plot, requires=pyplot)  # a missing optional dependency fails before any work
    plan.add("--json", json_out)
    with plan.check() as outputs:
        rows = run_sweep(model, calib, options, progress=progress("calibrating"))
        if csv_out:
            with outputs.writing("--csv") as path:
                write_csv(rows, path)
        if plot:
            with outputs.writing("--plot") as path:
                plot_sweep(rows, str(path), model)
        stdout_json = stage_json(outputs, json_out, {"model": model, "rows": rows})
        outputs.commit()
    if stdout_json is not None:
        click.echo(stdout_json)
        return
    print_sweep(rows)
