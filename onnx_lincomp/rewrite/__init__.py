"""Graph rewrites shared by the passes: take explicit arguments (graph, names, a group), never a pass context."""
from .channels import ChannelRemoval, remove_channels, removal_problem

__all__ = ["ChannelRemoval", "remove_channels", "removal_problem"]
