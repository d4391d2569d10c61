"""What unstructured sparsity saves on disk: the model file dense, zipped, and with sparse initializers.

Zeros inside a dense tensor cost as much as any other value: onnxruntime runs a pruned model no faster
and the ``.onnx`` file is no smaller. Two forms store them cheaper:

* **zipped**: the serialized model through zlib (deflate, level 6, what ``zip`` does); runs of zeros and
  repeated values compress, the rest barely does;
* **sparse initializers**: every floating-point initializer for which it is smaller is stored as an ONNX
  ``SparseTensorProto`` in ``graph.sparse_initializer`` (the non-zero values and their flat ``int64``
  positions, the only index type the ONNX checker accepts: 4 + 8 bytes per non-zero float32, so it pays
  off above 2/3 sparsity). onnxruntime (checked with 1.32) loads such a model, turning the sparse
  initializers back into dense tensors at load time: memory and speed are those of the dense model.
  :func:`storage_sizes` tries the load and reports whether it worked. ``onnx.checker`` accepts the model,
  but its ``full_check`` shape inference does not see sparse initializers.

Models whose tensors approach protobuf's 2 GiB limit are measured tensor by tensor (the zipped size then
covers the initializers and nodes, the sparse size is the dense size less what each converted tensor
saves) and the load is not tried.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import LincompError
from ..model_io import PROTO_LIMIT_BYTES, model_size_bytes, tensor_bytes
from ..runtime.session import SessionOptions, open_session

ZLIB_LEVEL = 6
INDEX_BYTES = 8  # int64 positions
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class StorageSizes:
    """File sizes of one model in three forms, and whether onnxruntime loads the sparse one."""

    dense_bytes: int
    zipped_bytes: int
    sparse_bytes: int
    sparse_tensors: int  # initializers stored as SparseTensorProto in the sparse form
    sparse_loads: bool | None  # None: not tried (nothing to convert, or too large)
    sparse_error: str | None = None

    def as_dict(self) -> dict:
        return {"dense_bytes": self.dense_bytes, "zipped_bytes": self.zipped_bytes, "sparse_bytes": self.sparse_bytes,
                "sparse_tensors": self.sparse_tensors, "sparse_loads": self.sparse_loads,
                "sparse_error": self.sparse_error}


def sparse_form(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """``tensor`` as a sparse tensor (flat int64 positions) when that is smaller; None otherwise."""
    if tensor.data_type not in _FLOATS or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    values = numpy_helper.to_array(tensor)
    where = np.flatnonzero(values)
    if where.size * (values.itemsize + INDEX_BYTES) >= values.size * values.itemsize:
        return None
    kept = numpy_helper.from_array(values.reshape(-1)[where], tensor.name)
    return helper.make_sparse_tensor(kept, numpy_helper.from_array(where.astype(np.int64), ""), list(values.shape))


def with_sparse_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose main-graph initializers are sparse where that is smaller, and how many are."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.initializer[:]
    converted = 0
    for t in model.graph.initializer:
        sparse = sparse_form(t)
        if sparse is None:
            out.graph.initializer.add().CopyFrom(t)
        else:
            out.graph.sparse_initializer.append(sparse)
            converted += 1
    return out, converted


def _zipped_bytes(model: onnx.ModelProto, large: bool) -> int:
    if not large:
        return len(zlib.compress(model.SerializeToString(), ZLIB_LEVEL))
    z = zlib.compressobj(ZLIB_LEVEL)
    n = sum(len(z.compress(t.SerializeToString())) for t in model.graph.initializer)
    n += sum(len(z.compress(node.SerializeToString())) for node in model.graph.node)
    return n + len(z.flush())


def _loads(model: onnx.ModelProto) -> str | None:
    """None when onnxruntime opens ``model``, else its message."""
    try:
        open_session(model, options=SessionOptions(optimize=False, threads=1))
    except LincompError as exc:
        return str(exc)
    return None


def storage_sizes(model: onnx.ModelProto, check_load: bool = True) -> StorageSizes:
    """Sizes of ``model`` as a dense file, zipped and with sparse initializers; tries loading the sparse form."""
    dense = model_size_bytes(model)
    large = tensor_bytes(model) >= PROTO_LIMIT_BYTES // 2
    zipped = _zipped_bytes(model, large)
    if large:
        saved, converted = 0, 0
        for t in model.graph.initializer:
            sparse = sparse_form(t)
            if sparse is not None:
                saved += t.ByteSize() - sparse.ByteSize()
                converted += 1
        return StorageSizes(dense, zipped, dense - saved, converted, None)
    sparse_model, converted = with_sparse_initializers(model)
    if not converted:
        return StorageSizes(dense, zipped, dense, 0, None)
    error = _loads(sparse_model) if check_load else None
    return StorageSizes(dense, zipped, sparse_model.ByteSize(), converted,
                        (error is None) if check_load else None, error)


__all__ = ["StorageSizes", "storage_sizes", "sparse_form", "with_sparse_initializers"]
