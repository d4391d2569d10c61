"""The click group, shared options, and the one place where errors become messages and exit codes."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import LincompError

EXIT_CODES_HELP = "Exit codes: 0 ok, 1 runtime error, 2 usage error, 3 invalid model/data, 4 verification gate failed."


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


def progress(label: str):
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


def _finite(obj):
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan" (json would write Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(target: str, payload: dict) -> None:
    text = json.dumps(_finite(json.loads(json.dumps(payload, default=_json_default))), indent=2, allow_nan=False)
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


def resolve(model: str | None, calib: str | None, example: str | None) -> tuple[str, str | None]:
    if example:
        from ..examples import example_paths

        m, c = example_paths(example)
        return str(m), calib or str(c)
    if model is None:
        raise click.UsageError("give a MODEL path or --example NAME")
    return model, calib


def shapes(items) -> tuple:
    from ..calibration.data_source import parse_input_shapes

    return tuple(parse_input_shapes(items).items())


def with_options(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


common_calib = [
    click.option("--calib", "calib", help="Calibration data: .npz/.npy, a folder of shards, or random[:N]."),
    click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1),
                 help="Samples per onnxruntime run."),
    click.option("--max-samples", type=click.IntRange(1), help="Use at most this many samples."),
    click.option("--input-shape", "input_shape", multiple=True,
                 help="NAME=D1,D2,... for dynamic dimensions (random data, MACs)."),
    click.option("--threads", default=0, type=click.IntRange(0), help="onnxruntime intra-op threads (0: default)."),
    click.option("--example", type=click.Choice(["digits-mlp", "digits-cnn"]),
                 help="Use a bundled example model and data."),
]
