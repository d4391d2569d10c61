"""The click group, shared options, and the one place where errors become messages and exit codes."""
from __future__ import annotations

import json
import logging
import math
import sys
import traceback

import click

from .. import __version__
from ..errors import CalibrationDataError, LincompError, OptionError
from ..outputs import Outputs

EXIT_CODES_HELP = "Exit codes: 0 ok, 1 runtime error, 2 usage error, 3 invalid model/data, 4 verification gate failed."
INTERNAL_ERROR_EXIT = 1


def one_line(text: str) -> str:
    """A message on one line: its non-empty lines joined with '; '."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _fail(exc: BaseException, code: int, message: str, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Errors become one line and an exit code: ours carry theirs, click's usage errors stay exit 2, anything
    else is an internal error (exit 1). ``--debug`` prints the traceback first."""

    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except LincompError as exc:
            _fail(exc, exc.exit_code, one_line(str(exc)) or type(exc).__name__, debug)
        except Exception as exc:  # onnx, onnxruntime, numpy, pickle, ...: never a bare traceback
            first = next(iter(str(exc).strip().splitlines()), "")
            detail = f"{type(exc).__name__}: {first.strip()}" if first.strip() else type(exc).__name__
            hint = "" if debug else "; rerun with --debug for the traceback"
            _fail(exc, INTERNAL_ERROR_EXIT, f"internal error ({detail}){hint}", debug)


@click.group(cls=_Group, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="onnx-lincomp")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an error (before its one-line message).")
def main(verbose: int, debug: bool) -> None:
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


def json_text(payload: dict) -> str:
    return json.dumps(_finite(json.loads(json.dumps(payload, default=_json_default))), indent=2, allow_nan=False)


def stage_json(outputs: Outputs, target: str | None, payload: dict) -> str | None:
    """Stage ``--json FILE``; for ``--json -`` the text to print once the files are committed."""
    if not target:
        return None
    text = json_text(payload)
    if target == "-":
        return text
    with outputs.writing("--json") as path:
        path.write_text(text)
    return None


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def resolve(model: str | None, calib: str | None, example: str | None) -> tuple[str, str | None]:
    if example and model is not None:
        raise OptionError(f"give MODEL or --example, not both (got {model} and --example {example})")
    if example:
        from ..examples import example_paths

        m, c = example_paths(example)
        return str(m), calib or str(c)
    if model is None:
        raise OptionError("give a MODEL path or --example NAME")
    return model, calib


def shapes(items) -> tuple:
    from ..calibration.data_source import parse_input_shapes

    return tuple(parse_input_shapes(items).items())


def checked_shapes(items, specs) -> dict[str, tuple[int, ...]]:
    """``--input-shape`` values checked against the model's inputs: known name, same rank, static dimensions kept."""
    from ..calibration.data_source import parse_input_shapes

    overrides = parse_input_shapes(items)
    by_name = {s.name: s for s in specs}
    for name, dims in overrides.items():
        flag = f"--input-shape {name}={','.join(map(str, dims))}"
        spec = by_name.get(name)
        if spec is None:
            raise CalibrationDataError(f"{flag}: the model has no input '{name}' (inputs: "
                                       f"{', '.join(s.name + ' ' + s.describe() for s in specs)})")
        if any(d <= 0 for d in dims):
            raise OptionError(f"{flag}: dimensions must be positive")
        if spec.shape is None:
            continue
        if len(dims) != len(spec.shape):
            raise CalibrationDataError(f"{flag}: input '{name}' has rank {len(spec.shape)} ({spec.describe()}), "
                                       f"got {len(dims)} dimensions")
        for axis, (want, got) in enumerate(zip(spec.shape, dims, strict=True)):
            if isinstance(want, int) and want != got:
                raise CalibrationDataError(f"{flag}: dimension {axis} of input '{name}' is fixed at {want} "
                                           f"({spec.describe()}), got {got}")
    return overrides


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
                 help="Use a bundled example model and its data (a --calib given too replaces the data)."),
]


def write_csv(rows, path, fieldnames=None) -> None:
    """Rows (dicts, or objects with ``as_dict()``) as CSV; columns from ``fieldnames`` or the first row."""
    import csv

    rows = [r if isinstance(r, dict) else r.as_dict() for r in rows]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fieldnames or (rows[0] if rows else ())))
        w.writeheader()
        w.writerows(rows)
