"""The search space: knobs (one per way of setting a lossy pass), each an ordered list of choices from mildest
to most aggressive, and settings (one choice index per knob, or none) that become recipes.

Knobs of one *family* set the same pass (uniform pruning and per-layer pruning are both ``prune-channels``), so at
most one of them is active in a setting. A per-layer knob (``scan``) has no choices until the search builds them
from a sensitivity scan (:mod:`.layer_knobs`): a fine chain of per-layer allocations, one layer move apart, of
which a forward step takes ``stride`` at a time; the choices in between are where the search backs off layer by
layer when a combined model misses the budget.

A setting's recipe is the exact passes first (remove-dead, fold-linear, merge-affine at exact rates; for the
latency objective remove-dead keeps widths at the CPU's NCHWc block, since unaligned widths run slower), then
the structural lossy passes in a fixed order (pruning before low-rank), then at most one quantizer (they
must run last). Candidates carry recipes, never graphs, so any worker can rebuild one from the model file.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..analysis.layer_latency import nchwc_block
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
    note: str = ""  # a short label replacing the options (per-layer choices name their levels)

    def label(self) -> str:
        opts = self.note or ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.pass_name}({opts})" if opts else self.pass_name


ScanKind = Literal["channels"]


@dataclass(frozen=True)
class Knob:
    name: str
    choices: tuple[Choice, ...]  # mildest first
    objectives: frozenset[str]
    family: str = ""  # knobs of one family are never active together (default: the name)
    stride: int = 1  # choices a forward step moves; those in between are back-off points
    scan: ScanKind | None = None  # choices built by the search from a per-layer sensitivity scan

    def __post_init__(self):
        if self.stride < 1:
            raise OptionError(f"knob {self.name}: stride must be >= 1, got {self.stride}")
        if self.scan is not None and self.scan != "channels":
            raise OptionError(f"knob {self.name}: unknown scan {self.scan!r}")

    @property
    def group(self) -> str:
        return self.family or self.name

    @property
    def pass_names(self) -> frozenset[str]:
        return frozenset({"prune-channels"} if self.scan == "channels" else {c.pass_name for c in self.choices})


Setting = tuple[int | None, ...]  # per knob: index of its choice, or None (knob off)


def _levels(pass_name: str, option: str, values) -> tuple[Choice, ...]:
    return tuple(Choice(pass_name, {option: v}) for v in values)


def default_knobs(objective: Objective, available: Mapping[str, type] = PASSES,
                  per_layer: bool = False, latency_batch: int = 1) -> tuple[Knob, ...]:
    """The knobs that can improve ``objective``, restricted to the passes this installation has.

    ``per_layer`` adds per-layer pruning from a sensitivity scan. It is off by default: it shares the
    pruning family with uniform pruning, so the walk uses one or the other, and on the Fashion-MNIST CNN at
    one point its coarse steps ended below uniform pruning alone (benchmarks/search.py). ``latency_batch``:
    the batch the latency objective is measured at, which quantize-int8 also judges its own speed-up at."""
    if objective not in OBJECTIVES:
        raise OptionError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    # latency: widths at the pass's default, this CPU's NCHWc block (16 with AVX-512). Other widths run slower
    # (F-MNIST CNN after the exact passes: target 0.7 at multiples of 8 measured no faster than the original,
    # at the block 1.9x); neighbouring targets that give one model are stepped over (_same_model_step). Size
    # and MACs: multiples of 8, finer targets
    prune_widths = {} if objective == "latency" else {"channel_multiple": 8}
    knobs = [
        Knob("prune", tuple(Choice("prune-channels", {"target_macs": v, **prune_widths})
                            for v in (0.85, 0.7, 0.55, 0.45, 0.35, 0.25, 0.18, 0.12)), frozenset(OBJECTIVES)),
        *((Knob("prune-layers", (), frozenset(OBJECTIVES), family="prune", scan="channels"),) if per_layer else ()),
        Knob("low-rank", _levels("low-rank", "keep_params", (0.8, 0.6, 0.45, 0.3)), frozenset(OBJECTIVES)),
        Knob("quantize", (Choice("quantize-int8", {"latency_batch": latency_batch} if latency_batch > 1 else {}),),
             frozenset({"latency"})),
        Knob("quantize", _levels("share-weights", "bits", (8, 6, 5, 4, 3)), frozenset({"size"})),
    ]
    out = []
    for k in knobs:
        if objective in k.objectives and all(p in available for p in k.pass_names):
            out.append(k)
    return tuple(out)


def exact_specs(objective: Objective | None = None) -> list[PassSpec]:
    """The exact passes every candidate starts with. For the latency objective remove-dead keeps layer widths
    at this CPU's NCHWc block (a few dead units stay): on UltraFace the unaligned widths ran 1.08x slower than
    the original at batch 1, so the search's start was slower than doing nothing."""
    return [PassSpec.of(n, {"channel_multiple": nchwc_block()} if n == "remove-dead" and objective == "latency"
                        else {}) for n in DEFAULT_PASSES]


def setting_recipe(knobs: tuple[Knob, ...], setting: Setting, calibration: CalibrationSettings,
                   objective: Objective | None = None) -> Recipe:
    """The recipe of ``setting``: exact passes, then each active knob's choice (quantizers last)."""
    specs = exact_specs(objective)
    chosen = [k.choices[i] for k, i in zip(knobs, setting, strict=True) if i is not None]
    chosen.sort(key=lambda c: PASSES[c.pass_name].runs_last)
    specs += [PassSpec.of(c.pass_name, dict(c.options)) for c in chosen]
    return Recipe(tuple(specs), calibration)


def describe(knobs: tuple[Knob, ...], setting: Setting) -> str:
    parts = [k.choices[i].label() for k, i in zip(knobs, setting, strict=True) if i is not None]
    return " + ".join(parts) or "exact passes only"


def with_index(setting: Setting, knob: int, index: int | None) -> Setting:
    """``setting`` with knob ``knob`` at choice ``index`` (None: off)."""
    return setting[:knob] + (index,) + setting[knob + 1:]


def family_busy(knobs: tuple[Knob, ...], setting: Setting, knob: int) -> bool:
    """Whether another knob of ``knob``'s family is active in ``setting``."""
    return any(i is not None and j != knob and k.group == knobs[knob].group
               for j, (k, i) in enumerate(zip(knobs, setting, strict=True)))


def forward(knob: Knob, index: int | None) -> int | None:
    """The choice one forward step (``stride`` choices, the last one at most) beyond ``index``; None at the end."""
    last = len(knob.choices) - 1
    here = -1 if index is None else index
    if here >= last:
        return None
    return min(here + knob.stride, last)


def neighbours(knobs: tuple[Knob, ...], setting: Setting) -> list[Setting]:
    """Settings one forward step more aggressive on one knob (one knob per family active)."""
    out = []
    for j, (k, i) in enumerate(zip(knobs, setting, strict=True)):
        nxt = forward(k, i)
        if nxt is not None and not family_busy(knobs, setting, j):
            out.append(with_index(setting, j, nxt))
    return out
