"""The pass registry: an explicit tuple of pass classes, mapped by their stable names."""
from .base import Pass, PassContext, PassResult
from .fold_linear_relu import FoldLinearOptions, FoldLinearRelu
from .merge_affine import MergeAffine
from .remove_dead_neurons import RemoveDeadNeurons, RemoveDeadOptions

PASS_CLASSES = (RemoveDeadNeurons, FoldLinearRelu, MergeAffine)
PASSES = {cls.name: cls for cls in PASS_CLASSES}
DEFAULT_PASSES = ("remove-dead", "fold-linear", "merge-affine")

__all__ = ["Pass", "PassContext", "PassResult", "PASSES", "PASS_CLASSES", "DEFAULT_PASSES", "RemoveDeadNeurons",
           "RemoveDeadOptions", "FoldLinearRelu", "FoldLinearOptions", "MergeAffine"]
