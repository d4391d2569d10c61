"""A latency model of the linear layers under onnxruntime's CPU kernels, for choosing pruned widths.

onnxruntime (MLAS) runs most Conv layers in the NCHWc blocked layout, whose block is the SIMD width in
floats: 16 with AVX-512F, 8 with AVX/AVX2. A Conv's time then steps with ``ceil(channels / block)`` on
both channel axes instead of following its MACs. Measured on an AMD EPYC (AVX-512), onnxruntime 1.32, one
thread, 40x40 input (``python benchmarks/prune_channels.py --conv-widths``)::

    3x3 Conv C->C   C = 24, 28, 32: 0.30 ms   36 .. 48: 0.66 ms   52 .. 64: 1.17 ms   68, 72: 1.80 ms
    1x1 Conv C->C   C = 24 .. 32:   0.062 ms  36 .. 48: 0.111 ms  52 .. 64: 0.173 ms  68, 72: 0.237 ms
    depthwise 3x3   C = 24 .. 32:   0.045 ms  36 .. 48: 0.061 ms  52 .. 64: 0.078 ms  68, 72: 0.091 ms

so removing channels within a block saves nothing, and a depthwise or grouped Conv whose width is not a
multiple of the block leaves the NCHWc path altogether (a plain NCHW kernel, plus layout reorders around it;
pruned UltraFace ran 1.35x *slower* at half its MACs that way). At aligned widths the kernels reach about
50 GMAC/s (3x3), 35 (1x1) and 11 (depthwise): a depthwise MAC costs about 4.5 dense ones.

:func:`layer_time` is that model: a layer's MACs, scaled by the block-padded fraction of its output and
input channels, times the per-MAC weight of its kind. It ranks and budgets layers; it is not a timer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..linear_layer import LinearLayer

# relative time per MAC at aligned widths (see the module docstring)
DENSE_WEIGHT = 1.0
POINTWISE_WEIGHT = 1.4
DEPTHWISE_WEIGHT = 4.5


@cache
def nchwc_block() -> int:
    """The channel block of onnxruntime's NCHWc Conv kernels on this CPU: 16 with AVX-512F, else 8."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return 8
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return 16 if "avx512f" in flags else 8


def padded(kept: float, width: int, block: int) -> float:
    """Channels a blocked kernel computes for ``kept`` of ``width`` (no padding below one block)."""
    if block <= 1 or width < block:
        return kept
    return float(math.ceil(kept / block - 1e-9) * block)


@dataclass(frozen=True)
class LayerShape:
    """What the latency model needs of a linear layer."""

    macs: float
    out_channels: int
    in_channels: int
    depthwise: bool
    grouped: bool
    pointwise: bool
    kind: str

    @staticmethod
    def of(layer: LinearLayer, macs: float) -> LayerShape:
        conv = layer.kind == "conv"
        group = layer.group if conv else 1
        return LayerShape(macs, layer.out_features, layer.in_features, conv and group > 1 and
                          group == layer.in_features == layer.out_features, conv and group > 1,
                          conv and layer.kernel_size == 1, layer.kind)


def layer_time(shape: LayerShape, out_kept: float, in_kept: float, block: int) -> float:
    """Modelled time (MAC units, weighted by kind) of ``shape`` with ``out_kept`` / ``in_kept`` channels left."""
    o = padded(out_kept, shape.out_channels, block) / max(shape.out_channels, 1)
    if shape.depthwise:
        return shape.macs * DEPTHWISE_WEIGHT * o
    if shape.grouped or shape.kind != "conv":
        return shape.macs * DENSE_WEIGHT * o * in_kept / max(shape.in_channels, 1)
    i = padded(in_kept, shape.in_channels, block) / max(shape.in_channels, 1)
    return shape.macs * (POINTWISE_WEIGHT if shape.pointwise else DENSE_WEIGHT) * o * i


__all__ = ["nchwc_block", "padded", "LayerShape", "layer_time", "DENSE_WEIGHT", "POINTWISE_WEIGHT",
           "DEPTHWISE_WEIGHT"]
