"""Streamed second moments of a linear layer's input (and its cross moments with a target output).

A linear layer computes ``y = W x + b`` on *rows*: a Gemm/MatMul row is one feature vector (every
leading axis flattened), a Conv row is one receptive field (``im2col``: input channel ``c`` and kernel
offset ``k`` are column ``c * K + k``, the order of ``W.reshape(out, -1)``), sampled at a few output
positions per sample. With ``x~ = [x, 1]`` the accumulators are

* ``G = sum x~ x~^T`` (``cols + 1`` square): what every least-squares refit and every output-error
  estimate needs (``||(W - W') x||^2`` summed over rows is ``tr((W - W') G (W - W')^T)``);
* ``C = sum x~ y^T`` when a target ``y`` is given (the original layer's output at the same rows, so
  that a refit on a changed input corrects the error the upstream changes made);
* per-column sums of ``|x|``.

:func:`refit` solves the ridge-regularised least squares ``min ||Y - X_K W'^T - b'||^2 + lam ||W'||^2``
over a kept column set ``K`` from these sums alone (the bias is never penalised).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from ..linear_layer import LinearLayer

DEFAULT_POSITIONS = 64  # receptive fields sampled per sample of a Conv input


@dataclass(frozen=True)
class RowPick:
    """Which output elements the sampled rows correspond to (to take the target at the same places)."""

    sample: np.ndarray  # sample index of each row
    position: tuple[np.ndarray, ...] | None  # Conv: output spatial index of each row per axis; None: flat rows


def conv_rows(layer: LinearLayer, x: np.ndarray, rng: np.random.Generator,
              positions: int = DEFAULT_POSITIONS) -> tuple[np.ndarray, RowPick]:
    """``im2col`` rows of a (group-1) Conv input ``x`` (``N, C, *spatial``) at sampled output positions."""
    a = layer.conv_attrs
    nd = x.ndim - 2
    k = [int(v) for v in a["kernel_shape"]]
    s, d = [int(v) for v in a["strides"]], [int(v) for v in a["dilations"]]
    pads = [int(v) for v in a["pads"]] or [0] * 2 * nd
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)])
    out = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    total = int(np.prod(out))
    per = min(positions, total)
    flat = np.concatenate([rng.choice(total, per, replace=False) for _ in range(x.shape[0])])
    sample = np.repeat(np.arange(x.shape[0]), per)
    where = np.unravel_index(flat, out)
    index: list[np.ndarray] = [sample.reshape((-1,) + (1,) * nd)]
    for i in range(nd):
        shape = [1] * nd
        shape[i] = k[i]
        index.append((where[i] * s[i]).reshape((-1,) + (1,) * nd) + (np.arange(k[i]) * d[i]).reshape([1] + shape))
    # advanced indices around the channel slice: the result is (rows, *kernel, C)
    patches = xp[(index[0], slice(None), *index[1:])] if nd else xp[:, :]
    patches = np.moveaxis(patches, -1, 1)
    return patches.reshape(patches.shape[0], -1), RowPick(sample, tuple(where))


def dense_rows(x: np.ndarray, rng: np.random.Generator, cap: int | None = None) -> tuple[np.ndarray, RowPick]:
    """Rows of a Gemm/MatMul input (features on the last axis, every other axis flattened), at most ``cap``."""
    rows = x.reshape(-1, x.shape[-1])
    pick = np.arange(rows.shape[0])
    if cap is not None and rows.shape[0] > cap:
        pick = np.sort(rng.choice(rows.shape[0], cap, replace=False))
    return rows[pick], RowPick(pick, None)


def layer_rows(layer: LinearLayer, x: np.ndarray, rng: np.random.Generator,
               positions: int = DEFAULT_POSITIONS) -> tuple[np.ndarray, RowPick]:
    """The rows ``layer`` multiplies by its weight, from its input tensor ``x``."""
    if layer.kind == "conv":
        return conv_rows(layer, x, rng, positions)
    lead = int(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1
    return dense_rows(x, rng, cap=x.shape[0] * min(lead, positions))


def target_rows(y: np.ndarray, pick: RowPick, channel_axis: int = 1) -> np.ndarray:
    """The layer output ``y`` at the rows ``pick`` chose (``rows x out``)."""
    if pick.position is None:
        return y.reshape(-1, y.shape[-1])[pick.sample]
    return np.moveaxis(y, channel_axis, -1)[(pick.sample, *pick.position)]


FLUSH_ROWS = 4096  # rows buffered before one matrix product (many small products are slow) ...
FLUSH_BYTES = 16 << 20  # ... or this many bytes of them (wide Conv rows), so buffers stay small


@dataclass
class Moments:
    """Running ``G = sum x~ x~^T``, ``C = sum x~ y^T`` (when targets are given) and ``sum |x|`` over rows.

    Rows are buffered and folded in by one product per :data:`FLUSH_ROWS` rows (at most
    :data:`FLUSH_BYTES`); reading ``gram`` or ``cross`` folds in what is pending.
    """

    cols: int
    rows: int = 0
    _gram: np.ndarray = field(init=False, repr=False)
    _cross: np.ndarray | None = field(init=False, repr=False)
    abs_sum: np.ndarray = field(init=False, repr=False)
    _pending: list = field(init=False, repr=False)
    _pending_y: list = field(init=False, repr=False)
    _pending_rows: int = field(init=False, repr=False)

    def __post_init__(self):
        self._gram = np.zeros((self.cols + 1, self.cols + 1))
        self._cross = None
        self.abs_sum = np.zeros(self.cols)
        self._pending, self._pending_y, self._pending_rows = [], [], 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        if (y is None) != (not self._pending_y) and self._pending:
            self._flush()
        self._pending.append(np.asarray(x))
        if y is not None:
            self._pending_y.append(np.asarray(y))
        self._pending_rows += int(x.shape[0])
        self.abs_sum += np.abs(x).sum(axis=0)
        self.rows += int(x.shape[0])
        if self._pending_rows >= FLUSH_ROWS or self._pending_rows * (self.cols + 1) * 8 >= FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        x = np.concatenate(self._pending, axis=0)
        xa = np.empty((x.shape[0], self.cols + 1))
        xa[:, :-1] = x
        xa[:, -1] = 1.0
        self._gram += xa.T @ xa
        if self._pending_y:
            y = np.concatenate(self._pending_y, axis=0).astype(np.float64, copy=False)
            if self._cross is None:
                self._cross = np.zeros((self.cols + 1, y.shape[1]))
            self._cross += xa.T @ y
        self._pending, self._pending_y, self._pending_rows = [], [], 0

    @property
    def gram(self) -> np.ndarray:
        self._flush()
        return self._gram

    @property
    def cross(self) -> np.ndarray | None:
        self._flush()
        return self._cross

    @cross.setter
    def cross(self, value: np.ndarray | None) -> None:
        self._flush()
        self._cross = value

    @property
    def mean(self) -> np.ndarray:
        return self.gram[-1, :-1] / max(self.rows, 1)

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    @property
    def second(self) -> np.ndarray:
        """Per-column ``E[x^2]``."""
        return np.diag(self.gram)[:-1] / max(self.rows, 1)


def refit(moments: Moments, keep: np.ndarray, weight: np.ndarray, bias: np.ndarray,
          ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """``(W', b')`` over the kept columns ``keep`` (``out x |K|``, ``out``) minimising the squared error.

    ``weight`` (``out x cols``) and ``bias`` are the layer's current parameters. The target is the
    accumulated ``C`` when the moments have one, otherwise the layer's own output ``W x + b`` on the same
    rows (``C = G [W^T; b^T]``). The ridge term pulls ``W'`` towards the current ``W_K`` (not towards 0):
    ``min ||Y - X_K W'^T - b'||^2 + lam ||W' - W_K||^2``, so that columns that carried nothing (dead
    channels) give back ``W_K`` exactly; ``lam`` is ``ridge`` times the mean diagonal of ``G_KK``.
    """
    g = moments.gram
    w = np.asarray(weight, dtype=np.float64)
    full = np.vstack([w.T, np.asarray(bias, dtype=np.float64)[None, :]])
    cross = moments.cross if moments.cross is not None else g @ full
    if cross.shape[1] != w.shape[0]:
        raise ValueError(f"refit: target has {cross.shape[1]} outputs, the layer {w.shape[0]}")
    k = np.concatenate([np.asarray(keep, dtype=np.int64), [moments.cols]])
    gk = g[np.ix_(k, k)].copy()
    lam = ridge * max(float(np.mean(np.diag(gk)[:-1])) if k.size > 1 else 0.0, 1e-12)
    diag = np.arange(k.size - 1)
    gk[diag, diag] += lam
    rhs = cross[k].copy()
    rhs[:-1] += lam * w[:, k[:-1]].T
    try:
        sol = np.linalg.solve(gk, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(gk, rhs, rcond=None)[0]
    return sol[:-1].T, sol[-1]




MOMENT_BUDGET_BYTES = 512 << 20  # second-moment matrices accumulated in one data pass


def moment_columns(layer: LinearLayer) -> int:
    """Columns of ``layer``'s rows: input features, or ``C_in * K`` receptive-field entries of a Conv."""
    return int(np.prod(layer.shape[1:], dtype=np.int64)) if layer.kind == "conv" else int(layer.shape[1])


def collect_layer_moments(graph, data, layers: list[LinearLayer], reference=None, seed: int = 0,
                          positions: int = DEFAULT_POSITIONS, progress=None, own_targets: bool = False
                          ) -> dict[str, Moments]:
    """:class:`Moments` of every layer's input on the calibration data, keyed by the layer's head node name.

    ``reference`` (a model whose tensors carry the same names): the target of each layer is its output
    there (the cross moments ``C``); ``own_targets``: its output in ``graph`` itself, read in the same
    run; else there is none. Layers are taken in chunks whose matrices fit :data:`MOMENT_BUDGET_BYTES`,
    one data pass per chunk. A layer's sampled rows depend on ``seed`` and its name only, not on which
    other layers share its chunk, so the same layer gets the same moments in any call. Grouped Convs
    are not supported (their rows are per group): the caller leaves them out.
    """
    if reference is not None and own_targets:
        raise ValueError("collect_layer_moments: give a reference model or own_targets, not both")
    out: dict[str, Moments] = {}
    chunk: list[LinearLayer] = []
    size = 0
    for layer in layers:
        need = 8 * (moment_columns(layer) + 1) * (moment_columns(layer) + 1 + layer.out_features)
        if chunk and size + need > MOMENT_BUDGET_BYTES:
            out.update(_collect_chunk(graph, data, chunk, reference, seed, positions, progress, own_targets))
            chunk, size = [], 0
        chunk.append(layer)
        size += need
    if chunk:
        out.update(_collect_chunk(graph, data, chunk, reference, seed, positions, progress, own_targets))
    return out


