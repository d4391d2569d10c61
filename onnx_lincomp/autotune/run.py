"""``optimize --objective``: search, then run the chosen recipe through the ordinary orchestrator, so the
output is verified, gated and reported like any other run, and its recipe replays it byte for byte."""
from __future__ import annotations

from dataclasses import replace

from ..errors import OptionError
from ..gates import require_budget_support, require_samples
from ..optimize import OptimizeOptions, Result, optimize
from ..prepared import calibrate, prepare
from .budget import Budget
from .search import Progress, SearchOptions, SearchResult, require_result, run_search
from .space import Knob


def gate_options(options: OptimizeOptions, budget: Budget) -> OptimizeOptions:
    """The optimize options whose gates are the search budget."""
    return replace(options, search=False,
                   max_accuracy_drop=budget.value if budget.kind == "accuracy_drop" else options.max_accuracy_drop,
                   max_abs_error=budget.value if budget.kind == "output_error" else options.max_abs_error,
                   min_agreement=budget.value if budget.kind == "agreement" else options.min_agreement,
                   max_mean_error=budget.value if budget.kind == "mean_error" else options.max_mean_error)


def optimize_within_budget(model: str, calib: str, options: OptimizeOptions, search: SearchOptions,
                           progress: Progress | None = None,
                           knobs: tuple[Knob, ...] | None = None) -> tuple[Result, SearchResult]:
    """The best model the search finds within ``search.budget``; raises the gate error when none is."""
    if search.budget.kind == "accuracy_drop" and options.labels is None:
        raise OptionError("--max-accuracy-drop needs --labels KEY (else budget with --min-agreement or "
                          "--max-output-error)")
    prep = prepare(model, calib, options.recipe, options.labels, options.batch_size)
    if search.budget.kind == "accuracy_drop":
        require_budget_support(prep, search.budget.value, None)
    require_samples(prep.n_calib, options.min_samples, "the statistics would")
    stats = calibrate(prep, options.batch_size, options.threads)
    found = run_search(prep, stats, model, calib, options.recipe.calibration, options.labels, search, knobs,
                       progress=progress)
    chosen = require_result(found, search.budget)
    result = optimize(model, calib, replace(gate_options(options, search.budget), recipe=found.recipe), stats=stats)
    note = (f"search ({search.objective}, {search.budget.describe()}): {found.describe_counts()}, "
            f"chose {chosen.label}; stopped: {found.stopped or 'search space exhausted'}")
    report = replace(result.report, search=tuple(found.rows()), messages=result.report.messages + (note,))
    return replace(result, report=report), found
