"""Search across passes for the fastest / smallest / cheapest model within a budget (``optimize --objective``)."""
from .budget import Budget
from .space import Knob, Setting, default_knobs

__all__ = ["Budget", "Knob", "Setting", "default_knobs"]
