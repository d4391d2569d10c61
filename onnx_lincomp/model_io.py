"""Load and save ONNX models as onnx-graphsurgeon graphs, keeping what graphsurgeon drops.

The working representation of every pass is a ``gs.Graph``. Model-level fields that graphsurgeon does
not carry (metadata_props, model_version, doc strings, opset imports, external-data layout) live in a
frozen :class:`ModelContext` and are put back by :func:`to_model_proto`.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError, EncodeError

from . import mapped_data
from .errors import InvalidModelError, LincompError, OptionError
from .graph_edit import refresh_shapes

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message of 2 GiB or more; above this we always use external data.
PROTO_LIMIT_BYTES = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1024  # tensors larger than this go to the data file when saving externally
LOAD_WEIGHTLESS_ABOVE_BYTES = 2**24  # models with more constant bytes infer shapes on a weightless copy


@dataclass(frozen=True)
class ModelContext:
    """Model-level fields carried around the graph between load and save."""

    source: str | None
    ir_version: int
    producer_name: str
    producer_version: str
    domain: str
    model_version: int
    doc_string: str
    metadata_props: tuple[tuple[str, str], ...]
    opset_imports: tuple[tuple[str, int], ...]
    external_data: bool
    graph_doc_string: str = ""
    initializer_inputs: int = 0  # initializers also listed as graph inputs in the source (dropped on import)
    value_info: bool = False  # the source listed intermediate shapes (value_info): saved models list them too
    extra_metadata: tuple[tuple[str, str], ...] = field(default=())

    @property
    def default_opset(self) -> int:
        return dict(self.opset_imports).get("", dict(self.opset_imports).get("ai.onnx", 1))

    def with_metadata(self, items: dict[str, str]) -> ModelContext:
        """A copy whose saved model gets these metadata_props too (overriding same keys)."""
        merged = dict(self.extra_metadata)
        merged.update(items)
        return ModelContext(**{**self.__dict__, "extra_metadata": tuple(sorted(merged.items()))})


@dataclass
class LoadedModel:
    graph: gs.Graph
    ctx: ModelContext
    # the model as read: the graph's constants still read their values from it (so keeping it costs no
    # memory), and it serves as the unchanged original for verification instead of a second export
    proto: onnx.ModelProto | None = field(default=None, repr=False)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in mapped_data.all_tensors(model.graph))


def _read(path: str | os.PathLike, load_external_data: bool = True) -> tuple[onnx.ModelProto, bool]:
    """(model, whether its weights came from external data files), failures as one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise InvalidModelError(f"{p}: no such model file")
    try:
        model = onnx.load(str(p), load_external_data=False)
        external = _uses_external_data(model)
        if load_external_data and external:
            _check_external_files(model, p)
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        return model, external
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidModelError(f"{p}: not a valid ONNX model "
                                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    except FileNotFoundError as exc:
        raise InvalidModelError(f"{p}: external data file missing ({exc.filename})") from exc


def _check_external_files(model: onnx.ModelProto, path: Path) -> None:
    """Every external-data file the model names exists next to it (one-line error naming the first missing)."""
    for t in mapped_data.all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = path.parent / location
        if not location or not target.is_file():
            raise InvalidModelError(f"{path}: external data file '{location}' for tensor '{t.name}' is missing "
                                    f"(expected {target})")


def read_model_proto(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, turning every failure into a one-line :class:`InvalidModelError`.

    Protobuf parses an empty file (and some other bytes) as an empty ``ModelProto``: a model without an IR
    version or a graph is not a valid ONNX model, and a graph without nodes is refused too.
    """
    model = _read(path, load_external_data)[0]
    if Path(path).stat().st_size == 0:
        raise InvalidModelError(f"{path}: not a valid ONNX model (the file is empty)")
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise InvalidModelError(f"{path}: not a valid ONNX model (no IR version or no graph)")
    if len(model.graph.node) == 0:
        raise InvalidModelError(f"{path}: the graph has no nodes")
    return model


def context_from_proto(model: onnx.ModelProto, source: str | None, external: bool = False) -> ModelContext:
    """The model-level fields of ``model``; ``external``: its weights were read from external data files."""
    init_names = {t.name for t in model.graph.initializer}
    return ModelContext(
        source=source,
        ir_version=int(model.ir_version),
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=int(model.model_version),
        doc_string=model.doc_string,
        metadata_props=tuple((p.key, p.value) for p in model.metadata_props),
        opset_imports=tuple((o.domain, int(o.version)) for o in model.opset_import),
        external_data=external or _uses_external_data(model),
        graph_doc_string=model.graph.doc_string,
        initializer_inputs=sum(1 for i in model.graph.input if i.name in init_names),
        value_info=len(model.graph.value_info) > 0,
    )


def graph_from_proto(model: onnx.ModelProto) -> gs.Graph:
    try:
        return gs.import_onnx(model)
    except Exception as exc:  # graphsurgeon raises plain exceptions on malformed graphs
        raise InvalidModelError(f"cannot import graph: {exc}") from exc


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a model file into a graph and its context. External data is mapped, not read
    (:mod:`.mapped_data`): the proto and the graph refer to the data files."""
    model, external = _read(path, load_external_data=False)
    if len(model.graph.node) == 0:
        raise InvalidModelError(f"{path}: the graph has no nodes")
    arrays = {}
    if external:
        _check_external_files(model, Path(path))
        try:
            arrays = mapped_data.map_external(model, Path(path).resolve().parent)
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"{path}: cannot read its external data ({exc})") from exc
    ctx = context_from_proto(model, str(path), external)
    graph = _graph_with_shapes(model)
    mapped_data.attach(graph, arrays)
    return LoadedModel(graph, ctx, model)


def _graph_with_shapes(model: onnx.ModelProto) -> gs.Graph:
    """The graph of ``model`` with intermediate shapes inferred on a copy whose large constants are left
    out, so loading a model never holds a second copy of its weights."""
    if tensor_bytes(model) < LOAD_WEIGHTLESS_ABOVE_BYTES:  # small: infer on a copy of the whole model
        return graph_from_proto(with_inferred_shapes(model))
    graph = graph_from_proto(model)
    refresh = refresh_shapes(graph, weightless_above=0)
    if not refresh.inferred:
        logger.warning("shape inference failed on load: %s", refresh.reason)
    return graph


def with_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with intermediate shapes inferred where onnx can (left as is otherwise)."""
    if tensor_bytes(model) >= PROTO_LIMIT_BYTES:
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # shape inference is a refinement; loading must not depend on it
        logger.warning("shape inference failed on load: %s", exc)
        return model


def model_from_proto(model: onnx.ModelProto, source: str | None = None) -> LoadedModel:
    return LoadedModel(_graph_with_shapes(model), context_from_proto(model, source), model)


def _min_ir_version(opsets) -> int:
    """The lowest IR version that can carry these opset imports (a pass may have raised the opset)."""
    try:
        return int(onnx.helper.find_min_ir_version_for(list(opsets), ignore_unknown=True))
    except (ValueError, TypeError):
        return 0


def to_model_proto(graph: gs.Graph, ctx: ModelContext, infer_shapes: bool | None = None,
                   keep_mapped: bool = False) -> onnx.ModelProto:
    """Export a graph and restore every model-level field the context carries.

    ``keep_mapped``: unchanged weights mapped from the input's external data stay references to its files
    (:mod:`.mapped_data`: a proto for onnxruntime sessions and :func:`save_model_proto`, not for other
    tools); by default every weight is written into the proto.

    ``infer_shapes``: True lists freshly inferred intermediate shapes (``value_info``; the calibration
    collector reads them), False lists the shapes the graph carries without inferring, None (default) does
    what the source did: fresh shapes when it listed any, none otherwise. Shapes inferred on load are a
    working aid; writing them into a model that had none made an unchanged model ~5-15 % larger.
    """
    opsets = dict(ctx.opset_imports)
    mapped_data.inline_subgraph_weights(graph)
    for tensor in mapped_data.mapped_constants(graph):
        array = mapped_data.mapped_array(tensor._values)
        tensor._values = mapped_data.as_reference(array) if keep_mapped else array
    model = gs.export_onnx(graph, do_type_check=False)
    for imp in model.opset_import:  # domains a pass may have added, opsets a pass raised (quantizers)
        opsets[imp.domain] = max(opsets.get(imp.domain, 0), int(imp.version))
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    # IR < 4 requires every initializer to be a graph input; canonical graphs do not list them.
    model.ir_version = max(ctx.ir_version, 4, _min_ir_version(model.opset_import))
    model.producer_name = ctx.producer_name
    model.producer_version = ctx.producer_version
    model.domain = ctx.domain
    model.model_version = ctx.model_version
    model.doc_string = ctx.doc_string
    model.graph.doc_string = ctx.graph_doc_string
    meta = dict(ctx.metadata_props)
    meta.update(dict(ctx.extra_metadata))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    if infer_shapes is None:
        infer_shapes = ctx.value_info
        if not infer_shapes:
            _drop_value_info(model.graph)
    if infer_shapes:
        model = refresh_value_info(model)
    return model


def _drop_value_info(graph: onnx.GraphProto) -> None:
    """Remove intermediate shapes from a graph and its If/Loop/Scan bodies (the source listed none)."""
    del graph.value_info[:]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _drop_value_info(sub)


def tensor_bytes(model: onnx.ModelProto, mapped: bool = True) -> int:
    """Bytes of the top-level initializers (``mapped=False``: leaving out mapped references, which
    onnxruntime gets without serialisation)."""
    return sum(mapped_data.nbytes(t) for t in model.graph.initializer if mapped or not mapped_data.is_mapped(t))


def refresh_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop stale intermediate shapes (passes change widths) and infer them again when possible."""
    del model.graph.value_info[:]
    return with_inferred_shapes(model)


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of a model file plus the external data files it references."""
    p = Path(path)
    model = onnx.load(str(p), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    return p.stat().st_size + sum((p.parent / loc).stat().st_size for loc in locations if (p.parent / loc).is_file())


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of a model (data included) without serialising over the protobuf limit. Weights mapped
    from an input's external data are references in the proto and count at their array size."""
    if tensor_bytes(model) >= PROTO_LIMIT_BYTES // 2:
        return tensor_bytes(model)
    return model.ByteSize() + tensor_bytes(model) - tensor_bytes(model, mapped=False)


def save_model_proto(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    overwrite_input: str | None = None,
    check: bool = True,
) -> Path:
    """Write ``model`` atomically: temporary files in the target folder, checked, then renamed.

    ``external_data=None`` chooses external data when the model is too large for one protobuf.
    ``overwrite_input`` is the path the model was loaded from: writing over it is refused (callers
    that mean to overwrite pass None).
    """
    out = Path(path).resolve()
    if overwrite_input is not None and Path(overwrite_input).resolve() == out:
        raise OptionError(f"{out}: refusing to overwrite the input model (pass --overwrite to allow)")
    if not out.parent.is_dir():
        raise OptionError(f"{out}: the folder {out.parent} does not exist (it is not created)")
    has_mapped = any(mapped_data.is_mapped(t) for t in model.graph.initializer)
    use_external = (external_data if external_data is not None
                    else has_mapped or tensor_bytes(model) >= PROTO_LIMIT_BYTES // 2)
    if has_mapped and not use_external:
        raise OptionError(f"{out}: the model refers to its input's external data; save it with external data")
    tmpdir = tempfile.mkdtemp(prefix=".lincomp-", dir=out.parent)
    tmp_model = Path(tmpdir) / out.name
    data_name = out.name + ".data"
    try:
        if use_external:
            write_external(model, tmp_model, data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        if check:
            onnx.checker.check_model(str(tmp_model))
        if use_external and (Path(tmpdir) / data_name).exists():
            os.replace(Path(tmpdir) / data_name, out.parent / data_name)
        os.replace(tmp_model, out)
    except (ValueError, EncodeError) as exc:
        raise LincompError(f"{out}: cannot serialise model ({exc}); try external data") from exc
    except onnx.checker.ValidationError as exc:
        raise LincompError(f"{out}: result failed the ONNX checker, nothing written: "
                           f"{str(exc).splitlines()[0]}") from exc
    finally:
        for leftover in Path(tmpdir).iterdir():
            leftover.unlink()
        os.rmdir(tmpdir)
    return out


def write_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    """Write ``model`` with its top-level initializers over ``EXTERNAL_DATA_THRESHOLD`` bytes in one data file
    ``location`` beside it, one tensor at a time. onnx's own saver rewrites the proto it is given, so using
    it would need a full copy of the weights first; ``model`` is left as it is. Mapped references are
    copied file to file."""
    light = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, f, getattr(model, f))
    light.opset_import.extend(model.opset_import)
    light.metadata_props.extend(model.metadata_props)
    light.functions.extend(model.functions)
    g, lg = model.graph, light.graph
    lg.name, lg.doc_string = g.name, g.doc_string
    for field_name in ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation"):
        getattr(lg, field_name).extend(getattr(g, field_name))
    with open(path.parent / location, "wb") as data:
        for t in g.initializer:
            if mapped_data.is_mapped(t):
                _write_mapped(t, lg.initializer.add(), data, location)
            else:
                _write_tensor(t, lg.initializer.add(), data, location)
    with open(path, "wb") as fh:
        fh.write(light.SerializeToString())


def _write_mapped(t: onnx.TensorProto, out: onnx.TensorProto, data, location: str) -> None:
    out.name, out.data_type, out.doc_string = t.name, t.data_type, t.doc_string
    out.dims.extend(t.dims)
    offset = data.tell()
    length = mapped_data.copy_bytes(t, data)
    out.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        out.external_data.add(key=key, value=value)


def _write_tensor(t: onnx.TensorProto, out: onnx.TensorProto, data, location: str) -> None:
    raw = t.raw_data if t.HasField("raw_data") else None
    if raw is None and onnx.numpy_helper.to_array(t).nbytes <= EXTERNAL_DATA_THRESHOLD:
        out.CopyFrom(t)
        return
    if raw is None:
        raw = onnx.numpy_helper.to_array(t).astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).tobytes()
    if len(raw) <= EXTERNAL_DATA_THRESHOLD:
        out.CopyFrom(t)
        return
    out.name, out.data_type, out.doc_string = t.name, t.data_type, t.doc_string
    out.dims.extend(t.dims)
    offset = data.tell()
    data.write(raw)
    out.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        out.external_data.add(key=key, value=value)


def save_model(graph: gs.Graph, ctx: ModelContext, path: str | os.PathLike, *, overwrite: bool = False,
               external_data: bool | None = None) -> Path:
    """Export and write a graph atomically; the input model is never overwritten unless ``overwrite``."""
    model = to_model_proto(graph, ctx)
    if external_data is None and ctx.external_data:
        external_data = True
    return save_model_proto(model, path, external_data=external_data,
                            overwrite_input=None if overwrite else ctx.source)


def session_source(model: onnx.ModelProto, workdir: str) -> tuple[str | bytes, str | None]:
    """What to hand onnxruntime, and the folder it reads external data from (or None).

    Bytes for normal models; mapped references (:mod:`.mapped_data`) become locations relative to the
    input's folder, which onnxruntime maps itself (no copy in this process). A model whose own inline
    weights approach 2 GiB goes through a file in ``workdir``, mapped references copied file to file."""
    if tensor_bytes(model, mapped=False) < PROTO_LIMIT_BYTES // 2:
        relative = mapped_data.relative_references(model)
        if relative is None:
            return model.SerializeToString(), None
        light, folder = relative
        return light.SerializeToString(), folder
    path = Path(workdir) / "model.onnx"
    write_external(model, path, "model.onnx.data")
    return str(path), None
