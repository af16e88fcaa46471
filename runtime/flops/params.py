"""Parameter count: the stored weights each node consumes, torch's ``parameters()`` convention.

Counted: every floating-point initializer of rank >= 1 consumed by a main-graph node, once per
consuming node, looking through Identity aliases. Not counted: BatchNormalization's running
mean and variance (inputs 3 and 4: statistics, which torch keeps as buffers, not parameters),
uses by Shape and Size (they read only the dimensions), integer initializers (shapes, axes,
indices), 0-d constants (scales such as attention's 1/sqrt(d)), Constant nodes, and subgraph
weights. Quantised graphs count as their float originals: the integer tensor a
DequantizeLinear reads (a quantised weight or bias) and the weight of an integer op
(QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger) are parameters; their scales and zero
points are not.

Why once per use rather than once per initializer: exporters merge initializers with equal
values (a freshly initialised network has dozens of identical BatchNorm and bias tensors) and
share them between nodes, directly or via Identity nodes; counting per use gives the
network's real size. Genuinely tied weights are therefore counted once per use.
"""
from __future__ import annotations

import math

import onnx

FLOAT_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
})
NOT_PARAMETERS = {"BatchNormalization": (3, 4), "DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2),
                  "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
                  "ConvInteger": (2, 3), "MatMulInteger": (2, 3)}
# Integer initializers that are quantised weights: (op type, input slot).
QUANTISED_WEIGHTS = {("DequantizeLinear", 0), ("QLinearConv", 3), ("QLinearConv", 8), ("QLinearMatMul", 3),
                     ("ConvInteger", 1), ("MatMulInteger", 1)}
SHAPE_ONLY = frozenset({"Shape", "Size"})


def count_params(graph: onnx.GraphProto) -> int:
    """Weights consumed by ``graph``'s nodes under the convention in the module docstring."""
    quantised = {node.input[slot] for node in graph.node for op, slot in QUANTISED_WEIGHTS
                 if node.op_type == op and len(node.input) > slot}
    weights = {
        init.name: math.prod(init.dims)
        for init in graph.initializer
        if (init.data_type in FLOAT_TYPES or init.name in quantised) and len(init.dims) > 0
    }
    alias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and alias.get(node.input[0], node.input[0]) in weights:
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
    total = 0
    for node in graph.node:
        if node.op_type == "Identity" or node.op_type in SHAPE_ONLY:
            continue  # an alias (its consumers count) or a read of dimensions only
        skipped = NOT_PARAMETERS.get(node.op_type, ())
        for slot, name in enumerate(node.input):
            source = alias.get(name, name)
            if source in weights and slot not in skipped:
                total += weights[source]
    return total
