"""The pass registry: an explicit tuple of pass classes, mapped by their stable names.

Adding a pass is one new file in this package and one entry in ``PASS_CLASSES``.
"""
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan
from .fold_linear_relu import FoldLinearOptions, FoldLinearRelu
from .merge_affine import MergeAffine, MergeAffineOptions
from .prune_channels import PruneChannels, PruneChannelsOptions
from .remove_dead_neurons import RemoveDeadNeurons, RemoveDeadOptions

PASS_CLASSES: tuple[type[Pass], ...] = (RemoveDeadNeurons, FoldLinearRelu, MergeAffine, PruneChannels)
PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in PASS_CLASSES}
DEFAULT_PASSES = ("remove-dead", "fold-linear", "merge-affine")

__all__ = ["Pass", "PassContext", "PassOptions", "PassResult", "Plan", "Match", "PASSES", "PASS_CLASSES",
           "DEFAULT_PASSES", "RemoveDeadNeurons", "RemoveDeadOptions", "FoldLinearRelu", "FoldLinearOptions",
           "MergeAffine", "MergeAffineOptions", "PruneChannels", "PruneChannelsOptions"]
