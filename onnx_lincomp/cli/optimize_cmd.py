"""``optimize``: build a recipe from ``--recipe`` or ``--passes`` and the per-pass flags, run it, gate, save."""
from __future__ import annotations

import dataclasses

import click

from ..errors import OptionError
from ..outputs import OutputPlan, Outputs
from ..recipe import CalibrationSettings, ExactSettings, Recipe, load_recipe, pass_flags, recipe_from_flags
from .app import EXIT_CODES_HELP, common_calib, main, progress, resolve, shapes, stage_json, with_options, write_csv
from .render import print_certificate, print_optimize, print_plans, print_search

STATS_ONLY = ("--dead-rate", "--linear-rate", "--max-accuracy-drop", "--labels", "--stats", "--save-stats",
              "--verify-split", "--gate-on")
EXACT_ONLY = ("--input-range", "--milp-time-limit", "--no-milp", "--check-points", "--unit-time-limit", "--milp-method")


def _pass_flag_options():
    """One click option per pass-option flag, generated from the passes' Options (help from the field)."""
    opts = []
    for flag, spec in sorted(pass_flags().items()):
        owners = "/".join(p for p, _ in spec.owners)
        dest = "pass_" + flag.lstrip("-").replace("-", "_")
        decl = f"{flag}/--no-{flag[2:]}" if spec.boolean else flag
        opts.append(click.option(decl, dest, default=None, help=f"[{owners}] {spec.help}"))
    return opts


exact_options = [
    click.option("--exact", is_flag=True,
                 help="Prove stability over --input-range (bounds + MILP) instead of using statistics."),
    click.option("--input-range", "input_range", multiple=True,
                 help="Domain: LO,HI for every feature, NAME=LO,HI, bounds.npz (lower/upper), or from-calib."),
    click.option("--milp-time-limit", type=click.FloatRange(min=1),
                 help="Seconds for the MILP stage in total (default 240)."),
    click.option("--no-milp", is_flag=True, default=None,
                 help="Stop after the bound stages (sound, possibly incomplete)."),
    click.option("--check-points", type=click.IntRange(1),
                 help="Random points of the box to compare outputs on before saving (default 10000)."),
    click.option("--unit-time-limit", type=click.FloatRange(min=0, min_open=True),
                 help="CPU seconds per unit MILP (default 60, at most --milp-time-limit); a unit over it stays open."),
    click.option("--milp-method", type=click.Choice(["units", "network"]),
                 help="Per-unit programs (default) or the older network-wide MILP."),
]


search_options = [
    click.option("--objective", type=click.Choice(["latency", "size", "macs"]),
                 help="Search across passes (pruning, low-rank, quantization) for the fastest / smallest / cheapest "
                      "model within the budget (--max-accuracy-drop, --min-agreement, --max-output-error or "
                      "--max-mean-error).",),
    click.option("--min-agreement", type=click.FloatRange(0, 1, min_open=True),
                 help="Budget / gate: top-1 agreement with the original on the held-out split at least this."),
    click.option("--max-output-error", type=click.FloatRange(0),
                 help="Search budget: largest held-out absolute output error (the --max-abs-error gate)."),
    click.option("--pareto", "pareto_out", metavar="FILE", help="With --objective: every scored candidate as CSV."),
    click.option("--plot", "plot_out", metavar="FILE",
                 help="With --objective: PNG of objective against budget used, the choice marked (extra 'plot')."),
    click.option("--time-budget", metavar="DURATION", help="With --objective: stop at the best verified model after "
                                                           "this long (e.g. 90s, 10m, 1h)."),
    click.option("--jobs", type=click.IntRange(1), default=1, show_default=True,
                 help="With --objective: score candidates in N processes (same results as 1)."),
    click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                 help="With --objective: score candidates locally or on a Ray cluster (extra 'ray')."),
    click.option("--address", help="With --backend ray: the cluster address (default: a local cluster)."),
    click.option("--latency-batch", type=click.IntRange(1), default=1, show_default=True,
                 help="With --objective latency: measure latency at this many samples a run (the batch you serve).",),
    click.option("--search-per-layer", is_flag=True,
                 help="With --objective: also try per-layer pruning levels from a sensitivity scan (slower)."),
]
SEARCH_ONLY = ("--pareto", "--plot", "--time-budget", "--jobs", "--backend", "--address", "--max-output-error",
               "--search-per-layer", "--latency-batch")


