"""Integer operators (QOperator-format graphs): the same MACs as their float twins, counted as INT8.

QLinearConv's weight is input 3 and QLinearMatMul's right operand input 3 (inputs 1-2 and 4-5 are
scales and zero points); ConvInteger and MatMulInteger take the operands at 0 and 1 like Conv and
MatMul. QDQ-format graphs keep plain Conv/MatMul between DequantizeLinear nodes; those are
classified as INT8 by :func:`taskfold.runtime.flops.count.node_precision`.
"""
from __future__ import annotations

import math

from taskfold.runtime.flops.registry import NodeShapes, register


@register("QLinearConv")
def qlinear_conv_macs(shapes: NodeShapes) -> int:
    return math.prod(shapes.outputs[0]) * math.prod(shapes.inputs[3][1:])


@register("ConvInteger")
def conv_integer_macs(shapes: NodeShapes) -> int:
    return math.prod(shapes.outputs[0]) * math.prod(shapes.inputs[1][1:])


@register("QLinearMatMul", "MatMulInteger")
def matmul_integer_macs(shapes: NodeShapes) -> int:
    return math.prod(shapes.outputs[0]) * shapes.inputs[0][-1]
