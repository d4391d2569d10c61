"""``sensitivity``: prune one layer at a time at each level, score it, and optionally allocate per-layer levels."""
from __future__ import annotations

import click

from ..errors import OptionError
from .app import EXIT_CODES_HELP, common_calib, main, progress, resolve, shapes, stage_json, with_options, write_csv

EXAMPLE = ("Examples:\n\n  onnx-lincomp sensitivity --example digits-cnn --levels 0.2,0.5,0.8 --csv s.csv "
           "--plot s.png\n\n"
           "  onnx-lincomp sensitivity --example digits-cnn --target-macs 0.6 --max-accuracy-drop 5 -o small.onnx "
           "--json report.json\n\n  onnx-lincomp optimize --example digits-cnn --recipe report.json -o again.onnx\n\n")


def _allocation(target_macs: float | None, target_params: float | None, target_latency: float | None,
                max_accuracy_drop: float | None, output: str | None):
    """The allocation the flags ask for (None: scan only); flag combinations that mean nothing are usage errors."""
    from ..sensitivity import AllocationOptions, Target

    flags: list[tuple[Target, float | None]] = [("macs", target_macs), ("params", target_params),
                                                ("latency", target_latency)]
    given = [(name, v) for name, v in flags if v is not None]
    if len(given) > 1:
        raise OptionError("give one of --target-macs, --target-params, --target-latency")
    if not given:
        if output is not None or max_accuracy_drop is not None:
            flag = "-o" if output is not None else "--max-accuracy-drop"
            raise OptionError(f"{flag} applies to an allocation: add --target-macs, --target-params or "
                              "--target-latency")
        return None
    target, keep = given[0]
    if output is None:
        raise OptionError(f"--target-{target} needs -o FILE (where to write the allocated model)")
    return AllocationOptions(target, keep, max_accuracy_drop)


