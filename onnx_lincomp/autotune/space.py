"""The search space: knobs (one per family of lossy passes), each an ordered list of choices from mildest to
most aggressive, and settings (one choice index per knob, or none) that become recipes.

A setting's recipe is the exact passes first (remove-dead, fold-linear, merge-affine at exact rates), then
the structural lossy passes in a fixed order (pruning before low-rank), then at most one quantizer (they
must run last). Candidates carry recipes, never graphs, so any worker can rebuild one from the model file.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import OptionError
from ..passes import DEFAULT_PASSES, PASSES
from ..recipe import CalibrationSettings, PassSpec, Recipe

Objective = Literal["latency", "size", "macs"]
OBJECTIVES = ("latency", "size", "macs")


@dataclass(frozen=True)
class Choice:
    """One pass with its options (a level of a knob)."""

    pass_name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.pass_name}({opts})" if opts else self.pass_name


@dataclass(frozen=True)
class Knob:
    name: str
    choices: tuple[Choice, ...]  # mildest first
    objectives: frozenset[str]


Setting = tuple[int | None, ...]  # per knob: index of its choice, or None (knob off)


def _levels(pass_name: str, option: str, values) -> tuple[Choice, ...]:
    return tuple(Choice(pass_name, {option: v}) for v in values)


def default_knobs(objective: Objective, available: Mapping[str, type] = PASSES) -> tuple[Knob, ...]:
    """The knobs that can improve ``objective``, restricted to the passes this installation has."""
    if objective not in OBJECTIVES:
        raise OptionError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    knobs = [
        Knob("prune", _levels("prune-channels", "target_macs", (0.85, 0.7, 0.55, 0.45, 0.35, 0.25, 0.18, 0.12)),
             frozenset(OBJECTIVES)),
        Knob("low-rank", _levels("low-rank", "keep_params", (0.8, 0.6, 0.45, 0.3)), frozenset(OBJECTIVES)),
        Knob("quantize", (Choice("quantize-int8"),), frozenset({"latency"})),
        Knob("quantize", _levels("share-weights", "bits", (8, 6, 5, 4, 3)), frozenset({"size"})),
    ]
    out = []
    for k in knobs:
        if objective in k.objectives and all(c.pass_name in available for c in k.choices):
            out.append(k)
    return tuple(out)


def setting_recipe(knobs: tuple[Knob, ...], setting: Setting, calibration: CalibrationSettings) -> Recipe:
    """The recipe of ``setting``: exact passes, then each active knob's choice (quantizers last)."""
    specs = [PassSpec.of(n) for n in DEFAULT_PASSES]
    chosen = [k.choices[i] for k, i in zip(knobs, setting, strict=True) if i is not None]
    chosen.sort(key=lambda c: PASSES[c.pass_name].runs_last)
    specs += [PassSpec.of(c.pass_name, dict(c.options)) for c in chosen]
    return Recipe(tuple(specs), calibration)


def describe(knobs: tuple[Knob, ...], setting: Setting) -> str:
    parts = [k.choices[i].label() for k, i in zip(knobs, setting, strict=True) if i is not None]
    return " + ".join(parts) or "exact passes only"


def neighbours(knobs: tuple[Knob, ...], setting: Setting) -> list[Setting]:
    """Settings one step more aggressive on one knob."""
    out = []
    for j, (k, i) in enumerate(zip(knobs, setting, strict=True)):
        nxt = 0 if i is None else i + 1
        if nxt < len(k.choices):
            out.append(setting[:j] + (nxt,) + setting[j + 1:])
    return out
