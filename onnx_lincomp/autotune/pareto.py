"""The Pareto view of a search: which verified candidates no other beats on both the objective and the
budget used, as rows for ``--pareto out.csv`` and points for ``--plot``."""
from __future__ import annotations

from .search import Scored, SearchResult
from .space import Objective


def pareto_flags(scored: list[Scored], objective: Objective) -> list[bool]:
    """True for every candidate inside the budget that no other inside candidate dominates."""
    inside = [s for s in scored if s.within]
    out = []
    for s in scored:
        if not s.within:
            out.append(False)
            continue
        a, d = s.objective(objective), s.damage
        out.append(not any((o.objective(objective) <= a and o.damage <= d) and
                           (o.objective(objective) < a or o.damage < d) for o in inside))
    return out


def pareto_rows(result: SearchResult, objective: Objective) -> list[dict]:
    """One flat row per scored candidate (recipe left out: it is in the JSON report), with its Pareto flag."""
    flags = pareto_flags(result.scored, objective)
    rows = []
    for s, flag in zip(result.scored, flags, strict=True):
        row = {k: v for k, v in s.row(s is result.chosen).items() if k != "recipe"}
        row["objective"] = s.objective(objective)
        row["budget_used"] = s.damage
        row["pareto"] = flag
        rows.append(row)
    return rows
