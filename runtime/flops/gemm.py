"""Gemm: ``Y = alpha·A'·B' + beta·C`` with ``A'`` of shape M×K, ``B'`` K×N: ``M·N·K`` MACs.

``alpha``, ``beta`` and ``C`` are scalings and a bias, counted as 0 like every elementwise op.
"""
from __future__ import annotations

from taskfold.runtime.flops.registry import NodeShapes, register


@register("Gemm")
def gemm_macs(shapes: NodeShapes) -> int:
    rows, cols = shapes.outputs[0]
    a_shape = shapes.inputs[0]
    inner = a_shape[0] if shapes.attr("transA", 0) else a_shape[1]
    return rows * cols * inner