@main.command(epilog=EXAMPLE + EXIT_CODES_HELP)
@click.argument("model", required=False)
@with_options(common_calib)
@click.option("--labels", help="Key of the labels array in the calibration data (accuracy per candidate).")
@click.option("--verify-split", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of the data held out to score candidates on.")
@click.option("--method", default="channels", show_default=True,
              help="channels: prune-channels, one channel group at a time; magnitude: prune-magnitude, one linear "
                   "layer at a time.")
@click.option("--levels", default=",".join(f"{v:g}" for v in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
              show_default=True, help="Comma-separated pruning levels in [0, 1).")
@click.option("--latency", is_flag=True, help="Also time each candidate (batch-1 median ms; the slow part).")
@click.option("--channel-multiple", type=click.IntRange(0), default=None,
              help="channels: keep the widths of groups at least this wide at multiples of this (narrower groups "
                   "are pruned to any width; default: this CPU's NCHWc block, 16 with AVX-512, else 8; 1: off).")
@click.option("--jobs", default=1, show_default=True, type=int, help="Score candidates in this many processes.")
@click.option("--csv", "csv_out", metavar="FILE", help="Write the rows as CSV.")
@click.option("--json", "json_out", metavar="FILE", help="Write the rows (and the allocation with its recipe) as JSON "
                                                         "('-' for stdout).")
@click.option("--plot", metavar="FILE", help="PNG with one line per layer (extra 'plot').")
@click.option("--target-macs", type=float, metavar="F", help="Allocate levels that keep this fraction of the MACs.")
@click.option("--target-params", type=float, metavar="F", help="Allocate levels that keep this fraction of the "
                                                               "parameters.")
@click.option("--target-latency", type=float, metavar="F",
              help="Allocate levels that keep this fraction of the batch-1 latency (scans latency).")
@click.option("--max-accuracy-drop", type=float, metavar="P",
              help="Allocation gate: the paired upper bound of the held-out accuracy drop (points) must be within P "
                   "(without --labels: the drop of agreement with the original's top-1); else back off, and exit 4 "
                   "when nothing fits.")
@click.option("-o", "--output", metavar="FILE", help="Where to write the allocated model.")
@click.option("--overwrite", is_flag=True, help="Allow writing over the input model.")
def sensitivity(model, calib, batch_size, max_samples, input_shape, threads, example, labels, verify_split, method,
                levels, latency, channel_multiple, jobs, csv_out, json_out, plot, target_macs, target_params,
                target_latency, max_accuracy_drop, output, overwrite):
    """Prune each layer alone at each level and score it on held-out data; with a target, allocate per-layer
    levels (less sensitive layers pruned more), build, verify and save the model with a replayable recipe."""
    from ..model_io import save_model_proto
    from ..outputs import OutputPlan
    from ..recipe import CalibrationSettings
    from ..sensitivity import COLUMNS, ScanInput, ScanOptions, parse_levels
    from ..sensitivity import sensitivity as run_sensitivity
    from .plots import plot_sensitivity, pyplot

    model, calib = resolve(model, calib, example)
    if example and labels is None:
        labels = "y"
    options = ScanOptions(method, parse_levels(levels), latency, jobs, threads, batch_size, channel_multiple)
    allocation = _allocation(target_macs, target_params, target_latency, max_accuracy_drop, output)
    if allocation is not None:
        allocation.check_method(options.spec)
    if not calib:
        raise OptionError("give --calib DATA")
    source = ScanInput(model, calib, CalibrationSettings(verify_split, max_samples, shapes(input_shape)), labels)
    plan = OutputPlan({"MODEL": model, "--calib": calib}, overwrite=overwrite)
    plan.add("-o", output, model=True)
    plan.add("--csv", csv_out)
    plan.add("--plot", plot, requires=pyplot)  # a missing matplotlib fails before any work
    plan.add("--json", json_out)
    with plan.check() as outputs:
        result = run_sensitivity(source, options, allocation, progress("scanning"))
        if result.allocation is not None:
            with outputs.writing("-o") as path:
                save_model_proto(result.allocation.model, path)
        if csv_out:
            with outputs.writing("--csv") as path:
                write_csv(result.scan.rows, path, COLUMNS)
        if plot:
            with outputs.writing("--plot") as path:
                plot_sensitivity(result.scan, str(path))
        stdout_json = stage_json(outputs, json_out, dict(result.as_dict(), output=output))
        outputs.commit()
    for note in result.scan.notes:
        click.echo(f"note: {note}", err=True)
    if stdout_json is not None:
        click.echo(stdout_json)
        return
    print_scan(result.scan)
    if result.allocation is not None:
        print_allocation(result.allocation, output)


def _cell(value, field: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if field in ("accuracy", "agreement") else f"{value:.3g}"


def print_scan(scan) -> None:
    field, heading = scan.figure
    levels = sorted({r.level for r in scan.rows})
    width = max([len(n) for n in scan.layers] + [5])
    heading = heading.removeprefix("held-out ")  # the split is named next
    split = {"heldout": "held-out"}.get(scan.split, scan.split)
    click.echo(f"{scan.method} sensitivity of {len(scan.layers)} layers: {heading} on {scan.samples} {split} "
               f"samples (unpruned: {_cell(getattr(scan.base, field), field)}), {scan.seconds:.1f} s")
    click.echo(f"{'layer':<{width}} {'params':>10} " + " ".join(f"{lv:>7g}" for lv in levels))
    for layer in scan.layers:
        rows = {r.level: r for r in scan.rows if r.layer == layer}
        deepest = rows[levels[-1]]
        saved = scan.base.params - deepest.params
        click.echo(f"{layer:<{width}} {saved:>10,} " + " ".join(f"{_cell(getattr(rows[lv], field), field):>7}"
                                                                for lv in levels))
    click.echo(f"(params: saved at level {levels[-1]:g})")
    for layer in scan.layers:
        whys = {r.unchanged for r in scan.rows if r.layer == layer and r.level > 0}
        if len(whys) == 1 and "" not in whys:
            click.echo(f"{layer}: unchanged at every level ({whys.pop()})")


def print_allocation(a, output: str) -> None:
    levels = ", ".join(f"{k}={v:g}" for k, v in a.levels.items()) or "nothing pruned"
    click.echo(f"allocation for --target-{a.options.target} {a.options.keep:g}: {levels}")
    nonzero = (f" (non-zero {a.before['nonzeros']:,} -> {a.after['nonzeros']:,})"
               if a.after["nonzeros"] is not None and a.after["nonzeros"] != a.after["params"] else "")
    click.echo(f"  kept {a.kept:.3f} of the {a.options.target}; params {a.before['params']:,} -> "
               f"{a.after['params']:,}{nonzero}, MACs {a.before['macs']:,} -> {a.after['macs']:,}")
    v = a.verification
    if v.accuracy_after is not None:
        click.echo(f"  held-out accuracy {100 * v.accuracy_before:.2f}% -> {100 * v.accuracy_after:.2f}%")
    if a.drop is not None:
        click.echo(f"  accuracy drop {a.drop.describe()}")
    click.echo(f"  max abs error {v.max_abs:.3g} on {v.samples} samples; {len(a.rounds)} allocation(s) tried")
    click.echo(f"wrote {output}")
