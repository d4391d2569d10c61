"""Judge candidate models against an original: cached outputs, paired accuracy bounds, agreement, latency."""
from .evaluator import Evaluator, OutputError, Score, Verification, model_accuracy
from .paired import BudgetSupport, Interval, PairedDrop, accuracy_interval, budget_supportable, drop_interval

__all__ = ["Evaluator", "OutputError", "Score", "Verification", "model_accuracy", "BudgetSupport", "Interval",
           "PairedDrop", "accuracy_interval", "budget_supportable", "drop_interval"]
