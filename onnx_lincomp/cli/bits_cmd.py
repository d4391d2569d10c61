"""``bits``: quantize one layer at a time at each bit width (k-means sharing or integer rounding), score it, and
optionally choose per-layer bits."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import OptionError
from .app import EXIT_CODES_HELP, common_calib, main, progress, resolve, shapes, stage_json, with_options, write_csv

EXAMPLE = ("Examples:\n\n  onnx-lincomp bits --example digits-mlp --bits 8,4,3,2 --csv bits.csv --plot bits.png\n\n"
           "  onnx-lincomp bits --example digits-mlp --method int --bits 8,4,2 --csv int.csv\n\n"
           "  onnx-lincomp bits --example digits-mlp --max-accuracy-drop 5 -o shared.onnx --json report.json\n\n"
           "  onnx-lincomp optimize --example digits-mlp --recipe report.json -o again.onnx\n\n")


@main.command(epilog=EXAMPLE + EXIT_CODES_HELP)
@click.argument("model", required=False)
@with_options(common_calib)
@click.option("--labels", help="Key of the labels array in the calibration data (accuracy per candidate).")
@click.option("--verify-split", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of the data held out to score candidates on.")
@click.option("--bits", "bits_text", default="8,6,4,3,2", show_default=True,
              help="Comma-separated index widths (1..8) to scan.")
@click.option("--method", type=click.Choice(["kmeans", "int"]), default="kmeans", show_default=True,
              help="kmeans: share-weights codebooks; int: symmetric per-channel integer rounding (fake-quantized "
                   "weights, float graph; a scan only, without --max-accuracy-drop).")
@click.option("--rounding", type=click.Choice(["auto", "nearest", "gptq"]), default="auto", show_default=True,
              help="share-weights index choice (auto: gptq with calibration data).")
@click.option("--refit-codebook/--no-refit-codebook", default=True, show_default=True,
              help="Least-squares codebook refit on the calibration activations.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="Fold the expected output shift into the bias.")
@click.option("--csv", "csv_out", metavar="FILE", help="Write the rows as CSV.")
@click.option("--json", "json_out", metavar="FILE",
              help="Write the rows (and the choice with its recipe) as JSON ('-' for stdout).")
@click.option("--plot", metavar="FILE", help="PNG of accuracy against bits, one line per layer (extra 'plot').")
@click.option("--max-accuracy-drop", type=click.FloatRange(0), metavar="P",
              help="Choose per-layer bits (smallest file) whose paired upper bound of the held-out accuracy drop "
                   "is within P points; exit 4 when none is.")
@click.option("-o", "--output", metavar="FILE", help="Where to write the model with the chosen bits.")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement of the chosen model.")
@click.option("--overwrite", is_flag=True, help="Allow writing over the input model.")
def bits(model, calib, batch_size, max_samples, input_shape, threads, example, labels, verify_split, bits_text, method,
         rounding, refit_codebook, bias_correction, csv_out, json_out, plot, max_accuracy_drop, output, no_latency,
         overwrite):
    """Share (or, with --method int, round) each layer's weights alone at each bit width and score it on held-out
    data; with
    --max-accuracy-drop, choose per-layer bits, build, verify and save the model with a replayable recipe."""
    from ..bits import COLUMNS, BitsOptions, bits_analysis, parse_bits
    from ..model_io import save_model_proto
    from ..outputs import OutputPlan
    from ..passes.share_weights import ShareWeightsOptions
    from ..recipe import CalibrationSettings
    from .plots import pyplot

    model, calib = resolve(model, calib, example)
    if example and labels is None:
        labels = "y"
    if (output is None) != (max_accuracy_drop is None):
        raise OptionError("-o and --max-accuracy-drop go together: the budget chooses the bits of the model written")
    if not calib:
        raise OptionError("give --calib DATA")
    share = ShareWeightsOptions(rounding=rounding, refit_codebook=refit_codebook, bias_correction=bias_correction)
    options = BitsOptions(parse_bits(bits_text), method, share, max_accuracy_drop, threads, latency=not no_latency)
    calibration = CalibrationSettings(verify_split, max_samples, shapes(input_shape))
    plan = OutputPlan({"MODEL": model, "--calib": calib}, overwrite=overwrite)
    plan.add("-o", output, model=True)
    plan.add("--csv", csv_out)
    plan.add("--plot", plot, requires=pyplot)  # a missing matplotlib fails before any work
    plan.add("--json", json_out)
    with plan.check() as outputs:
        result = bits_analysis(model, calib, calibration, labels, options, progress("scanning"))
        if result.choice is not None:
            with outputs.writing("-o") as path:
                save_model_proto(result.choice.model, path)
        if csv_out:
            with outputs.writing("--csv") as path:
                write_csv(result.scan.rows, path, COLUMNS)
        if plot:
            with outputs.writing("--plot") as path:
                plot_bits(result.scan, str(path))
        stdout_json = stage_json(outputs, json_out, dict(result.as_dict(), output=output))
        outputs.commit()
    if stdout_json is not None:
        click.echo(stdout_json)
        return
    print_scan(result.scan)
    if result.choice is not None:
        print_choice(result.choice, output)


def _figure(scan) -> tuple[str, str, float]:
    """(row field, heading, scale): accuracy with labels, else top-1 agreement, else output error."""
    if scan.accuracy is not None:
        return "accuracy", "held-out accuracy %", 100.0
    if any(r.agreement is not None for r in scan.rows):
        return "agreement", "top-1 agreement with the original %", 100.0
    return "rel_max", "max output change (relative)", 1.0


def plot_bits(scan, path: str) -> None:
    from .plots import pyplot

    plt = pyplot()
    field, heading, scale = _figure(scan)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for info in scan.layers:
        rows = scan.curve(info.name)
        ax.plot([r.bits for r in rows], [scale * (getattr(r, field) or 0.0) for r in rows], "o-", ms=3, lw=1,
                label=info.name)
    if scan.accuracy is not None:
        ax.axhline(100 * scan.accuracy, color="k", lw=0.8, ls="--", label="float")
    ax.set_xlabel(f"bits per weight (one layer {_verb(scan)}, the rest float)")
    ax.set_ylabel(heading)
    ax.invert_xaxis()
    if len(scan.layers) <= 30:
        ax.legend(fontsize=6, loc="best")
    ax.set_title(f"{Path(scan.model).name}: {_what(scan)} sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verb(scan) -> str:
    return "rounded to integers" if scan.method == "int" else "shared"


def _what(scan) -> str:
    return "integer-rounding" if scan.method == "int" else "weight-sharing"


def print_scan(scan) -> None:
    field, heading, scale = _figure(scan)
    widths = sorted({r.bits for r in scan.rows}, reverse=True)
    name_w = max([len(i.name) for i in scan.layers] + [5])
    base = f" (float: {100 * scan.accuracy:.2f})" if scan.accuracy is not None else ""
    click.echo(f"{_what(scan)} bit sensitivity of {len(scan.layers)} layers: {heading} on {scan.samples} held-out "
               f"samples{base}, {scan.seconds:.1f} s")
    click.echo(f"{'layer':<{name_w}} {'weights':>9} " + " ".join(f"{f'{b} bits':>8}" for b in widths))
    for info in scan.layers:
        rows = {r.bits: r for r in scan.rows if r.layer == info.name}
        cells = [rows.get(b) for b in widths]
        click.echo(f"{info.name:<{name_w}} {info.weights:>9,} " + " ".join(
            f"{'-' if c is None or getattr(c, field) is None else f'{scale * getattr(c, field):.2f}':>8}"
            for c in cells))
    for name, why in scan.skipped.items():
        click.echo(f"{name:<{name_w}} not scanned: {why}")


def print_choice(choice, output: str) -> None:
    chosen = ", ".join(f"{k}={v if v else 'float'}" for k, v in choice.bits.items())
    r = choice.report
    click.echo(f"chosen bits: {chosen} ({len(choice.rounds)} combination(s) verified)")
    click.echo(f"  file {r.before.size_bytes:,} -> {r.after.size_bytes:,} bytes "
               f"({r.before.size_bytes / max(r.after.size_bytes, 1):.1f}x smaller)")
    v = r.on_heldout
    if v is not None and v.paired is not None:
        click.echo(f"  held-out accuracy {100 * v.accuracy_before:.2f}% -> {100 * v.accuracy_after:.2f}%, drop "
                   f"{v.paired.describe()}")
    click.echo(f"wrote {output} (replay: optimize --recipe the --json report)")
