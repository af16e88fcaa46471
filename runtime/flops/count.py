"""``count_onnx``: MACs and parameters of an ONNX model, in total, per op type, node and output."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import onnx

from taskfold.runtime.errors import BundleError
from taskfold.runtime.flops.params import count_params
from taskfold.runtime.flops.registry import OP_COUNTERS, NodeShapes
from taskfold.runtime.flops.shapes import resolve_shapes

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class OnnxCost:
    """What serving a graph costs: ``per_output_macs[o]`` is the MACs of every node ``o`` needs."""

    macs: int
    params: int
    per_op_type: dict[str, int] = field(default_factory=dict)
    per_output_macs: dict[str, int] = field(default_factory=dict)
    per_node: list[tuple[str, str, int]] = field(default_factory=list)
    used_onnxruntime_for_shapes: bool = False
    macs_by_precision: dict[str, int] = field(default_factory=dict)  # "int8" / "fp16" / "fp32"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``per_node`` rows become lists)."""
        return asdict(self)


def _load(model_or_path: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    """A model proto from a proto, an ``.onnx`` path or a bundle folder (its ``model.onnx``)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = Path(model_or_path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise BundleError(f"no ONNX file at {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise BundleError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    from taskfold.runtime.graph_check import require_model  # graph_check imports flops.shapes
    return require_model(model, str(path))


def _ancestors(graph: onnx.GraphProto, output: str, producer: dict[str, int]) -> set[int]:
    """Indices of the nodes ``output`` depends on (subgraph outer-scope references are ignored)."""
    seen: set[int] = set()
    stack = [output]
    while stack:
        index = producer.get(stack.pop())
        if index is None or index in seen:
            continue
        seen.add(index)
        stack.extend(name for name in graph.node[index].input if name)
    return seen


INTEGER_OPS = frozenset({"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"})


def node_precision(node: onnx.NodeProto, producer_ops: dict[str, str], elem_types: dict[str, int]) -> str:
    """``int8`` for integer ops and for ops whose first two operands are both dequantised (QDQ),
    ``fp16`` when an operand is float16, else ``fp32``."""
    if node.op_type in INTEGER_OPS:
        return "int8"
    operands = [name for name in node.input[:2] if name]
    if operands and all(producer_ops.get(name) == "DequantizeLinear" for name in operands):
        return "int8"
    return "fp16" if any(elem_types.get(name) == onnx.TensorProto.FLOAT16 for name in operands) else "fp32"


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element types the graph declares (inputs, initializers, value_info, outputs)."""
    types = {init.name: init.data_type for init in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types.setdefault(value.name, value.type.tensor_type.elem_type)
    return types


def count_onnx(
    model_or_path: onnx.ModelProto | str | os.PathLike[str], input_shape: Sequence[int] | None = None
) -> OnnxCost:
    """Count MACs and params; dynamic input dims become ``input_shape`` (single input) or 1.

    Only main-graph nodes in the default ONNX domain with a registered counter contribute MACs
    (see ``taskfold.runtime.flops`` for the convention); ``per_node`` lists exactly those nodes.
    """
    model = _load(model_or_path)
    graph = model.graph
    counted = [
        (index, node) for index, node in enumerate(graph.node)
        if node.domain in DEFAULT_DOMAINS and node.op_type in OP_COUNTERS
    ]
    needed = {name for _, node in counted for name in [*node.input, *node.output] if name}
    shapes, used_ort = resolve_shapes(model, needed, input_shape) if counted else ({}, False)
    node_macs: dict[int, int] = {}
    per_op_type: dict[str, int] = {}
    per_node: list[tuple[str, str, int]] = []
    by_precision: dict[str, int] = {}
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    producer_ops = {name: graph.node[index].op_type for name, index in producer.items()}
    elem_types = _elem_types(graph)
    for index, node in counted:
        view = NodeShapes(
            node,
            [shapes[name] if name else () for name in node.input],
            [shapes[name] if name else () for name in node.output],
        )
        macs = int(OP_COUNTERS[node.op_type](view))
        node_macs[index] = macs
        per_op_type[node.op_type] = per_op_type.get(node.op_type, 0) + macs
        precision = node_precision(node, producer_ops, elem_types)
        by_precision[precision] = by_precision.get(precision, 0) + macs
        per_node.append((node.name or f"{node.op_type}_{index}", node.op_type, macs))
    per_output = {
        output.name: sum(node_macs.get(i, 0) for i in _ancestors(graph, output.name, producer))
        for output in graph.output
    }
    return OnnxCost(
        macs=sum(node_macs.values()),
        params=count_params(graph),
        per_op_type=per_op_type,
        per_output_macs=per_output,
        per_node=per_node,
        used_onnxruntime_for_shapes=used_ort,
        macs_by_precision=by_precision,
    )
