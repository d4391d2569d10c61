"""The pass registry: an explicit tuple of pass classes, mapped by their stable names.

Adding a pass is one new file in this package and one entry in ``PASS_CLASSES``.
"""
from .base import Match, Pass, PassContext, PassOptions, PassResult, Plan
from .fold_linear_relu import FoldLinearOptions, FoldLinearRelu
from .low_rank import LowRank, LowRankOptions
from .merge_affine import MergeAffine, MergeAffineOptions
from .prune_channels import PruneChannels, PruneChannelsOptions
from .prune_magnitude import PruneMagnitude, PruneMagnitudeOptions
from .quantize_4bit import Quantize4Bit, Quantize4BitOptions
from .quantize_dynamic import QuantizeDynamic, QuantizeDynamicOptions
from .quantize_int8 import QuantizeInt8, QuantizeInt8Options
from .remove_dead_neurons import RemoveDeadNeurons, RemoveDeadOptions
from .share_weights import ShareWeights, ShareWeightsOptions

PASS_CLASSES: tuple[type[Pass], ...] = (RemoveDeadNeurons, FoldLinearRelu, MergeAffine, PruneChannels,
                                         PruneMagnitude, LowRank, QuantizeInt8, QuantizeDynamic, Quantize4Bit,
                                         ShareWeights)
PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in PASS_CLASSES}
DEFAULT_PASSES = ("remove-dead", "fold-linear", "merge-affine")

__all__ = ["Pass", "PassContext", "PassOptions", "PassResult", "Plan", "Match", "PASSES", "PASS_CLASSES",
           "DEFAULT_PASSES", "RemoveDeadNeurons", "RemoveDeadOptions", "FoldLinearRelu", "FoldLinearOptions",
           "MergeAffine", "MergeAffineOptions", "PruneChannels", "PruneChannelsOptions",
           "PruneMagnitude", "PruneMagnitudeOptions", "LowRank", "LowRankOptions", "QuantizeInt8",
           "QuantizeInt8Options", "QuantizeDynamic", "QuantizeDynamicOptions", "Quantize4Bit", "Quantize4BitOptions",
           "ShareWeights", "ShareWeightsOptions"]
