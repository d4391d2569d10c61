"""External weights mapped from their files instead of read into memory.

A model loaded with external data keeps its weights in its data files: every top-level external
initializer becomes a read-only ``np.memmap`` (the graph constant's values) and its ``TensorProto`` a
*mapped reference*: external, with the file's absolute path as location. Such references live only in
this process; nothing writes them to a file:

* protos exported with references (``model_io.to_model_proto(..., keep_mapped=True)``) hold no copy
  of an unchanged weight;
* onnxruntime maps the data files itself (references made relative to the input's folder, which the
  session is told) — :func:`relative_references`;
* saving copies the bytes file to file, a chunk at a time (:func:`copy_bytes`);
* the model counter reads a mapped tensor when it needs values (:func:`tensor_array`).

A weight a pass changes is an ordinary array and is exported inline like any other. Memory for a model
with external data is then about one copy of its weights (the mapped pages plus onnxruntime's packed
weights) instead of the four that loading, exporting and serialising each made.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from .graph_edit import node_bodies

MARK = "_lincomp_reference"  # attribute of a mapped array: its reference TensorProto
_CHUNK = 64 << 20


class MappedValues(LazyValues):
    """A constant's values that are a mapped file region; graphsurgeon exports the reference as is."""

    def __init__(self, tensor: TensorProto, array: np.ndarray):
        super().__init__(tensor)
        self.array = array

    def load(self) -> np.ndarray:
        return self.array


def _info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _location(t: TensorProto):
    """The ``location`` entry of an external tensor (to rewrite in place)."""
    return next(e for e in t.external_data if e.key == "location")


def mapped_array(values) -> np.ndarray | None:
    """The mapped array behind a constant's values (lazy or loaded), None when they are not mapped."""
    array = values.array if isinstance(values, MappedValues) else values
    return array if getattr(array, MARK, None) is not None else None


def as_reference(array: np.ndarray) -> MappedValues:
    """Values that graphsurgeon exports as the array's reference, not its bytes."""
    return MappedValues(getattr(array, MARK), array)


def is_mapped(t: TensorProto) -> bool:
    """An external tensor whose location is absolute: a reference made by :func:`map_external`."""
    return t.data_location == TensorProto.EXTERNAL and os.path.isabs(_info(t).get("location", ""))


def tensor_array(t: TensorProto) -> np.ndarray:
    """A tensor's values: mapped from its file for a mapped reference, else onnx's own conversion."""
    if not is_mapped(t):
        return numpy_helper.to_array(t)
    info = _info(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    shape = tuple(int(d) for d in t.dims)
    array = np.memmap(info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape)
    setattr(array, MARK, t)
    return array


def mappable(t: TensorProto) -> bool:
    """External, non-empty, of a dtype numpy maps (bfloat16 and 4-bit types are read the usual way)."""
    if t.data_location != TensorProto.EXTERNAL or not all(int(d) > 0 for d in t.dims):
        return False
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, TypeError):
        return False
    if t.data_type == TensorProto.BFLOAT16 or dtype.kind not in "fiub":
        return False
    length = _info(t).get("length")
    return length is None or int(length) == dtype.itemsize * int(np.prod(t.dims, dtype=np.int64))


def map_external(model: onnx.ModelProto, base: Path) -> dict[str, np.ndarray]:
    """Turn every mappable external top-level initializer of ``model`` (read without its data) into a mapped
    reference (location made absolute, in place) and return name -> mapped array. Other external tensors
    (unmappable dtypes, subgraph initializers, Constant node attributes) are read into the proto."""
    arrays: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        if not mappable(t):
            _read_into(t, base)
            continue
        entry = _location(t)
        entry.value = str((base / entry.value).resolve())
        arrays[t.name] = tensor_array(t)
    for t in _nested_tensors(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            _read_into(t, base)
    return arrays


def _read_into(t: TensorProto, base: Path) -> None:
    onnx.external_data_helper.load_external_data_for_tensor(t, str(base))
    t.data_location = TensorProto.DEFAULT
    del t.external_data[:]


def all_tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers, Constant-style attributes, and those of every subgraph."""
    yield from graph.initializer
    yield from _nested_tensors(graph)


def _nested_tensors(graph: onnx.GraphProto):
    """The tensors of a graph's node attributes and subgraphs (not its own initializers)."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_tensors(g)


def _subgraphs(graph):
    """The graphsurgeon graphs nested in ``graph``'s node attributes (If/Loop/Scan bodies), recursively."""
    for node in graph.nodes:
        for sub in node_bodies(node):
            yield sub
            yield from _subgraphs(sub)


def attach(graph, arrays: dict[str, np.ndarray]) -> None:
    """Give the graph's constants their mapped arrays (lazily: the reference is what export writes), also
    where only an If/Loop/Scan body reads a top-level weight."""
    for g in (graph, *_subgraphs(graph)):
        for tensor in g.tensors().values():
            array = arrays.get(tensor.name)
            if array is not None and isinstance(getattr(tensor, "_values", None), LazyValues):
                tensor._values = as_reference(array)
                tensor.data_location = None  # exported inline unless kept as a reference


def release(graph) -> int:
    """Map every unchanged mapped constant afresh, so the pages the old mappings read in (a NaN check, a
    pass reading weights) leave this process's resident memory; they stay in the page cache. Returns the
    number of constants remapped."""
    count = 0
    for tensor in mapped_constants(graph):
        tensor._values = as_reference(tensor_array(getattr(mapped_array(tensor._values), MARK)))
        count += 1
    return count


def inline_subgraph_weights(graph) -> None:
    """Constants read inside If/Loop/Scan bodies export with their values: a reference there would reach a
    saved file (only top-level initializers are written file to file) or onnxruntime's subgraph checks."""
    for sub in _subgraphs(graph):
        for tensor in sub.tensors().values():
            values = getattr(tensor, "_values", None)
            if isinstance(values, MappedValues):
                tensor._values = values.array


def mapped_constants(graph) -> list:
    """Constants whose values are still an unchanged mapped array (loaded or not)."""
    return [t for t in graph.tensors().values() if mapped_array(getattr(t, "_values", None)) is not None]


def relative_references(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str] | None:
    """A copy of ``model`` (small: references hold no data) whose mapped references are relative to one
    folder, and that folder; None when it has none. onnxruntime, told the folder
    (``session.model_external_initializers_file_folder_path``), maps the data files itself."""
    mapped = [t for t in model.graph.initializer if is_mapped(t)]
    if not mapped:
        return None
    folder = os.path.commonpath([os.path.dirname(_info(t)["location"]) for t in mapped])
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:
        if is_mapped(t):
            entry = _location(t)
            entry.value = os.path.relpath(entry.value, folder)
    return light, folder


def copy_bytes(t: TensorProto, out) -> int:
    """Append a mapped reference's bytes to the open file ``out``; returns the byte count."""
    info = _info(t)
    length = int(info.get("length", 0)) or nbytes(t)
    with open(info["location"], "rb") as src:
        src.seek(int(info.get("offset", 0)))
        left = length
        while left:
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise OSError(f"{info['location']}: external data of '{t.name}' ends early")
            out.write(chunk)
            left -= len(chunk)
    return length


def nbytes(t: TensorProto) -> int:
    """Bytes of a tensor's values without reading them."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError):
        itemsize = 4
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize
