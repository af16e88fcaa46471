"""MatMul (numpy semantics, broadcasting batch dimensions): output elements × inner size ``K``.

For ``(..., M, K) @ (..., K, N)`` the output is ``(batch..., M, N)`` after broadcasting, so
``batch·M·N·K`` MACs — this covers Linear layers on token sequences and attention's ``Q·Kᵀ``
and ``A·V``. A 1-D left operand has ``K`` as its only dimension.
"""
from __future__ import annotations

import math

from taskfold.runtime.flops.registry import NodeShapes, register


@register("MatMul")
def matmul_macs(shapes: NodeShapes) -> int:
    inner = shapes.inputs[0][-1]
    return math.prod(shapes.outputs[0]) * inner
