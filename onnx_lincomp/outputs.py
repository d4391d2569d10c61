"""The files one command writes: declared and checked before any work, staged next to their targets,
renamed into place together at the end, and all removed when anything fails.

    plan = OutputPlan(inputs={"MODEL": model}, overwrite=overwrite)
    plan.add("-o", output, model=True)
    plan.add("--json", json_out)              # None and "-" (stdout) are not files: ignored
    plan.add("--plot", plot, requires=pyplot)  # an optional dependency, imported by check()
    with plan.check() as outputs:             # every problem is raised here, before the work
        ...
        with outputs.writing("-o") as path:   # a path in a hidden staging folder next to the target
            save_model_proto(model, path)
        outputs.commit()                      # rename everything into place
    # leaving the block without commit() (an exception, Ctrl-C) removes every staged file

A destination's parent folder must exist (folders are never created), be writable, and the target must
not be a folder; two destinations may not name the same file, and none may name an input, except the
model destination over the input model with ``overwrite``. These refusals are :class:`OptionError`
(exit 2) naming the option and the path. A staging folder holds the target's own name, so writers that
add companion files (a model's external ``.data`` file) or pick a format from the suffix (plots) work
unchanged; :meth:`Outputs.commit` moves every file a staging folder holds.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import LincompError, OptionError

STAGE_SUFFIX = ".lincomp-tmp"
MODEL_DATA_SUFFIX = ".data"  # the external-data file model_io.save_model_proto writes next to a model


@dataclass(frozen=True)
class Destination:
    """One file a command will write: the option that named it, the path as given, and its role."""

    option: str
    path: str
    model: bool = False
    requires: Callable[[], object] | None = None

    @property
    def target(self) -> Path:
        return Path(os.path.abspath(self.path))

    @property
    def label(self) -> str:
        return f"{self.option} {self.path}"

    def reserved(self) -> tuple[str, ...]:
        """Real paths this destination may write: the file, and a model's external-data companion."""
        real = os.path.realpath(self.target)
        return (real, real + MODEL_DATA_SUFFIX) if self.model else (real,)


class OutputPlan:
    """The destinations of one command; :meth:`check` validates them all and returns the staging area."""

    def __init__(self, inputs: Mapping[str, str | None] | None = None, *, overwrite: bool = False):
        self._inputs = {label: path for label, path in (inputs or {}).items() if path}
        self._overwrite = overwrite
        self._destinations: list[Destination] = []

    @property
    def destinations(self) -> tuple[Destination, ...]:
        return tuple(self._destinations)

    def add(self, option: str, path: str | os.PathLike | None, *, model: bool = False,
            requires: Callable[[], object] | None = None) -> None:
        """Declare that ``option`` will write ``path`` (``None`` and ``-``, stdout, are not files)."""
        if path is None or str(path) == "-":
            return
        if any(d.option == option for d in self._destinations):
            raise ValueError(f"{option} declared twice")
        self._destinations.append(Destination(option, str(path), model, requires))

    def check(self) -> Outputs:
        """Raise :class:`OptionError` naming the first unusable destination; else the staging area."""
        for dest in self._destinations:
            _check_folder(dest)
        self._check_distinct()
        for dest in self._destinations:
            if dest.requires is not None:
                dest.requires()
        return Outputs(self._destinations)

    def _check_distinct(self) -> None:
        seen: dict[str, Destination] = {}
        for dest in self._destinations:
            for real in dest.reserved():
                other = seen.get(real)
                if other is not None:
                    raise OptionError(f"{other.label} and {dest.label} name the same file; give each output its "
                                      "own path")
                seen[real] = dest
            for label, source in self._inputs.items():
                if not _same_file(dest.target, source):
                    continue
                if dest.model and label == "MODEL":
                    if self._overwrite:
                        continue
                    raise OptionError(f"{dest.label}: refusing to overwrite the input model (pass --overwrite to "
                                      "allow)")
                raise OptionError(f"{dest.label}: refusing to overwrite the input {label} {source}")


def _check_folder(dest: Destination) -> None:
    folder, target = dest.target.parent, dest.target
    shown = Path(dest.path).parent  # the folder as the user wrote it
    if not folder.exists():
        raise OptionError(f"{dest.label}: folder '{shown}' does not exist (outputs never create folders)")
    if not folder.is_dir():
        raise OptionError(f"{dest.label}: '{shown}' is not a folder")
    if target.is_dir():
        raise OptionError(f"{dest.label}: is a folder; give a file name")
    if target.exists() and not target.is_file():
        raise OptionError(f"{dest.label}: exists and is not a regular file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(f"{dest.label}: folder '{shown}' is not writable")


def _same_file(target: Path, source: str) -> bool:
    if not os.path.exists(source):
        return False
    if target.exists():
        return os.path.samefile(target, source)
    return os.path.realpath(target) == os.path.realpath(source)


class Outputs:
    """Staging area of checked destinations. A context manager: leaving it removes whatever was not committed."""

    def __init__(self, destinations: list[Destination]):
        self._destinations = {d.option: d for d in destinations}
        self._stages: dict[str, Path] = {}

    def __contains__(self, option: str) -> bool:
        return option in self._destinations

    @contextmanager
    def writing(self, option: str) -> Iterator[Path]:
        """The staged path to write ``option``'s file to; errors of the writer name the real target."""
        dest = self._destinations[option]
        if option not in self._stages:
            self._stages[option] = Path(tempfile.mkdtemp(prefix=f".{dest.target.name}.", suffix=STAGE_SUFFIX,
                                                         dir=dest.target.parent))
        staged = self._stages[option] / dest.target.name
        try:
            yield staged
        except LincompError as exc:
            text = str(exc).replace(str(staged), str(dest.target)).replace(str(staged.parent), str(dest.target.parent))
            renamed = type(exc)(text)
            renamed.exit_code = exc.exit_code
            raise renamed from exc
        except OSError as exc:
            raise LincompError(f"{dest.label}: cannot write ({exc.strerror or exc})") from exc

    def commit(self) -> tuple[Path, ...]:
        """Rename every staged file into place (after checking each declared one was written); the paths."""
        for option, dest in self._destinations.items():
            stage = self._stages.get(option)
            if stage is None or not (stage / dest.target.name).is_file():
                raise LincompError(f"{dest.label}: nothing was written to it (internal error); nothing committed")
        written: list[Path] = []
        try:
            for option, stage in self._stages.items():
                dest = self._destinations[option]
                for staged in sorted(stage.iterdir(), key=lambda p: p.name == dest.target.name):
                    os.replace(staged, dest.target.parent / staged.name)  # companions first, the file itself last
                    written.append(dest.target.parent / staged.name)
        except OSError as exc:
            raise LincompError(f"{dest.label}: cannot move the staged file into place ({exc.strerror or exc}); "
                               f"already written: {', '.join(map(str, written)) or 'nothing'}") from exc
        finally:
            self.discard()
        return tuple(written)

    def discard(self) -> None:
        """Remove every staging folder and what it holds."""
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._stages.clear()

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
