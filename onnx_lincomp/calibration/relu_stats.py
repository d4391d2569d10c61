"""Per-channel ReLU statistics, mergeable across batches, shards and processes.

For a Relu with pre-activation ``z`` (channel axis ``c``, every other non-batch axis a "position"):

* ``positive[c]``        number of positions with ``z > 0``; ``positions`` the total per channel
* ``sample_active[c]``   samples with ``z > 0`` somewhere; ``sample_linear[c]`` samples with ``z > 0`` everywhere
* ``act_max[c]``, ``act_sum[c]``  max and sum of the Relu output ``max(z, 0)``
* ``pre_min/pre_max/pre_sum``  the pre-activation itself (NaN when only the Relu output was observed,
  which is what keeps onnxruntime's Conv+Relu fusion during calibration)

All fields combine by sum, min or max, so :meth:`ReluStats.merge` is associative and commutative:
statistics of shards merge to exactly the statistics of one pass over all data.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import CalibrationDataError

Observed = Literal["pre", "post"]
_ARRAYS = ("positive", "sample_active", "sample_linear", "act_max", "act_sum", "pre_min", "pre_max", "pre_sum")


@dataclass(frozen=True, eq=False)
class ReluStats:
    relu: str
    tensor: str
    channel_axis: int
    observed: Observed
    n_samples: int
    positions: int
    positive: np.ndarray
    sample_active: np.ndarray
    sample_linear: np.ndarray
    act_max: np.ndarray
    act_sum: np.ndarray
    pre_min: np.ndarray
    pre_max: np.ndarray
    pre_sum: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.positive.size)

    @property
    def dead(self) -> np.ndarray:
        """Never positive on any position of any sample."""
        return self.positive == 0

    @property
    def always_active(self) -> np.ndarray:
        """Positive on every position of every sample: the Relu acts as the identity."""
        return self.positive == self.positions

    @property
    def position_rate(self) -> np.ndarray:
        return self.positive / max(self.positions, 1)

    @property
    def sample_rate(self) -> np.ndarray:
        return self.sample_active / max(self.n_samples, 1)

    @property
    def act_mean(self) -> np.ndarray:
        """Mean Relu output per position (what a removed channel contributes on average)."""
        return self.act_sum / max(self.positions, 1)

    def merge(self, other: ReluStats) -> ReluStats:
        if (other.relu, other.channels, other.observed) != (self.relu, self.channels, self.observed):
            raise CalibrationDataError(f"cannot merge statistics of {other.relu} ({other.channels} channels, "
                                       f"{other.observed}) into {self.relu} ({self.channels}, {self.observed})")
        return replace(
            self,
            n_samples=self.n_samples + other.n_samples,
            positions=self.positions + other.positions,
            positive=self.positive + other.positive,
            sample_active=self.sample_active + other.sample_active,
            sample_linear=self.sample_linear + other.sample_linear,
            act_max=np.maximum(self.act_max, other.act_max),
            act_sum=self.act_sum + other.act_sum,
            pre_min=np.fmin(self.pre_min, other.pre_min),
            pre_max=np.fmax(self.pre_max, other.pre_max),
            pre_sum=self.pre_sum + other.pre_sum,
        )

    def subset(self, keep: np.ndarray) -> ReluStats:
        """Statistics of the units ``keep`` (indices), after a pass removed the others."""
        return replace(self, **{name: getattr(self, name)[keep] for name in _ARRAYS})

    @staticmethod
    def from_pre_activation(relu: str, tensor: str, z: np.ndarray, channel_axis: int) -> ReluStats:
        """Exact statistics of one batch of pre-activations (used for dumped tensors and as the reference)."""
        z = np.moveaxis(np.asarray(z, dtype=np.float64), channel_axis, 1)
        n, c = z.shape[0], z.shape[1]
        z = z.reshape(n, c, -1)
        pos = z > 0
        act = np.maximum(z, 0)
        return ReluStats(relu, tensor, channel_axis, "pre", n, n * z.shape[2],
                         pos.sum(axis=(0, 2)).astype(np.int64), pos.any(axis=2).sum(axis=0).astype(np.int64),
                         pos.all(axis=2).sum(axis=0).astype(np.int64), act.max(axis=(0, 2)), act.sum(axis=(0, 2)),
                         z.min(axis=(0, 2)), z.max(axis=(0, 2)), z.sum(axis=(0, 2)))

    @staticmethod
    def from_pooled(relu: str, tensor: str, per_sample_max: np.ndarray, per_sample_mean: np.ndarray,
                    per_sample_rate: np.ndarray, spatial: int) -> ReluStats:
        """Statistics of one batch from per-(sample, channel) max, mean and positive rate of the Relu output."""
        mx = per_sample_max.reshape(per_sample_max.shape[0], -1).astype(np.float64)
        n, c = mx.shape
        count = np.rint(per_sample_rate.reshape(n, c).astype(np.float64) * spatial).astype(np.int64)
        nan = np.full(c, np.nan)
        return ReluStats(relu, tensor, 1, "post", n, n * spatial, count.sum(axis=0), (count > 0).sum(axis=0),
                         (count == spatial).sum(axis=0), mx.max(axis=0),
                         per_sample_mean.reshape(n, c).astype(np.float64).sum(axis=0) * spatial, nan, nan.copy(),
                         nan.copy())


@dataclass(frozen=True)
class StatsSet:
    """Statistics of every analysed Relu of a model, in graph order, and where they came from."""

    layers: tuple[ReluStats, ...]
    source: str
    random: bool
    not_analysed: tuple[tuple[str, str], ...] = ()

    def get(self, relu: str) -> ReluStats | None:
        return next((s for s in self.layers if s.relu == relu), None)

    @property
    def n_samples(self) -> int:
        return max((s.n_samples for s in self.layers), default=0)

    def merge(self, other: StatsSet) -> StatsSet:
        mine = {s.relu for s in self.layers}
        if mine != {s.relu for s in other.layers}:
            raise CalibrationDataError("cannot merge statistics of different models (Relu names differ)")
        merged = tuple(s.merge(other.get(s.relu)) for s in self.layers)
        return StatsSet(merged, f"{self.source}+{other.source}", self.random or other.random, self.not_analysed)

    def subset(self, kept: dict[str, np.ndarray]) -> StatsSet:
        """The statistics after passes removed units (``kept``: Relu name -> remaining indices)."""
        if not kept:
            return self
        layers = tuple(s.subset(kept[s.relu]) if s.relu in kept else s for s in self.layers)
        return replace(self, layers=layers)

    def check_model(self, relus: list[str], model: str = "the model") -> None:
        """Statistics saved for another model are an error naming a Relu that does not match."""
        mine = {s.relu for s in self.layers}
        extra = sorted(mine - set(relus))
        if extra or (relus and not mine & set(relus)):
            name = extra[0] if extra else relus[0]
            raise CalibrationDataError(f"the statistics ({self.source}) were collected on another model: Relu "
                                       f"'{name}' {'is not in' if extra else 'has no statistics for'} {model}")

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {}
        index = []
        for i, s in enumerate(self.layers):
            index.append({f.name: getattr(s, f.name) for f in fields(s) if f.name not in _ARRAYS})
            for name in _ARRAYS:
                arrays[f"{i}.{name}"] = getattr(s, name)
        meta = {"format": "onnx-lincomp-stats/1", "source": self.source, "random": self.random,
                "not_analysed": list(self.not_analysed), "layers": index}
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        out = Path(path)
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(out)

    @staticmethod
    def load(path: str | Path) -> StatsSet:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["__meta__"]).decode())
                if meta.get("format") != "onnx-lincomp-stats/1":
                    raise CalibrationDataError(f"{path}: not an onnx-lincomp statistics file")
                layers = tuple(ReluStats(**entry, **{n: data[f"{i}.{n}"] for n in _ARRAYS})
                               for i, entry in enumerate(meta["layers"]))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CalibrationDataError(f"{path}: cannot read statistics file ({exc})") from exc
        return StatsSet(layers, meta["source"], meta["random"], tuple(tuple(x) for x in meta["not_analysed"]))
