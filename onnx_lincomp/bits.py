"""Per-layer bit sensitivity of weight sharing (or integer rounding), and per-layer bits chosen within an
accuracy budget.

**Scan.** Every linear layer that weight sharing can shrink is shared alone (the others stay float) at
each bit width, with the ``share-weights`` pass and its data-aware rounding, and scored on the held-out
split by the prepared evaluator (the original runs once). The layers' input moments are collected once
for the whole scan: each candidate is exactly what the pass gives with ``layers={layer: b, others: 0}``.

``method="int"`` scans a uniform integer grid instead: each layer's weight alone rounded to symmetric
per-output-channel integers, ``W_q = s_c clamp(round(W / s_c), -Q, Q)`` with ``Q = 2^(b-1) - 1`` and
``s_c = max|W_c| / Q`` (fake-quantized: the rounded values are written back as float weights, the graph stays
float), scored the same way; storage counts ``b`` bits per weight plus one float scale per channel. It is a
scan only (no pass replays it, so there is no budgeted choice).

The loop that builds one candidate per (layer, width) and scores it, :func:`scan_layers`, takes any
:class:`LayerQuantizer`; ``quantize-int8``'s automatic exclusion scans its one-layer INT8 models with it.

**Choice** (``max_accuracy_drop``). Each layer's options are float or one of the scanned widths, with
its stored bytes and its damage (the held-out accuracy drop when shared alone, clipped at 0 and made
non-increasing in the bits). A greedy allocation repeatedly takes the move (a layer to fewer bits) that
saves most bytes per unit of added damage while the summed damage stays within the budget. The
combination is built and verified on the held-out split; when the paired upper bound of its drop misses
the budget, the chosen layer that was most damaging alone is capped at more bits and the allocation
redone, a bounded number of times. The accepted bits go into a ``share-weights`` recipe (every layer
named, 0 = float), which ``optimize --recipe`` replays to the same model; the final model is built and
gated by :func:`~onnx_lincomp.optimize.optimize` with that recipe, so its report is the usual one.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from .errors import OptionError, VerificationGateError
from .evaluate.layer_scan import COLUMNS, BitsRow, BitsScan, LayerInfo, LayerQuantizer, scan_layers
from .gates import require_budget_support
from .graph_edit import NameSource
from .linear_layer import LinearLayer, match_linear_layer, write_linear_layer
from .model_io import to_model_proto
from .optimize import OptimizeOptions, compress, optimize
from .passes.base import node_named
from .passes.share_weights import (
    ShareWeights,
    ShareWeightsOptions,
    graph_opset,
    layer_moments,
    layer_problem,
    shareable_layers,
    shared_bytes,
)
from .prepared import Prepared, calibration_data, prepare
from .recipe import CalibrationSettings, PassSpec, Recipe

logger = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
DEFAULT_BITS = (8, 6, 4, 3, 2)
METHODS = ("kmeans", "int")


def parse_bits(text: str) -> tuple[int, ...]:
    """``"8,6,4"`` as widths from 8 down; anything else is a usage error."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"--bits: expected comma-separated integers from 1 to 8, got '{text}'") from None
    if not values or any(not 1 <= v <= 8 for v in values):
        raise OptionError(f"--bits: every width must be an integer from 1 to 8, got '{text}'")
    return tuple(sorted(set(values), reverse=True))


