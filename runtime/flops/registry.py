"""``OP_COUNTERS``: op_type -> function giving a node's multiply-accumulates from its shapes.

A counter receives a :class:`NodeShapes` whose input and output shapes are all concrete
(the caller resolves them first), so each counter is a few lines of arithmetic. To count a
new operator, add a small module with a ``@register("OpType")`` function and import it in
``taskfold.runtime.flops``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import onnx

Shape = tuple[int, ...]


@dataclass(frozen=True)
class NodeShapes:
    """A node with the concrete shapes of its inputs and outputs ("" optional inputs get ())."""

    node: onnx.NodeProto
    inputs: list[Shape]
    outputs: list[Shape]

    def attr(self, name: str, default: Any = None) -> Any:
        """The node attribute's Python value, or ``default`` when it is not set."""
        for attribute in self.node.attribute:
            if attribute.name == name:
                return onnx.helper.get_attribute_value(attribute)
        return default


Counter = Callable[[NodeShapes], int]
OP_COUNTERS: dict[str, Counter] = {}


def register(*op_types: str) -> Callable[[Counter], Counter]:
    """Register ``counter`` for each op_type (default ONNX domain)."""

    def decorator(counter: Counter) -> Counter:
        for op_type in op_types:
            if op_type in OP_COUNTERS:
                raise ValueError(f"a MACs counter for {op_type!r} is registered twice")
            OP_COUNTERS[op_type] = counter
        return counter

    return decorator
