"""Store a weight as packed codebook indices plus a float codebook, expanded by a few constant-foldable ops.

``weight = Gather(codebook, indices)``: the file holds ``b`` bits per weight and ``2^b`` floats per layer,
and onnxruntime folds the expansion back into a plain float initializer when the session starts (its
constant folding runs every node whose inputs are all constants), so the model runs at float speed.

Three layouts, by bit width and opset:

* ``uint8`` (8 bits): the indices as a ``uint8`` tensor of the weight's shape; ``Cast`` -> ``Gather``.
* ``uint4`` (4 bits, opset >= 21): ONNX's 4-bit type, two indices a byte; ``Cast`` -> ``Gather``.
* ``packed`` (any other width, or 4 bits below opset 21): blocks of ``V`` indices in ``Bb`` bytes
  (``V * b = 8 * Bb``: 1, 2, 4 bits pack 8, 4, 2 indices a byte; 3, 6 bits 8 or 4 in 3 bytes; 5, 7 bits
  8 in 5 or 7 bytes). Value ``v`` of a block is bits ``[v b, (v + 1) b)`` of the block's little-endian
  word ``sum_j byte_j 256^j``. The graph rebuilds the word (``Cast`` to int64, ``Mul`` by ``256^j``,
  ``ReduceSum`` over the bytes, skipped when ``Bb = 1``; 7-bit blocks are read as two 4-byte windows,
  since onnxruntime sums int64 through doubles, exact only to 2^53), splits it (``Div`` by ``2^(v b)``, then ``Mod
  2^b``; ``Div``/``Mul``/``Sub`` below opset 10), appends the ``n mod V`` indices left over (``Concat``),
  reshapes to the weight's shape and gathers. Integer ``Div``/``Mul``/``Sub`` exist from opset 7, so
  the layout works for every model from opset 7 on.

Constants shared by every layer of one bit width (shifts, moduli) are created once per emitter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..graph_edit import NameSource

Layout = Literal["uint8", "uint4", "packed"]
MIN_PACKED_OPSET = 7
MIN_UINT4_OPSET = 21


def block_shape(bits: int) -> tuple[int, int]:
    """(bytes, indices) of one packed block of ``bits``-bit indices."""
    if not 1 <= bits <= 8:
        raise ValueError(f"index width must be 1..8 bits, got {bits}")
    g = math.gcd(bits, 8)
    return bits // g, 8 // g


@dataclass(frozen=True)
class WordWindows:
    """How the graph reads one packed block: byte ``j`` enters window ``w`` with weight ``byte_scale[j, 0, w, 0]``
    (each window spans at most 6 bytes, so onnxruntime's int64 ``ReduceSum``, exact to 2^53, stays exact), and
    value ``u`` of window ``w`` is ``(window_w // divisors[w, u]) mod 2^b``."""

    byte_scale: np.ndarray  # (Bb, 1, windows, 1) int64, or (1,) when Bb = 1
    divisors: np.ndarray  # (windows, V / windows) int64, or (V,) when Bb = 1


def word_windows(bits: int) -> WordWindows:
    nbytes, per = block_shape(bits)
    if nbytes == 1:
        return WordWindows(np.ones(1, dtype=np.int64), 2 ** (bits * np.arange(per, dtype=np.int64)))
    count = 1 if nbytes <= 6 else 2
    each = per // count
    scale = np.zeros((nbytes, 1, count, 1), dtype=np.int64)
    divisors = np.zeros((count, each), dtype=np.int64)
    for w in range(count):
        first = (w * each * bits) // 8
        last = -(-((w + 1) * each * bits) // 8)
        scale[first:last, 0, w, 0] = 256 ** np.arange(last - first, dtype=np.int64)
        divisors[w] = 2 ** ((w * each + np.arange(each)) * bits - 8 * first)
    return WordWindows(scale, divisors)


def pack_indices(indices: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks ``uint8 (Bb, B, 1)``, the ``n mod V`` indices left over ``uint8``) of the flattened ``indices``."""
    flat = np.asarray(indices).ravel().astype(np.uint64)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"indices do not fit {bits} bits")
    nbytes, per = block_shape(bits)
    blocks = flat.size // per
    head = flat[: blocks * per].reshape(blocks, per)
    word = np.zeros(blocks, dtype=np.uint64)
    for v in range(per):
        word |= head[:, v] << np.uint64(bits * v)
    packed = np.stack([(word >> np.uint64(8 * j)) & np.uint64(0xFF) for j in range(nbytes)]).astype(np.uint8)
    return packed.reshape(nbytes, blocks, 1), flat[blocks * per:].astype(np.uint8)


def unpack_indices(packed: np.ndarray, tail: np.ndarray, bits: int) -> np.ndarray:
    """The flat indices :func:`pack_indices` packed (what the emitted graph computes), as int64."""
    nbytes, per = block_shape(bits)
    p = np.asarray(packed, dtype=np.int64).reshape(nbytes, -1)
    word = (p * (256 ** np.arange(nbytes, dtype=np.int64))[:, None]).sum(axis=0)
    values = (word[:, None] // (1 << (bits * np.arange(per, dtype=np.int64)))) % (1 << bits)
    return np.concatenate([values.reshape(-1), np.asarray(tail, dtype=np.int64)])


def layout_for(bits: int, opset: int) -> Layout | None:
    """The storage of ``bits``-bit indices in a model of default-domain ``opset`` (None: not possible)."""
    if bits == 8:
        return "uint8"
    if bits == 4 and opset >= MIN_UINT4_OPSET:
        return "uint4"
    return "packed" if opset >= MIN_PACKED_OPSET else None


def index_storage_bytes(size: int, bits: int, opset: int) -> int:
    """Bytes the indices of a ``size``-element weight take in the layout :func:`layout_for` picks."""
    layout = layout_for(bits, opset)
    if layout == "uint8" or layout is None:
        return size
    if layout == "uint4":
        return (size + 1) // 2
    nbytes, per = block_shape(bits)
    return (size // per) * nbytes + size % per


@dataclass(frozen=True)
class EmittedWeight:
    """The tensor that now feeds the layer and what its storage costs."""

    tensor: gs.Variable
    layout: Layout
    index_bytes: int
    codebook_bytes: int
    nodes: int


class CodebookEmitter:
    """Adds codebook-expansion subgraphs to one graph (constants shared between layers of one width)."""

    def __init__(self, graph: gs.Graph, names: NameSource, opset: int):
        self.graph, self.names, self.opset = graph, names, opset
        self._shared: dict[tuple, gs.Constant] = {}
        self._count = 0

    def _const(self, key: tuple, base: str, values: np.ndarray) -> gs.Constant:
        if key not in self._shared:
            self._shared[key] = gs.Constant(self.names.fresh(base), np.ascontiguousarray(values))
        return self._shared[key]

    def _node(self, op: str, base: str, inputs: list, dtype, shape=None, output: str | None = None,
              **attrs) -> gs.Variable:
        """One node; its output gets a fresh name (or ``output``), which also names the node (short names:
        they are a noticeable part of a small shared model's file)."""
        self._count += 1
        out = gs.Variable(output or self.names.fresh(f"{base}_{self._count}"), dtype=dtype, shape=shape)
        self.graph.nodes.append(gs.Node(op, out.name, attrs, inputs, [out]))
        return out

    def emit(self, base: str, codebook: np.ndarray, indices: np.ndarray, bits: int,
             output: str | None = None) -> EmittedWeight:
        """``Gather(codebook, indices)`` as a tensor of ``indices``' shape, the indices stored in ``bits`` bits.
        ``base`` prefixes the new names; ``output`` names the weight tensor (the caller guarantees it is free)."""
        layout = layout_for(bits, self.opset)
        self._count = 0
        if layout is None:
            raise ValueError(f"codebook storage needs opset >= {MIN_PACKED_OPSET} (model: {self.opset})")
        idx = np.asarray(indices)
        book = gs.Constant(self.names.fresh(f"{base}_c"), np.ascontiguousarray(codebook))
        before = len(self.graph.nodes)
        if layout == "packed":
            flat = self._unpack(base, idx, bits)
        else:
            name = self.names.fresh(f"{base}_i")
            stored = (gs.Constant(name, idx.astype(np.uint8)) if layout == "uint8"
                      else _uint4_constant(name, idx))
            flat = self._node("Cast", base, [stored], np.int64, idx.shape, to=onnx.TensorProto.INT64)
        out = self._node("Gather", base, [book, flat], codebook.dtype, idx.shape, output, axis=0)
        return EmittedWeight(out, layout, index_storage_bytes(idx.size, bits, self.opset), int(codebook.nbytes),
                             len(self.graph.nodes) - before)

    def _unpack(self, base: str, idx: np.ndarray, bits: int) -> gs.Variable:
        """The graph that turns packed blocks back into int64 indices of ``idx``'s shape."""
        nbytes, per = block_shape(bits)
        packed, tail = pack_indices(idx, bits)
        i64 = np.int64
        windows = word_windows(bits)
        blocks = packed.reshape(-1, 1) if nbytes == 1 else packed.reshape(nbytes, -1, 1, 1)
        x = self._node("Cast", base, [gs.Constant(self.names.fresh(f"{base}_i"), blocks)], i64,
                       blocks.shape, to=onnx.TensorProto.INT64)
        if nbytes > 1:
            scale = self._const(("scale", bits), f"cb_bytes{bits}", windows.byte_scale)
            x = self._node("Mul", base, [x, scale], i64)
            if self.opset >= 13:
                axes = self._const(("axes0",), "cb_axes0", np.array([0], dtype=i64))
                x = self._node("ReduceSum", base, [x, axes], i64, keepdims=0)
            else:
                x = self._node("ReduceSum", base, [x], i64, axes=[0], keepdims=0)
        shifts = self._const(("shift", bits), f"cb_shift{bits}", windows.divisors)
        x = self._node("Div", base, [x, shifts], i64)
        modulus = self._const(("mod", bits), f"cb_mod{bits}", np.array(1 << bits, dtype=i64))
        if self.opset >= 10:
            x = self._node("Mod", base, [x, modulus], i64)
        else:
            hi = self._node("Mul", base, [self._node("Div", base, [x, modulus], i64), modulus], i64)
            x = self._node("Sub", base, [x, hi], i64)
        if tail.size:
            flat = self._const(("flat",), "cb_flat", np.array([-1], dtype=i64))
            x = self._node("Reshape", base, [x, flat], i64)
            rest = self._node("Cast", base, [gs.Constant(self.names.fresh(f"{base}_t"), tail)], i64,
                              tail.shape, to=onnx.TensorProto.INT64)
            x = self._node("Concat", base, [x, rest], i64, axis=0)
        shape = self._const(("shape", idx.shape), f"{base}_s", np.array(idx.shape, dtype=i64))
        return self._node("Reshape", base, [x, shape], i64, idx.shape)


class Uint4Constant(gs.Constant):
    """A UINT4 initializer kept as its TensorProto (two indices a byte). graphsurgeon exports a constant
    that still holds its ``LazyValues`` as the stored proto, but reading ``values`` would replace it by a
    one-byte-per-index array that it cannot export: this constant reads without replacing."""

    @property
    def values(self):
        return self._values.load() if isinstance(self._values, LazyValues) else self._values

    @values.setter
    def values(self, values):
        self._values = values

    def copy(self):
        return Uint4Constant(self.name, self._values)


def _uint4_constant(name: str, idx: np.ndarray) -> gs.Constant:
    import ml_dtypes

    return Uint4Constant(name, LazyValues(onnx.numpy_helper.from_array(idx.astype(np.uint8).astype(ml_dtypes.uint4),
                                                                       name)))


__all__ = ["Layout", "EmittedWeight", "CodebookEmitter", "block_shape", "pack_indices", "unpack_indices",
           "layout_for", "index_storage_bytes", "word_windows", "Uint4Constant"]