def _collect_chunk(graph, data, layers: list[LinearLayer], reference, seed: int, positions: int,
                   progress, own_targets: bool) -> dict[str, Moments]:
    inputs = [layer.input.name for layer in layers]
    outs = [layer.output.name for layer in layers] if reference is not None or own_targets else []
    moments = {layer.nodes[0].name: Moments(moment_columns(layer)) for layer in layers}
    rngs = {key: np.random.default_rng([seed, zlib.crc32(key.encode())]) for key in moments}
    stream = data.stream(graph, inputs + outs if own_targets else inputs, progress)
    targets = data.stream(reference, outs) if reference is not None and outs else None
    for values in stream:
        ref = next(targets) if targets is not None else values
        for layer in layers:
            key = layer.nodes[0].name
            x = np.asarray(values[layer.input.name], dtype=np.float64)
            rows, pick = layer_rows(layer, x, rngs[key], positions)
            y = None
            if outs:
                y = target_rows(np.asarray(ref[layer.output.name], dtype=np.float64), pick,
                                1 if layer.kind == "conv" else -1)
            moments[key].add(rows, y)
    return moments


__all__ = ["Moments", "RowPick", "conv_rows", "dense_rows", "layer_rows", "target_rows", "refit", "moment_columns",
           "collect_layer_moments"]
