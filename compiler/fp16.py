"""FP16 copy of a bundle's graph, for GPU deployment (CUDA / TensorRT execution providers).

The converter is ``onnxruntime.transformers.float16`` (it ships inside the onnxruntime and
onnxruntime-gpu wheels, so no further package; it is a maintained fork of
onnxconverter-common's ``float16``). By default the graph keeps FP32 inputs and outputs with
casts at its edges, so callers feed the same arrays; ``fp16_io=True`` makes the edges FP16 too.
The converter appends those casts at the end of the node list, so the nodes are put back in
topological order (the ONNX checker requires it).

On the CPU, ONNX Runtime runs FP16 nodes that have no FP16 kernel (Conv among them on x86)
through casts to FP32 that it inserts itself, so a CPU check measures FP16 rounding of the
weights and of the activations between nodes, not FP16 accumulation inside kernels.
"""
from __future__ import annotations

import os

import onnx

from taskfold.compiler.errors import CompileError


def convert_fp16(fp32_path: str | os.PathLike, out_path: str | os.PathLike, *, fp16_io: bool = False) -> None:
    """Write the FP16 graph of ``fp32_path`` to ``out_path`` and check it."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(os.fspath(fp32_path)), keep_io_types=not fp16_io)
    topological_sort(model.graph)
    onnx.save(model, os.fspath(out_path))
    onnx.checker.check_model(os.fspath(out_path), full_check=True)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` in place so that every node comes after the producers of its inputs."""
    ready = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise CompileError(f"FP16 graph has a cycle or a dangling input at node {waiting[0].name!r}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)
