"""The pass pipeline: runs passes in order, owns cleanup/toposort, timing, statistics bookkeeping and
fixed-point repetition, and names the failing pass (and those already run) on error."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from .errors import LincompError, PassError
from .graph_edit import refresh_shapes
from .passes import (PASSES, FoldLinearOptions, FoldLinearRelu, MergeAffine, PassContext, PassResult, RemoveDeadNeurons,
                     RemoveDeadOptions)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassRecord:
    result: PassResult
    params_before: int
    params_after: int
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.result.as_dict(), params_before=self.params_before, params_after=self.params_after,
                    seconds=self.seconds)


def count_params(graph: gs.Graph) -> int:
    """Floating-point constants read by at least one node (weights and biases)."""
    total = 0
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and t.outputs and np.asarray(t.values).dtype.kind == "f":
            total += int(np.asarray(t.values).size)
    return total


def build_pass(name: str, layer_threshold, channel_multiple: int = 1):
    if name not in PASSES:
        raise LincompError(f"unknown pass '{name}' (known: {', '.join(PASSES)})")
    if name == FoldLinearRelu.name:
        return FoldLinearRelu(FoldLinearOptions(layer_threshold=layer_threshold))
    if name == RemoveDeadNeurons.name:
        return RemoveDeadNeurons(RemoveDeadOptions(channel_multiple=channel_multiple))
    return MergeAffine()


def run_passes(graph: gs.Graph, names: tuple[str, ...], ctx: PassContext, layer_threshold="auto",
               max_rounds: int = 3, channel_multiple: int = 1) -> list[PassRecord]:
    """Run ``names`` over ``graph`` (mutated) until nothing changes or ``max_rounds`` is reached."""
    passes = [build_pass(n, layer_threshold, channel_multiple) for n in names]
    records: list[PassRecord] = []
    for round_no in range(max_rounds):
        changed = False
        for p in passes:
            before = count_params(graph)
            start = time.perf_counter()
            try:
                result = p.run(graph, ctx)
                graph.cleanup(remove_unused_graph_inputs=False).toposort()
            except LincompError:
                raise
            except Exception as exc:  # a bug or an unforeseen pattern: name the pass, never half-apply silently
                done = [r.result.name for r in records]
                raise PassError(f"pass '{p.name}' failed ({type(exc).__name__}: {exc}); passes already run: {', '.join(done) or 'none'}") from exc
            if result.changed:
                refresh_shapes(graph)
            if ctx.stats is not None and result.kept:
                ctx = replace(ctx, stats=ctx.stats.subset(result.kept))
            if result.changed or round_no == 0:
                records.append(PassRecord(result, before, count_params(graph), time.perf_counter() - start))
            changed |= result.changed
            logger.info("pass %s: changed=%s in %.3fs", p.name, result.changed, time.perf_counter() - start)
        if not changed:
            break
    return records
