"""Check in onnxruntime that every unit claimed unstable really takes both signs on inputs of the box.

Evidence per channel comes from the sample points that came closest to each sign and from the search
and MILP witnesses; all of them are fed to the original model with the pre-activations observed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..calibration import CollectOptions, collect_relu_stats, input_specs
from ..calibration.data_source import CalibrationSource
from ..model_io import ModelContext
from .certify import Certificate


@dataclass(frozen=True)
class WitnessCheck:
    channels_claimed_unstable: int
    confirmed: int
    failed: tuple[tuple[str, int], ...]

    def as_dict(self) -> dict:
        return {"channels_claimed_unstable": self.channels_claimed_unstable, "confirmed": self.confirmed,
                "failed": [list(f) for f in self.failed]}


def check_witnesses(graph: gs.Graph, ctx: ModelContext, cert: Certificate) -> WitnessCheck:
    if not cert.layers or len(cert.evidence) == 0:
        return WitnessCheck(0, 0, ())
    source = CalibrationSource(input_specs(graph), arrays=cert.domain.feeds(cert.evidence), description="witnesses")
    stats = collect_relu_stats(graph, ctx, source, CollectOptions(batch_size=64, mode="pre"))
    claimed = confirmed = 0
    failed = []
    for lc in cert.layers:
        s = stats.get(lc.relu)
        open_units = np.zeros(lc.units, bool)
        open_units[list(lc.open_units)] = True
        open_channels = np.bincount(lc.channel_of, open_units, lc.channels) > 0
        unstable = ~(lc.stably_active | lc.stably_inactive | open_channels)
        for c in np.flatnonzero(unstable):
            claimed += 1
            if s is not None and s.pre_max[c] > 0 and s.pre_min[c] < 0:
                confirmed += 1
            else:
                failed.append((lc.relu, int(c)))
    return WitnessCheck(claimed, confirmed, tuple(failed))
