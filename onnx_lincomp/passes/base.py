"""The pass contract: a stable name, frozen validated options, a read-only plan, an apply step.

A pass is a small class::

    class MyPass(Pass):
        name = "my-pass"              # stable: recipes and reports use it
        Options = MyOptions           # frozen dataclass deriving from PassOptions, fields built with option()
        summary = "one line for --help and the docs"
        repeatable = True             # may run again until the pipeline reaches a fixed point
        runs_last = False             # True for passes after which no float pass may run (quantization)
        lossy = False                 # True when the pass changes outputs by design (pruning, low-rank, ...)

        def plan(self, graph, ctx) -> Plan: ...       # read-only: typed matches and skip reasons
        def apply(self, graph, plan) -> PassResult: ... # mutates the graph as the plan says

``plan`` never mutates; ``analyze`` and ``optimize --explain`` show plans. ``apply`` re-reads every
site it rewrites (earlier rewrites in the same apply change neighbouring weights) and skips, with a
reason, a match whose site no longer looks as planned. Cleanup, toposort, shape refresh, timing,
figures and error wrapping belong to the pipeline, never to a pass.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis.unit_sets import UnitEvidence
from ..calibration.activations import CalibrationData
from ..errors import OptionError


def option(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A documented options field: ``help`` is shown by ``--help`` and the docs, ``flag`` names its CLI flag
    (several passes may share a flag: it sets the field of every listed pass that has it)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, "flag": flag})
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class PassOptions:
    """Base of every pass's options. Subclasses are frozen dataclasses whose fields come from :func:`option`
    and validate in ``__post_init__`` by raising :class:`~onnx_lincomp.errors.OptionError` (exit 2)."""

    @classmethod
    def fields_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], pass_name: str) -> PassOptions:
        """Options from a recipe entry; unknown keys and ill-typed values are usage errors naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            raise OptionError(f"pass '{pass_name}': unknown option '{unknown[0]}' (known: "
                              f"{', '.join(known) or 'none'})")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k], pass_name, k) for k, v in values.items()})

    @classmethod
    def conflict(cls, given: set[str]) -> str | None:
        """Why fields the user set explicitly (flags, not a saved recipe, which stores every field) cannot go
        together, or None. A saved recipe holds defaults beside the fields that replace them, so the check is
        on what was given, not on the options."""
        return None

    def to_mapping(self) -> dict[str, Any]:
        """Every field, as plain JSON/TOML values (the form recipes store)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _coerce(value: Any, hint: Any, pass_name: str, key: str) -> Any:
    """``value`` as the field type ``hint`` (int, float, bool, str, unions, tuples, Literal)."""
    allowed = (typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
               else (hint,))
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (int, str, bool) and type(value) is kind:
            return value
        if kind is type(None) and value is None:
            return None
        if typing.get_origin(kind) is typing.Literal and value in typing.get_args(kind):
            return value
        if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if typing.get_origin(kind) is dict and isinstance(value, Mapping):
            return dict(value)
    raise OptionError(f"pass '{pass_name}': option '{key}' got {value!r}, expected {_describe(allowed)}")


def _describe(kinds: tuple) -> str:
    """A field type in words: 'a number', 'an integer or text', 'one of a, b' (None left out beside others)."""
    words = {float: "a number", int: "an integer", str: "text", bool: "true or false", type(None): "nothing"}
    out = []
    for kind in [k for k in kinds if k is not type(None)] or kinds:  # "or nothing" says nothing to a user
        if typing.get_origin(kind) is typing.Literal:
            out.append("one of " + ", ".join(map(str, typing.get_args(kind))))
        elif typing.get_origin(kind) is tuple:
            out.append("a list")
        elif typing.get_origin(kind) is dict:
            out.append("a table")
        else:
            out.append(words.get(kind, getattr(kind, "__name__", str(kind))))
    return " or ".join(out)


Progress = Callable[[int, int], None]  # (done, total)
StepProgress = Callable[[str], Progress]  # label -> a fresh progress callback (the CLI draws a bar per label)


def _no_progress(done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class PassContext:
    """Read-only inputs shared by every pass: which units are dead or linear, and from what evidence
    (calibration statistics or a certificate over an input domain), the calibration samples that
    data-aware passes (pruning with refits, quantization) read, and where long steps report progress.
    Nothing pass-specific lives here."""

    evidence: UnitEvidence | None = None
    data: CalibrationData | None = None
    progress: StepProgress | None = None

    def bar(self, label: str) -> Progress:
        """A progress callback for one long step (a no-op without a reporter)."""
        return self.progress(label) if self.progress is not None else _no_progress


@dataclass(frozen=True, eq=False)
class Match:
    """One rewrite a plan would make: where, what, how many units, the parameters it saves (first order)."""

    site: str
    action: str
    units: int = 0
    params_saved: int = 0
    detail: str = ""
    data: Mapping[str, Any] = field(default_factory=dict, repr=False)  # what apply needs (masks, means)

    def as_dict(self) -> dict:
        return {"site": self.site, "action": self.action, "units": self.units, "params_saved": self.params_saved,
                "detail": self.detail}


@dataclass(frozen=True)
class Plan:
    """What a pass would do on a graph, computed without touching it."""

    pass_name: str
    matches: tuple[Match, ...] = ()
    skipped: Mapping[str, int] = field(default_factory=dict)
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # skip reason -> a few site names
    approximate: bool = False

    @property
    def params_saved(self) -> int:
        return sum(m.params_saved for m in self.matches)

    def as_dict(self) -> dict:
        return {"pass": self.pass_name, "matches": [m.as_dict() for m in self.matches], "skipped": dict(self.skipped),
                "examples": {k: list(v) for k, v in self.examples.items()}, "params_saved": self.params_saved,
                "approximate": self.approximate}


_QUOTED = re.compile(r"'[^']*'")


class SkipTally:
    """Skip reasons with counts and the first few site names each (what reports show)."""

    def __init__(self, examples: int = 3):
        self.counts: Counter = Counter()
        self.names: dict[str, list[str]] = {}
        self._examples = examples

    def add(self, reason: str, site: str) -> None:
        reason = _QUOTED.sub("'…'", reason)  # names go to the examples, so equal reasons tally together
        self.counts[reason] += 1
        names = self.names.setdefault(reason, [])
        if len(names) < self._examples:
            names.append(site)

    def plan(self, pass_name: str, matches: list[Match], approximate: bool = False) -> Plan:
        return Plan(pass_name, tuple(matches), dict(self.counts), {k: tuple(v) for k, v in self.names.items()},
                    approximate)


@dataclass(frozen=True)
class PassResult:
    """What one application of a pass did. Generic figures (parameters, nonzeros, bytes, MACs before and
    after) are measured by the pipeline with the one model counter and live in its record."""

    name: str
    changed: bool
    matched: int = 0
    rewritten: int = 0
    approximate: bool = False
    skipped: Mapping[str, int] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)  # pass-specific: units_removed, units_folded, ...
    notes: tuple[str, ...] = ()
    kept: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)  # Relu -> units that remain
    # site -> output tensor of a layer the pass changed by design (lossy passes): optimize reports each one's
    # error on held-out activations against the canonical model
    changed_outputs: Mapping[str, str] = field(default_factory=dict)

    def count(self, key: str) -> int:
        return int(self.counts.get(key, 0))

    @property
    def neurons_removed(self) -> int:
        return self.count("units_removed")

    @property
    def neurons_folded(self) -> int:
        return self.count("units_folded")

    def as_dict(self) -> dict:
        return {"name": self.name, "changed": self.changed, "matched": self.matched, "rewritten": self.rewritten,
                "approximate": self.approximate, "skipped": dict(self.skipped), "counts": dict(self.counts),
                "neurons_removed": self.neurons_removed, "neurons_folded": self.neurons_folded,
                "notes": list(self.notes)}


def node_named(graph: gs.Graph, name: str) -> gs.Node | None:
    """The node called ``name`` (canonicalisation gives every node a unique name): how apply finds a planned site."""
    return next((n for n in graph.nodes if n.name == name), None)


class Pass:
    """Base class of every pass (see the module docstring for the contract)."""

    name: ClassVar[str]
    Options: ClassVar[type[PassOptions]] = PassOptions
    summary: ClassVar[str] = ""
    repeatable: ClassVar[bool] = True
    runs_last: ClassVar[bool] = False
    lossy: ClassVar[bool] = False

    def __init__(self, options: PassOptions | None = None):
        if options is not None and not isinstance(options, self.Options):
            raise OptionError(f"pass '{self.name}' takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options if options is not None else self.Options()

    def plan(self, graph: gs.Graph, ctx: PassContext) -> Plan:
        raise NotImplementedError

    def apply(self, graph: gs.Graph, plan: Plan) -> PassResult:
        raise NotImplementedError

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Plan, then apply (what the pipeline does)."""
        return self.apply(graph, self.plan(graph, ctx))
