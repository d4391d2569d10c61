"""One exception hierarchy for the library; only the CLI turns these into messages and exit codes."""
from __future__ import annotations


class LincompError(Exception):
    """Base class of every error onnx-lincomp raises on purpose."""

    exit_code = 1


class InvalidModelError(LincompError):
    """The file is not a loadable or valid ONNX model."""

    exit_code = 3


class UnsupportedModelError(LincompError):
    """The model is valid ONNX but uses something this tool cannot handle."""

    exit_code = 3


class CalibrationDataError(LincompError):
    """Calibration data is missing, malformed or does not match the model inputs."""

    exit_code = 3


class NumericalMismatchError(LincompError):
    """A rewritten graph does not compute what the original computes."""

    exit_code = 1


class PassError(LincompError):
    """A pass failed; the message names the pass and those already run."""

    exit_code = 1


class VerificationGateError(LincompError):
    """A user-set verification gate (max error, max accuracy drop) was not met."""

    exit_code = 4


class OptionError(LincompError):
    """An option, recipe entry or combination of flags is invalid; the message names it."""

    exit_code = 2