def parse_duration(text: str | None) -> float | None:
    """'90', '90s', '10m', '1h' as seconds."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    scale = units.get(t[-1:])
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise OptionError(f"--time-budget: expected a duration such as 90s, 10m or 1h, got '{text}'")
    return value


def _output_change(text: str | None) -> float | None:
    """``--max-output-change``: a positive fraction, 'off', or absent (the default limit)."""
    from ..optimize import DEFAULT_MAX_OUTPUT_CHANGE

    if text is None:
        return DEFAULT_MAX_OUTPUT_CHANGE
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise OptionError(f"--max-output-change: expected a positive number or 'off', got '{text}'")
    return value


def _given(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The flags among ``names`` that the user set on the command line."""
    out = []
    for flag in names:
        param = next((p for p in ctx.command.params if flag in getattr(p, "opts", ())), None)
        if param is not None and ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE:
            out.append(flag)
    return out


def _exact_settings(ctx, exact, input_range, milp_time_limit, no_milp, check_points, unit_time_limit=None,
                    milp_method=None) -> ExactSettings | None:
    if not exact:
        stray = _given(ctx, EXACT_ONLY)
        if stray:
            raise OptionError(f"{stray[0]} applies to exact mode only: add --exact")
        return None
    stray = _given(ctx, STATS_ONLY)
    if stray:
        raise OptionError(f"{stray[0]} applies to statistics only; --exact proves its sets over --input-range")
    return ExactSettings(tuple(input_range), milp_time_limit or 240.0, not no_milp, check_points or 10000,
                         unit_time_limit, milp_method or "units")


def _recipe(ctx, recipe_file, passes, pass_values, calibration, exact) -> Recipe:
    if recipe_file:
        given = _given(ctx, ("--passes",) + tuple(pass_flags()))
        if given:
            raise OptionError(f"--recipe already sets the passes and their options: drop {given[0]}")
        recipe = load_recipe(recipe_file)
        # a calibration flag given beside --recipe replaces that one setting; the recipe keeps the others
        fields = {"--verify-split": "verify_split", "--max-samples": "max_samples", "--input-shape": "input_shapes"}
        changed = {fields[f]: getattr(calibration, fields[f]) for f in _given(ctx, tuple(fields))}
        return Recipe(recipe.passes, dataclasses.replace(recipe.calibration, **changed), exact or recipe.exact)
    names = tuple(p.strip() for p in passes.split(",") if p.strip())
    if not names:
        raise OptionError("--passes is empty (give NAME[,NAME...], e.g. remove-dead,fold-linear,merge-affine)")
    flags = {"--" + k[len("pass_"):].replace("_", "-"): v for k, v in pass_values.items()}
    return recipe_from_flags(names, flags, calibration, exact)


@main.command(epilog="Example: onnx-lincomp optimize --example digits-mlp -o small.onnx\n\n" + EXIT_CODES_HELP)
@click.argument("model", required=False)
@with_options(common_calib)
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Where to write the optimised model.")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False),
              help="Run this recipe (TOML, or a JSON report's 'recipe') instead of --passes.")
@click.option("--passes", default="remove-dead,fold-linear,merge-affine", show_default=True,
              help="Comma-separated passes, in order.")