@dataclass(frozen=True)
class BitsOptions:
    bits: tuple[int, ...] = DEFAULT_BITS
    method: Literal["kmeans", "int"] = "kmeans"
    share: ShareWeightsOptions = field(default_factory=ShareWeightsOptions)  # rounding, refit, bias correction
    max_accuracy_drop: float | None = None
    threads: int = 0
    max_rounds: int = 12  # combined builds tried before giving up
    latency: bool = True  # latency in the final model's report

    def __post_init__(self):
        if not self.bits or any(not 1 <= b <= 8 for b in self.bits):
            raise OptionError(f"bits: every width must be from 1 to 8, got {self.bits}")
        if self.method not in METHODS:
            raise OptionError(f"--method: unknown method '{self.method}' (choose {' or '.join(METHODS)})")
        if self.method == "int" and min(self.bits) < 2:
            raise OptionError(f"--method int: a symmetric integer grid needs at least 2 bits, got {min(self.bits)}")
        if self.method == "int" and self.max_accuracy_drop is not None:
            raise OptionError("--method int is a scan only: --max-accuracy-drop chooses share-weights bits "
                              "(use --method kmeans)")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise OptionError("--max-accuracy-drop must be at least 0")


@dataclass(frozen=True)
class BitsChoice:
    """The accepted per-layer bits, their recipe, and the optimize result built from it."""

    bits: Mapping[str, int]
    recipe: Recipe
    model: onnx.ModelProto = field(repr=False)
    report: object  # OptimizeReport
    rounds: tuple[dict, ...]

    def as_dict(self) -> dict:
        return {"bits": dict(self.bits), "rounds": list(self.rounds), "report": self.report.as_dict()}


@dataclass(frozen=True)
class BitsResult:
    scan: BitsScan
    choice: BitsChoice | None = None

    def as_dict(self) -> dict:
        out = self.scan.as_dict()
        if self.choice is not None:
            out["choice"] = self.choice.as_dict()
            out["recipe"] = self.choice.recipe.as_dict()  # optimize --recipe this-report.json replays it
        return out


class _Sharer:
    """Builds shared candidates of one prepared model, the layers' moments collected once."""

    def __init__(self, prep: Prepared, options: BitsOptions, calibration: CalibrationSettings):
        self.prep, self.options, self.prep_calibration = prep, options, calibration
        self.graph = prep.loaded.graph
        self.opset = graph_opset(self.graph)
        data = calibration_data(prep)
        base = ShareWeights(options.share)
        self.rounding = base.rounding_for(data is not None)
        o = options.share
        aware = data is not None and (self.rounding == "gptq" or o.refit_codebook or o.bias_correction)
        self.moments = layer_moments(self.graph, data, o.seed) if aware else {}
        self.layers = shareable_layers(self.graph)[0]

    def problem(self, layer: LinearLayer, bits: int) -> str | None:
        return layer_problem(layer, bits, self.opset)

    def stored_bytes(self, layer: LinearLayer, bits: int) -> int:
        return shared_bytes(layer, bits, self.opset)

    def options_for(self, bits: Mapping[str, int]) -> ShareWeightsOptions:
        """Every layer named (0: float), so the recipe says what happens to each."""
        widths = {layer.name: int(bits.get(layer.name, 0)) for layer in self.layers}
        return replace(self.options.share, bits=max(self.options.bits), layers=widths)

    def recipe(self, bits: Mapping[str, int]) -> Recipe:
        return Recipe((PassSpec.of("share-weights", self.options_for(bits).to_mapping()),),
                      self.prep_calibration)

    def build_combined(self, bits: Mapping[str, int]) -> onnx.ModelProto:
        """Exactly what the recipe gives (sequential rounding included): what ``optimize --recipe`` replays."""
        return compress(self.prep, None, self.recipe(bits))[0]

    def build(self, bits: Mapping[str, int]) -> onnx.ModelProto:
        """One layer shared on the moments collected once (the scan's candidates: the layers before it are
        float, so sequential rounding would see the same inputs)."""
        graph = self.graph.copy()
        p = ShareWeights(self.options_for(bits))
        p.apply(graph, p.plan_with_moments(graph, self.moments, self.rounding))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return to_model_proto(graph, self.prep.loaded.ctx)


