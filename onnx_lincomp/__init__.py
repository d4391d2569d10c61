"""onnx-lincomp: calibration-driven ReLU linearity compression for ONNX graphs."""
__version__ = "0.1.0"

from .errors import (  # noqa: E402
                     CalibrationDataError,
                     InvalidModelError,
                     LincompError,
                     NumericalMismatchError,
                     PassError,
                     UnsupportedModelError,
                     VerificationGateError,
)
from .optimize import OptimizeOptions, Result, optimize, sweep  # noqa: E402

__all__ = ["optimize", "sweep", "OptimizeOptions", "Result", "LincompError", "InvalidModelError",
           "UnsupportedModelError", "CalibrationDataError", "NumericalMismatchError", "PassError",
           "VerificationGateError", "__version__"]
