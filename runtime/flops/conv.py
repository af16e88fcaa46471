"""Conv and ConvTranspose: one multiply-accumulate per kernel tap per output (resp. input) element.

Conv: ``N·Cout·Hout·Wout · (Cin/groups)·kh·kw`` = output elements × weight elements per output
channel (the weight is ``Cout × Cin/groups × kh × kw``). ConvTranspose scatters each input
element through a ``Cin × Cout/groups × kh × kw`` weight: ``N·Cin·Hin·Win · (Cout/groups)·kh·kw``.
Both hold for 1-D and 3-D kernels; the bias adds no MACs.
"""
from __future__ import annotations

import math

from taskfold.runtime.flops.registry import NodeShapes, register


@register("Conv")
def conv_macs(shapes: NodeShapes) -> int:
    return math.prod(shapes.outputs[0]) * math.prod(shapes.inputs[1][1:])


@register("ConvTranspose")
def conv_transpose_macs(shapes: NodeShapes) -> int:
    return math.prod(shapes.inputs[0]) * math.prod(shapes.inputs[1][1:])
