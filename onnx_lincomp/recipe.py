"""Recipes: the passes of a run with their options, and the settings that decide what data they see.

A recipe is what makes a run reproducible. Every JSON report carries the exact recipe that produced its
output under the top-level ``recipe`` key, so ``optimize --recipe earlier-report.json`` gives the same
model byte for byte (same model, same calibration data). Recipes are also written by hand in TOML::

    format = "onnx-lincomp-recipe/1"

    [calibration]
    verify_split = 0.2

    [[passes]]
    name = "remove-dead"
    dead_rate = 0.0

    [[passes]]
    name = "fold-linear"
    linear_rate = 1.0
    layer_threshold = "auto"

Unknown passes or options are usage errors (exit 2) that name them.
"""
from __future__ import annotations

import json
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import OptionError
from .passes import DEFAULT_PASSES, PASSES, Pass, PassOptions

FORMAT = "onnx-lincomp-recipe/1"


@dataclass(frozen=True)
class PassSpec:
    """One pass of a recipe: its registry name and its options."""

    name: str
    options: PassOptions

    @staticmethod
    def of(name: str, values: Mapping[str, Any] | None = None) -> PassSpec:
        cls = PASSES.get(name)
        if cls is None:
            raise OptionError(f"unknown pass '{name}' (known: {', '.join(PASSES)})")
        return PassSpec(name, cls.Options.from_mapping(dict(values or {}), name))

    def build(self) -> Pass:
        return PASSES[self.name](self.options)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options.to_mapping()}


@dataclass(frozen=True)
class CalibrationSettings:
    """Which samples the statistics come from (the rest of the data is held out for verification)."""

    verify_split: float = 0.2
    max_samples: int | None = None
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # a {name: shape} mapping is taken too

    def __post_init__(self):
        # stored as (name, shape) tuples whatever the spelling: a {name: shape} mapping, pairs, lists
        shapes = self.input_shapes
        pairs = shapes.items() if isinstance(shapes, Mapping) else shapes
        try:
            object.__setattr__(self, "input_shapes",
                               tuple((str(k), tuple(int(d) for d in dims)) for k, dims in pairs))
        except (TypeError, ValueError) as exc:
            raise OptionError(f"input_shapes: expected {{name: [d0, d1, ...]}} or [[name, [d0, ...]], ...], got "
                              f"{shapes!r}") from exc
        if not 0.0 <= self.verify_split < 1.0:
            raise OptionError(f"--verify-split must be in [0, 1), got {self.verify_split}")
        if self.max_samples is not None and self.max_samples < 1:
            raise OptionError(f"--max-samples must be at least 1, got {self.max_samples}")


@dataclass(frozen=True)
class ExactSettings:
    """Exact mode: units proven stable over a domain instead of observed on data."""

    input_range: tuple[str, ...]
    milp_time_limit: float = 240.0
    milp: bool = True
    check_points: int = 10000
    unit_time_limit: float | None = None  # CPU seconds per unit MILP (None: 60, at most milp_time_limit)
    milp_method: str = "units"  # per-unit programs, or the older network-wide one

    def __post_init__(self):
        if self.milp_method not in ("units", "network"):
            raise OptionError(f"--milp-method must be 'units' or 'network', got {self.milp_method!r}")
        if self.unit_time_limit is not None and self.unit_time_limit <= 0:
            raise OptionError(f"--unit-time-limit must be positive, got {self.unit_time_limit}")
        if not self.input_range:
            raise OptionError("exact mode needs --input-range (LO,HI, NAME=LO,HI, bounds.npz or from-calib)")
        if self.milp_time_limit <= 0 or self.check_points < 1:
            raise OptionError("--milp-time-limit must be positive and --check-points at least 1")