@with_options(_pass_flag_options())
@click.option("--verify-split", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of the data held out for verification.")
@click.option("--labels", help="Key of the labels array in the calibration data (accuracy report).")
@click.option("--max-accuracy-drop", type=click.FloatRange(0),
              help="Gate: fail (exit 4) unless the paired upper bound of the held-out accuracy drop (points) is within "
                   "this; without explicit rates, search the most aggressive linear rate within it.")
@click.option("--gate-on", type=click.Choice(["heldout", "all"]), default="heldout", show_default=True,
              help="Split the --max-accuracy-drop bound is judged on: the held-out part, or every sample (statistics "
                   "still come from the calibration part only).")
@click.option("--max-abs-error", type=click.FloatRange(0),
              help="Gate: fail (exit 4) if any held-out output differs by more.")
@click.option("--max-mean-error", type=click.FloatRange(0),
              help="Gate (and, with --objective, the search budget): fail (exit 4) if the mean absolute held-out "
                   "output error exceeds this (dense outputs such as detection or segmentation maps, where one "
                   "flipped pixel sets the max).")
@click.option("--max-output-change", metavar="R|off",
              help="Gate: fail (exit 4) if held-out outputs change by more than R of their scale (default 0.01 "
                   "unless --max-abs-error, --max-mean-error, --min-agreement or --max-accuracy-drop is given; 'off' "
                   "disables it).")
@click.option("--min-samples", type=click.IntRange(1), default=32, show_default=True,
              help="Gate: statistics resting on fewer calibration samples fail (exit 4).")
@click.option("--allow-larger", is_flag=True,
              help="Keep an output that is larger or measurably slower than the input (else exit 4).")
@click.option("--check-each-pass", is_flag=True,
              help="Compare with the original on 8 calibration samples after every pass "
                   "(slower; the report lists each).")
@click.option("--explain", is_flag=True, help="Show what each pass would do (plans, skip reasons) and write nothing.")
@click.option("--json", "json_out", help="Write the report as JSON to this file ('-' for stdout).")
@click.option("--save-stats", metavar="FILE", help="Write the calibration statistics to this .npz.")
@click.option("--stats", "stats_file", type=click.Path(exists=True, dir_okay=False),
              help="Reuse statistics saved earlier.")
@click.option("--no-latency", is_flag=True,
              help="Skip the report's latency measurements and fold-linear's skip-path check (skip paths kept "
                   "without a measurement). quantize-int8 still times itself: whether INT8 runs slower decides "
                   "whether it keeps the graph (--keep-slower keeps it regardless).")
@click.option("--overwrite", is_flag=True, help="Allow writing over the input model.")
@with_options(exact_options)
@with_options(search_options)
@click.pass_context
def optimize(ctx, model, calib, batch_size, max_samples, input_shape, threads, example, output, recipe_file, passes,
             verify_split, labels, max_accuracy_drop, gate_on, max_abs_error, max_mean_error, max_output_change,
             min_samples,
             allow_larger, check_each_pass, explain,
             json_out, save_stats, stats_file, no_latency, overwrite, exact, input_range, milp_time_limit, no_milp,
             check_points, unit_time_limit, milp_method, objective, min_agreement, max_output_error, pareto_out,
             plot_out, time_budget, jobs, backend, address, search_per_layer, latency_batch, **pass_values):
    """Remove dead units, fold linear ones, merge layers; verify in onnxruntime and save.

    With --exact the dead and linear sets are proven over the --input-range box instead of observed.
    """
    from ..calibration import StatsSet
    from ..optimize import OptimizeOptions

    model, calib = resolve(model, calib, example)
    if example and labels is None and not exact:
        labels = "y"
    exact_settings = _exact_settings(ctx, exact, input_range, milp_time_limit, no_milp, check_points, unit_time_limit,
                                     milp_method)
    if not calib and exact_settings is None and not stats_file:
        raise OptionError("give --calib DATA")
    calibration = CalibrationSettings(verify_split, max_samples, shapes(input_shape))
    recipe = _recipe(ctx, recipe_file, passes, pass_values, calibration, exact_settings)
    rates_given = any(v is not None for k, v in pass_values.items() if k in ("pass_dead_rate", "pass_linear_rate"))
    options = OptimizeOptions(recipe, labels=labels, max_accuracy_drop=max_accuracy_drop, max_abs_error=max_abs_error,
                              gate_on=gate_on, max_output_change=_output_change(max_output_change),
                              min_samples=min_samples, batch_size=batch_size, threads=threads, latency=not no_latency,
                              search=max_accuracy_drop is not None and not rates_given and not recipe_file,
                              allow_larger=allow_larger, check_each_pass=check_each_pass, min_agreement=min_agreement,
                              max_mean_error=max_mean_error)
    if objective is not None:
        return _search(ctx, model, calib, output, options, objective, max_output_error, pareto_out, plot_out,
                       time_budget, jobs, backend, address, json_out, overwrite, explain or exact or stats_file,
                       search_per_layer, latency_batch)
    stray = _given(ctx, SEARCH_ONLY)
    if stray:
        raise OptionError(f"{stray[0]} applies to the search only: add --objective latency|size|macs")
    if explain:
        return _explain(model, calib, options, StatsSet.load(stats_file) if stats_file else None)
    plan = OutputPlan({"MODEL": model, "--calib": calib, "--stats": stats_file, "--recipe": recipe_file},
                      overwrite=overwrite)
    plan.add("-o", output, model=True)
    plan.add("--save-stats", save_stats)
    plan.add("--json", json_out)
    with plan.check() as outputs:
        report = _run_and_stage(outputs, model, calib, options, stats_file)
        stdout_json = stage_json(outputs, json_out, dict(report.as_dict(), output=output))
        outputs.commit()
    if stdout_json is not None:
        click.echo(stdout_json)
        return
    print_optimize(report, output)


def _run_and_stage(outputs: Outputs, model: str, calib: str | None, options, stats_file: str | None):
    """Calibrate (or load statistics), optimise, and stage the statistics and the model; the report."""
    from ..calibration import StatsSet
    from ..model_io import save_model_proto
    from ..optimize import optimize as run_optimize
    from ..prepared import calibrate, prepare

    stats = StatsSet.load(stats_file) if stats_file else None
    if "--save-stats" in outputs:
        if stats is None:
            stats = calibrate(prepare(model, calib, options.recipe, options.labels), options.batch_size,
                              options.threads, progress("calibrating"), capture=False)
        with outputs.writing("--save-stats") as path:
            stats.save(path)
    result = run_optimize(model, calib, options, stats=stats, progress=progress("calibrating"), step_progress=progress)
    with outputs.writing("-o") as path:
        save_model_proto(result.model, path)
    return result.report


def _explain(model, calib, options, stats) -> None:
    from ..optimize import explain

    plans, cert = explain(model, calib, options, stats=stats, progress=progress("calibrating"))
    if cert is not None:
        print_certificate(cert)
    print_plans(plans)


def _search(ctx, model, calib, output, options, objective, max_output_error, pareto_out, plot_out, time_budget, jobs,
            backend, address, json_out, overwrite, conflicting, per_layer=False, latency_batch=1) -> None:
    """``--objective``: the search across passes; the chosen model is written like any optimize output."""
    from ..autotune import Budget
    from ..autotune.executors import require_ray
    from ..autotune.pareto import pareto_rows
    from ..autotune.run import optimize_within_budget
    from ..autotune.search import SearchOptions
    from ..model_io import save_model_proto
    from .plots import plot_pareto, pyplot

    if conflicting:
        raise OptionError("--objective searches with statistics: drop --explain, --exact and --stats")
    given = _given(ctx, ("--recipe", "--passes") + tuple(pass_flags()))
    if given:
        raise OptionError(f"--objective builds the recipe itself: drop {given[0]}")
    budgets = [(k, v) for k, v in (("accuracy_drop", options.max_accuracy_drop), ("agreement", options.min_agreement),
                                   ("output_error", max_output_error), ("mean_error", options.max_mean_error))
               if v is not None]
    if len(budgets) != 1:
        raise OptionError("--objective needs exactly one budget: --max-accuracy-drop (with --labels), --min-agreement, "
                          "--max-output-error or --max-mean-error")
    if backend == "ray":
        require_ray()
    if latency_batch > 1 and objective != "latency":
        raise OptionError(f"--latency-batch applies to --objective latency, not {objective}")
    search = SearchOptions(objective, Budget(*budgets[0]), jobs, backend, address, parse_duration(time_budget),
                           options.threads, options.batch_size, per_layer=per_layer, latency_batch=latency_batch)
    plan = OutputPlan({"MODEL": model, "--calib": calib}, overwrite=overwrite)
    plan.add("-o", output, model=True)
    plan.add("--json", json_out)
    plan.add("--pareto", pareto_out)
    plan.add("--plot", plot_out, requires=pyplot)
    with plan.check() as outputs:
        result, found = optimize_within_budget(model, calib, options, search, progress=_search_progress())
        with outputs.writing("-o") as path:
            save_model_proto(result.model, path)
        rows = pareto_rows(found, objective)
        if pareto_out:
            with outputs.writing("--pareto") as path:
                write_csv(rows, path)
        if plot_out:
            with outputs.writing("--plot") as path:
                plot_pareto(rows, str(path), model, objective)
        stdout_json = stage_json(outputs, json_out, dict(result.report.as_dict(), output=output))
        outputs.commit()
    if stdout_json is not None:
        click.echo(stdout_json)
        return
    print_optimize(result.report, output)
    print_search(rows)


def _search_progress():
    def show(text: str) -> None:
        click.echo(text, err=True)
    return show
