"""Graph rewrites shared by the passes: take explicit arguments (graph, names, a group), never a pass context."""
from .channels import ChannelRemoval, removal_problem, remove_channels

__all__ = ["ChannelRemoval", "remove_channels", "removal_problem"]
