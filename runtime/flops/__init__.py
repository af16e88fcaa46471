"""MACs and parameters of any ONNX graph, one small counter per operator family.

Convention — multiply-accumulates, as in torchvision's "GFLOPS" column (which counts MACs):

- Conv: ``N·Cout·Hout·Wout·(Cin/groups)·kh·kw`` (any kernel rank; bias adds nothing);
- ConvTranspose: ``N·Cin·Hin·Win·(Cout/groups)·kh·kw``;
- Gemm: ``M·N·K`` (alpha, beta and C add nothing);
- MatMul, with numpy broadcasting: ``batch·M·N·K`` (attention's Q·Kᵀ and A·V included);
- the integer forms (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger) as their float twins;
- everything else — elementwise ops, activations, pooling, normalisation, softmax, resize,
  reshapes — counts 0 MACs.

Only nodes of the main graph in the default ONNX domain are counted: bodies of If/Loop/Scan
and custom-domain ops contribute nothing. Dynamic input dimensions are taken from
``input_shape`` or set to 1. ``macs_by_precision`` splits the total by the arithmetic a node
runs in: ``int8`` for integer ops and for a Conv/Gemm/MatMul whose two operands are both
dequantised (a QDQ graph's quantised layer), ``fp16`` for float16 operands, ``fp32`` otherwise.
Parameters follow torch's ``parameters()``; see :mod:`taskfold.runtime.flops.params` for
exactly what is counted. Add an operator by writing a
``@register("OpType")`` counter in a new module (see ``conv.py``) and importing it here.
"""
from __future__ import annotations

from taskfold.runtime.flops import conv, gemm, matmul, quantized  # noqa: F401  (registers the counters)
from taskfold.runtime.flops.count import OnnxCost, count_onnx
from taskfold.runtime.flops.registry import OP_COUNTERS, NodeShapes, register

__all__ = ["OP_COUNTERS", "NodeShapes", "OnnxCost", "count_onnx", "register"]