@dataclass(frozen=True)
class Recipe:
    passes: tuple[PassSpec, ...] = field(default_factory=lambda: tuple(PassSpec.of(n) for n in DEFAULT_PASSES))
    calibration: CalibrationSettings = CalibrationSettings()
    exact: ExactSettings | None = None

    def __post_init__(self):
        if not self.passes:
            raise OptionError("the recipe has no passes (give --passes NAME[,NAME...])")
        for i, spec in enumerate(self.passes[:-1]):
            if PASSES[spec.name].runs_last:
                raise OptionError(f"pass '{spec.name}' must run last (found '{self.passes[i + 1].name}' after it)")

    def spec(self, name: str) -> PassSpec | None:
        return next((s for s in self.passes if s.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "calibration": _settings_dict(self.calibration),
                               "passes": [s.as_dict() for s in self.passes]}
        if self.exact is not None:
            out["exact"] = _settings_dict(self.exact)
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        if isinstance(data.get("recipe"), Mapping):  # a JSON report: take the recipe it records
            data = data["recipe"]
        if data.get("format", FORMAT) != FORMAT:
            raise OptionError(f"{where}: unsupported recipe format {data.get('format')!r} (expected {FORMAT})")
        unknown = set(data) - {"format", "calibration", "passes", "exact"}
        if unknown:
            raise OptionError(f"{where}: unknown recipe key '{sorted(unknown)[0]}'")
        passes = []
        for entry in data.get("passes", []):
            values = dict(entry)
            if "name" not in values:
                raise OptionError(f"{where}: a pass entry has no 'name'")
            passes.append(PassSpec.of(values.pop("name"), values))
        cal = _settings(CalibrationSettings, data.get("calibration", {}), where)
        exact = _settings(ExactSettings, data["exact"], where) if data.get("exact") else None
        return Recipe(tuple(passes), cal, exact)

    def to_toml(self) -> str:
        return _toml(self.as_dict())


def _settings_dict(settings: Any) -> dict[str, Any]:
    out = {}
    for f in fields(settings):
        v = getattr(settings, f.name)
        out[f.name] = ([[k, list(s)] for k, s in v] if f.name == "input_shapes"
                       else (list(v) if isinstance(v, tuple) else v))
    return out


def _settings(cls: type, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise OptionError(f"{where}: unknown {cls.__name__} key '{sorted(unknown)[0]}' (known: "
                          f"{', '.join(sorted(known))})")
    v = dict(values)
    if "input_range" in v:
        v["input_range"] = tuple(v["input_range"])
    try:
        return cls(**v)
    except TypeError as exc:
        raise OptionError(f"{where}: {exc}") from exc


def load_recipe(path: str | Path) -> Recipe:
    """A recipe from a TOML file, a JSON recipe, or a JSON report (its ``recipe`` key)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise OptionError(f"--recipe {p}: cannot read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise OptionError(f"--recipe {p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'} "
                          f"({exc})") from exc
    if not isinstance(data, dict):
        raise OptionError(f"--recipe {p}: expected a table/object at the top level")
    return Recipe.from_dict(data, str(p))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):  # inline table (per-layer overrides)
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise OptionError(f"cannot write {v!r} to TOML")


def _toml(d: Mapping[str, Any]) -> str:
    """A small TOML writer for recipes (scalars, arrays, one level of tables and arrays of tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, (dict, list)) or k == "format"]
    for key, value in d.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        elif key == "passes":
            for entry in value:
                lines += ["", "[[passes]]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items() if v is not None]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PassFlag:
    """A CLI flag generated from pass options: the (pass, field) pairs it sets, its help, whether boolean."""

    flag: str
    owners: tuple[tuple[str, str], ...]
    help: str
    boolean: bool = False


def pass_flags() -> dict[str, PassFlag]:
    """CLI shortcut flags generated from the passes' options. A flag shared by several passes (such as
    ``--sparsity``) sets the field of every listed pass that has it."""
    out: dict[str, PassFlag] = {}
    for name, cls in PASSES.items():
        hints = typing.get_type_hints(cls.Options)
        for f in fields(cls.Options):
            flag = f.metadata.get("flag")
            if not flag:
                continue
            seen = out.get(flag)
            owners = (seen.owners if seen else ()) + ((name, f.name),)
            text = f.metadata.get("help", "")
            if seen is not None:  # a shared flag: one help when the passes agree, else each pass's, by pass
                first = seen.help if len(seen.owners) > 1 else f"{seen.owners[0][0]}: {seen.help}"
                text = f"{first} {name}: {text}" if text and text not in seen.help else seen.help
            out[flag] = PassFlag(flag, owners, text, hints[f.name] is bool)
    return out


def _flag_value(text: Any) -> Any:
    """A flag's text as int, float or the text itself (the pass's Options validate the result)."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def recipe_from_flags(passes: tuple[str, ...], flags: Mapping[str, Any], calibration: CalibrationSettings,
                      exact: ExactSettings | None = None) -> Recipe:
    """The recipe that ``--passes`` and the per-pass flags describe; a flag whose pass is not listed is an error."""
    table = pass_flags()
    given = {flag: v for flag, v in flags.items() if v is not None}
    for flag in given:
        owners = [p for p, _ in table[flag].owners]
        if not set(owners) & set(passes):
            raise OptionError(f"{flag} is an option of pass '{' or '.join(owners)}', which is not in --passes "
                              f"({', '.join(passes) or 'none'})")
    specs = []
    for name in passes:
        mine = {f: (fld, v) for f, v in given.items() for p, fld in table[f].owners if p == name}
        # a flag another listed pass also owns may be meant for that pass: only flags solely this pass's conflict
        alone = {fld for f, (fld, _) in mine.items() if [p for p, _ in table[f].owners if p in passes] == [name]}
        clash = PASSES[name].Options.conflict(alone) if name in PASSES else None
        if clash:
            raise OptionError(f"{name}: {clash}")
        try:
            specs.append(PassSpec.of(name, {fld: _flag_value(v) for fld, v in mine.values()}))
        except OptionError as exc:
            raise OptionError(f"{', '.join(mine) or '--passes'}: {exc}") from exc
    return Recipe(tuple(specs), calibration, exact)
