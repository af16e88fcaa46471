"""Does a bundle's graph answer what its manifest promises? Checked on the verified bytes.

A manifest that names an output the graph lacks, or an input shape the graph contradicts, used
to surface as a long ONNX Runtime error at the first call (or never: a wrong ``shape`` in the
manifest misleads callers silently). These checks run at load time, on the graph parsed from
the bytes whose sha256 was just checked, and each failure is one line naming both sides.
A graph whose weights live in external-data files may only reference files the manifest lists
and hashes; those files are read (and verified) here and handed to ONNX Runtime from memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from taskfold.runtime.errors import BundleError
from taskfold.runtime.flops.shapes import graph_inputs


@dataclass
class VerifiedGraph:
    """An ONNX graph of a bundle: its verified bytes, the parsed proto, and the verified bytes of
    every external-data file it references (by the name the graph uses)."""

    name: str
    data: bytes
    proto: onnx.ModelProto
    external: dict[str, bytes] = field(default_factory=dict)


def parse_graph(data: bytes, where: str) -> onnx.ModelProto:
    """The ModelProto in ``data``; a BundleError for bytes that are not a (whole) ONNX model."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        raise BundleError(f"{where}: not a readable ONNX model (truncated or not ONNX)") from None
    return require_model(model, where)


def require_model(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """``model`` if it is one; empty bytes parse as a valid, empty ModelProto, so a 0-byte file
    would otherwise count as a model with no MACs and no outputs."""
    if model.ir_version <= 0 or not model.graph.output:
        raise BundleError(f"{where}: not an ONNX model (no IR version or no graph outputs; empty or truncated?)")
    return model


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto a graph holds, subgraphs included (where external data can hide)."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def external_files(model: onnx.ModelProto) -> list[str]:
    """The external-data file names the graph references, in first-use order."""
    names: list[str] = []
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location not in names:
                names.append(location)
    return names


def _dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """Declared dims (None where symbolic), or None when the graph declares no shape."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim]


def _contradiction(declared: list[int | None] | None, promised: Any) -> bool:
    """True when both shapes are known and differ in rank or in a fixed dimension."""
    if declared is None or not isinstance(promised, list):
        return False
    if len(declared) != len(promised):
        return True
    return any(d is not None and isinstance(p, int) and p > 0 and d != p for d, p in zip(declared, promised))


def _shape_text(dims: list[int | None]) -> str:
    return "(" + ",".join("?" if d is None else str(d) for d in dims) + ")"


def _listed_name(graph_name: str, location: str) -> str:
    """The bundle file an external-data ``location`` of graph ``graph_name`` refers to."""
    return (Path(graph_name).parent / location).as_posix()


def check_graph(model: onnx.ModelProto, manifest: dict[str, Any], where: str, graph_name: str = "model.onnx",
                input_spec: dict[str, Any] | None = None) -> None:
    """Refuse a manifest whose input or task outputs contradict the graph ``model`` (the bundle
    file ``graph_name``), and external data the manifest does not list. ``input_spec``: what the
    input must be when it differs from the manifest's ``input`` (an FP16-I/O graph)."""
    spec = input_spec or manifest["input"]
    inputs = graph_inputs(model)
    names = [value.name for value in inputs]
    if names != [spec["name"]]:
        raise BundleError(f"{where}: the manifest's input {spec['name']!r} does not match the graph's input(s) "
                          f"{names}")
    declared = _dims(inputs[0])
    if _contradiction(declared, spec["shape"]):
        raise BundleError(f"{where}: input.shape {spec['shape']} in the manifest contradicts the graph's "
                          f"{_shape_text(declared)}")
    elem = inputs[0].type.tensor_type.elem_type
    graph_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else None
    if graph_dtype is not None and np.dtype(spec.get("dtype", "float32")) != graph_dtype:
        raise BundleError(f"{where}: input.dtype {spec.get('dtype', 'float32')!r} in the manifest contradicts the "
                          f"graph's {graph_dtype}")
    outputs = {value.name: value for value in model.graph.output}
    for task in manifest["tasks"]:
        value = outputs.get(task["output"])
        if value is None:
            raise BundleError(f"{where}: task {task['name']!r} reads output {task['output']!r}, which the graph "
                              f"does not have (outputs: {', '.join(outputs)})")
        declared = _dims(value)
        if _contradiction(declared, task.get("shape")):
            raise BundleError(f"{where}: task {task['name']!r} shape {task['shape']} in the manifest contradicts "
                              f"the graph's {_shape_text(declared)}")
    for location in external_files(model):
        if _listed_name(graph_name, location) not in manifest["files"]:
            raise BundleError(f"{where}: the graph reads external data from {location!r}, which the manifest does "
                              "not list and hash")


def verified_graph(bundle: Any, name: str, input_spec: dict[str, Any] | None = None) -> VerifiedGraph:
    """Read graph ``name`` of a :class:`~taskfold.runtime.bundle.VerifiedBundle` (verified bytes),
    check it against the manifest and read its external-data files (verified too)."""
    where = f"bundle {bundle.folder}: {name}"
    data = bundle.read(name)
    model = parse_graph(data, where)
    check_graph(model, bundle.manifest, where, name, input_spec)
    external = {location: bundle.read(_listed_name(name, location)) for location in external_files(model)}
    return VerifiedGraph(name, data, model, external)
