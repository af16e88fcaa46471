"""Concrete shapes of the tensors a MACs count needs.

Step 1: pin every dynamic input dimension (to ``input_shape`` when given, else 1) and run
ONNX shape inference with data propagation, on a skeleton of the model whose large
initializers keep their dims but not their values (inference needs only those; copying and
re-serialising 500 MB of weights is what would make it slow). Step 2, only for tensors still unknown (ops whose
output shape depends on values inference does not track, custom ops, ...): run the graph once
in ONNX Runtime on zero inputs with those tensors added as extra graph outputs, and read
their shapes. Step 2 works for anything ONNX Runtime can run; models over 2 GB cannot be
re-serialised for it and must be resolvable by step 1.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from taskfold.runtime.flops.registry import Shape

# Initializers up to this size keep their values: small ones may be shapes, axes or Resize
# scales that inference reads; larger ones are weights whose dims are all it needs.
KEEP_VALUES_UP_TO = 1024


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs a caller feeds (old exporters also list initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _concrete(value: onnx.ValueInfoProto) -> Shape | None:
    """The shape if every dimension is a number, else None."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = tensor.shape.dim
    if not all(dim.HasField("dim_value") for dim in dims):
        return None
    return tuple(dim.dim_value for dim in dims)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: large initializers keep name, type and dims only."""
    graph = model.graph
    initializers = [
        init if math.prod(init.dims) <= KEEP_VALUES_UP_TO
        else onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
        for init in graph.initializer
    ]
    light = onnx.GraphProto(
        name=graph.name, node=graph.node, input=graph.input, output=graph.output,
        value_info=graph.value_info, initializer=initializers,
    )
    return onnx.ModelProto(
        ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions, graph=light
    )


def pin_inputs(model: onnx.ModelProto, input_shape: Sequence[int] | None) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have fixed shapes: ``input_shape`` or 1 per unknown dim."""
    inputs = graph_inputs(model)
    if input_shape is not None and len(inputs) != 1:
        raise ValueError(f"input_shape applies to single-input graphs; this one has {len(inputs)} inputs")
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for value in graph_inputs(pinned):
        tensor = value.type.tensor_type
        if input_shape is None:
            if not tensor.HasField("shape"):
                raise ValueError(f"input {value.name!r} has no shape; pass input_shape")
            for dim in tensor.shape.dim:
                if not dim.HasField("dim_value"):
                    dim.dim_value = 1
            continue
        declared = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        clash = tensor.HasField("shape") and (
            len(declared) != len(input_shape)
            or any(d is not None and d != want for d, want in zip(declared, input_shape))
        )
        if clash:
            raise ValueError(f"input_shape {tuple(input_shape)} does not fit input {value.name!r} of shape {declared}")
        tensor.shape.Clear()
        for size in input_shape:
            tensor.shape.dim.add().dim_value = int(size)
    return pinned


def inferred_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Shape]]:
    """ONNX shape inference (with data propagation); returns the annotated model and known shapes."""
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference failing on an exotic op must not stop counting; ORT resolves the rest
        pass
    graph = model.graph
    shapes: dict[str, Shape] = {init.name: tuple(init.dims) for init in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        shape = _concrete(value)
        if shape is not None:
            shapes.setdefault(value.name, shape)
    return model, shapes


def executed_shapes(
    model: onnx.ModelProto, names: Iterable[str], types: dict[str, onnx.TypeProto]
) -> dict[str, Shape]:
    """Shapes of ``names`` observed by running ``model`` (inputs pinned) once on zeros in ORT.

    ``types`` (from shape inference) declares the extra outputs where known; ORT accepts an
    output without a declared type, so tensors inference knew nothing about still work.
    """
    wanted = sorted(set(names))
    del model.graph.output[:]
    for name in wanted:
        value = model.graph.output.add()
        value.name = name
        if name in types:
            value.type.CopyFrom(types[name])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {
        value.name: np.zeros(
            _concrete(value) or (), dtype=onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        )
        for value in graph_inputs(model)
    }
    arrays = session.run(wanted, feeds)
    return {name: tuple(np.shape(array)) for name, array in zip(wanted, arrays)}


def resolve_shapes(
    model: onnx.ModelProto, needed: set[str], input_shape: Sequence[int] | None
) -> tuple[dict[str, Shape], bool]:
    """Concrete shapes for ``needed`` (plus whatever else is known) and whether ORT had to run."""
    annotated, shapes = inferred_shapes(pin_inputs(skeleton(model), input_shape))
    missing = needed - shapes.keys()
    if not missing:
        return shapes, False
    types = {value.name: value.type for value in [*annotated.graph.value_info, *annotated.graph.output]}
    shapes.update(executed_shapes(pin_inputs(model, input_shape), missing, types))
    return shapes, True
