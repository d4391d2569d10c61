"""Command-line interface: the click group (:mod:`.app`), one module per command family, rendering
(:mod:`.render`) and plots (:mod:`.plots`). Exit codes: 0 success, 1 runtime error, 2 usage error,
3 invalid model or calibration data, 4 a verification gate failed."""
from . import analyze_cmd, bits_cmd, inspect_cmd, optimize_cmd, sensitivity_cmd, sweep_cmd  # noqa: F401  (commands attach)
from .app import main

__all__ = ["main"]