def int_rounded(weight: np.ndarray, bits: int) -> np.ndarray:
    """``weight`` (output channels on axis 0) rounded to a symmetric ``bits``-bit integer grid per channel,
    ``s_c clamp(round(W_c / s_c), -Q, Q)`` with ``Q = 2^(bits-1) - 1`` and ``s_c = max|W_c| / Q``; a channel of
    zeros stays zero."""
    if not 2 <= bits <= 8:
        raise ValueError(f"symmetric integer rounding needs 2..8 bits, got {bits}")
    q = float(2 ** (bits - 1) - 1)
    w = np.asarray(weight, dtype=np.float64)
    peak = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).reshape((-1,) + (1,) * (w.ndim - 1))
    scale = np.where(peak > 0, peak / q, 1.0)
    return np.clip(np.round(w / scale), -q, q) * scale


class _IntRounder:
    """Builds integer-rounded candidates (fake-quantized weights in the float graph) of one prepared model."""

    def __init__(self, prep: Prepared):
        self.prep = prep
        self.graph = prep.loaded.graph
        self.layers = shareable_layers(self.graph)[0]

    def problem(self, layer: LinearLayer, bits: int) -> str | None:
        values = np.asarray(layer.nodes[0].inputs[1].values)
        if values.dtype not in (np.float32, np.float64, np.float16):
            return f"weight of type {values.dtype} is not float32/float16/float64"
        return None if bits >= 2 else "a symmetric integer grid needs at least 2 bits"

    def stored_bytes(self, layer: LinearLayer, bits: int) -> int:
        itemsize = np.asarray(layer.nodes[0].inputs[1].values).itemsize
        return -(-int(layer.size) * bits // 8) + layer.out_features * itemsize

    def build(self, bits: Mapping[str, int]) -> onnx.ModelProto:
        graph = self.graph.copy()
        names = NameSource(graph)
        for name, b in bits.items():
            layer = match_linear_layer(graph, node_named(graph, name)) if b else None
            if isinstance(layer, LinearLayer):
                write_linear_layer(graph, names, layer, int_rounded(layer.weight, b), layer.bias, layer.has_bias)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return to_model_proto(graph, self.prep.loaded.ctx)


def scan_bits(prep: Prepared, quantizer: LayerQuantizer, options: BitsOptions,
              progress: Progress | None = None) -> BitsScan:
    """Each scannable layer alone at each width, scored on the held-out split."""
    evaluator = prep.evaluator("heldout", options.threads)
    if evaluator is None:
        raise OptionError("bits needs held-out samples to score candidates on (--verify-split > 0)")
    return scan_layers(evaluator, quantizer, options.bits, prep.source_name, progress, options.method)


class _Options:
    """One layer's choices: (bits, bytes, damage) from float (bits 0) down to the fewest bits scanned."""

    def __init__(self, info: LayerInfo, rows: list[BitsRow]):
        self.name = info.name
        self.choices = [(0, info.float_bytes, 0.0)]
        worst = 0.0
        for r in sorted(rows, key=lambda r: -r.bits):
            worst = max(worst, r.drop_points or 0.0)  # fewer bits never counted as less damaging
            self.choices.append((r.bits, r.shared_bytes, worst))


def allocate(options: list[_Options], goal: float) -> dict[str, int]:
    """Greedy: take the move saving most bytes per unit of added damage while the summed damage <= goal."""
    at = {o.name: 0 for o in options}
    total = 0.0
    while True:
        best = None
        for o in options:
            _, size, dmg = o.choices[at[o.name]]
            for j in range(at[o.name] + 1, len(o.choices)):
                _, size2, dmg2 = o.choices[j]
                added, saved = dmg2 - dmg, size - size2
                if saved <= 0 or total + added > goal + 1e-12:
                    continue
                key = (saved / max(added, 1e-9), saved)
                if best is None or key > best[0]:
                    best = (key, o.name, j, added)
        if best is None:
            break
        _, name, j, added = best
        at[name] = j
        total += added
    by_name = {o.name: o for o in options}
    return {name: by_name[name].choices[j][0] for name, j in at.items()}


def choose_bits(prep: Prepared, sharer: _Sharer, scan: BitsScan, budget: float) -> tuple[dict[str, int], list[dict]]:
    """Per-layer bits whose combined model keeps the paired upper bound of the drop within ``budget``; each
    miss caps the chosen layer that was most damaging alone at more bits, and allocates again."""
    evaluator = prep.evaluator("heldout", sharer.options.threads)
    options = {info.name: _Options(info, scan.curve(info.name)) for info in scan.layers}
    upper_alone = {(r.layer, r.bits): (r.drop_high or 0.0, r.drop_points or 0.0) for r in scan.rows}
    rounds: list[dict] = []
    for _ in range(sharer.options.max_rounds):
        bits = allocate(list(options.values()), budget)
        if not any(bits.values()):
            break
        v = evaluator.score(sharer.build_combined(bits))
        p = v.paired
        upper = p.upper_points if p is not None else float("inf")
        rounds.append({"bits": dict(bits), "drop_points": p.drop_points if p else None, "drop_upper": upper,
                       "accepted": upper <= budget})
        logger.info("bits round %d: %s, drop upper %.3f", len(rounds), bits, upper)
        if upper <= budget:
            return bits, rounds
        worst = max((name for name, b in bits.items() if b), key=lambda n: upper_alone[(n, bits[n])])
        kept = options[worst]
        kept.choices = [c for c in kept.choices if c[0] == 0 or c[0] > bits[worst]]
    last = rounds[-1] if rounds else None
    tried = f" (last tried {last['bits']}: upper bound {last['drop_upper']:.2f} points)" if last else ""
    raise VerificationGateError(f"no per-layer bits keep the paired upper bound of the accuracy drop within "
                                f"--max-accuracy-drop {budget:g}{tried}; nothing written")


def bits_analysis(model: str | Path, calib: str, calibration: CalibrationSettings, labels: str | None,
                  options: BitsOptions, progress: Progress | None = None) -> BitsResult:
    """Scan every layer at every width; with a budget, choose per-layer bits and build the model."""
    if options.max_accuracy_drop is not None and labels is None:
        raise OptionError("--max-accuracy-drop needs --labels KEY (the labels array in the calibration data)")
    prep = prepare(model, calib, Recipe(calibration=calibration), labels)
    if prep.source is None:
        raise OptionError("give --calib DATA")
    if options.max_accuracy_drop is not None:
        require_budget_support(prep, options.max_accuracy_drop, None)
    if options.method == "int":
        return BitsResult(scan_bits(prep, _IntRounder(prep), options, progress))
    sharer = _Sharer(prep, options, calibration)
    scan = scan_bits(prep, sharer, options, progress)
    if options.max_accuracy_drop is None:
        return BitsResult(scan)
    bits, rounds = choose_bits(prep, sharer, scan, options.max_accuracy_drop)
    return BitsResult(scan, _final(model, calib, labels, options, sharer, bits, rounds))


def _final(model, calib, labels: str | None, options: BitsOptions, sharer: _Sharer, bits: dict[str, int],
           rounds: list[dict]) -> BitsChoice:
    """The chosen bits built, verified and gated by ``optimize`` with their recipe (what a replay runs)."""
    recipe = sharer.recipe(bits)
    result = optimize(model, calib, OptimizeOptions(recipe, labels=labels, max_accuracy_drop=options.max_accuracy_drop,
                                                    threads=options.threads, latency=options.latency))
    return BitsChoice(dict(sharer.options_for(bits).layers), recipe, result.model, result.report,
                      tuple(rounds))


__all__ = ["LayerQuantizer", "METHODS", "int_rounded", "scan_layers",
           "BitsOptions", "BitsRow", "BitsScan", "BitsChoice", "BitsResult", "LayerInfo", "COLUMNS", "DEFAULT_BITS",
           "parse_bits", "scan_bits", "allocate", "choose_bits", "bits_analysis"]
