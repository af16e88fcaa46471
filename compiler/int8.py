"""INT8 static quantisation of a bundle's FP32 graph with ONNX Runtime (QDQ, per-channel weights).

The activation/weight types are chosen for the CPU the graph will run on (``Int8Scheme``), because
the fast and safe choice differs: measured on this project's AVX2 machine without VNNI (see
BENCHMARKS.md), uint8 activations with int8 weights and ``reduce_range`` (7-bit weights) ran at
about half the FP32 latency, while the default signed-int8 activations were slower than FP32
(ORT fused few convolutions) and full-range weights let ``VPMADDUBSW``'s 16-bit pair sums
saturate. Calibration is MinMax over images of the run's training split, fed as they are fed in
training (the dataset's normalisation).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from taskfold.compiler.errors import CompileError
from taskfold.runtime.cpu import cpu_kind

CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class Int8Scheme:
    """How activations and weights are quantised, and for which target."""

    target: str
    activations: str  # "uint8" | "int8"
    weights: str  # "int8"
    reduce_range: bool  # 7-bit weights: no 16-bit saturation on CPUs without VNNI
    symmetric_activations: bool  # zero point 0 (TensorRT accepts nothing else)
    reason: str

    def to_manifest(self) -> dict[str, Any]:
        return {**asdict(self), "format": "QDQ", "per_channel": True, "calibration": "minmax"}


SCHEMES: dict[str, Int8Scheme] = {
    "avx2": Int8Scheme("avx2", "uint8", "int8", True, False,
                       "x86 without VNNI: u8×s8 pairs are summed in saturating 16-bit lanes, so weights are 7-bit"),
    "vnni": Int8Scheme("vnni", "uint8", "int8", False, False,
                       "x86 with VNNI: u8×s8 products accumulate in 32 bits, full-range weights are safe"),
    "arm": Int8Scheme("arm", "int8", "int8", False, False, "ARM: signed int8 dot products"),
    "tensorrt": Int8Scheme("tensorrt", "int8", "int8", False, True,
                           "TensorRT explicit quantisation: symmetric signed int8 only"),
}
INT8_TARGETS = ("auto", *SCHEMES)


def scheme_for(target: str) -> Int8Scheme:
    """The scheme for ``target`` (``auto``: this machine's CPU kind)."""
    if target == "auto":
        target = cpu_kind()
    if target not in SCHEMES:
        raise CompileError(f"unknown INT8 target {target!r}; available: {', '.join(INT8_TARGETS)}")
    return SCHEMES[target]


def resolve_exclusions(model: onnx.ModelProto, exclude: Sequence[str]) -> list[str]:
    """Node names to keep in FP32: each entry is an op type (all its nodes) or a node name."""
    op_types = {node.op_type for node in model.graph.node}
    names = [node.name for node in model.graph.node]
    nodes: list[str] = []
    for entry in exclude:
        if entry in op_types:
            nodes += [node.name for node in model.graph.node if node.op_type == entry]
        elif entry in names:
            nodes.append(entry)
        else:
            raise CompileError(f"--int8-exclude {entry!r} is neither an op type of the graph "
                               f"({', '.join(sorted(op_types))}) nor a node name (e.g. {names[0]!r})")
    return sorted(set(nodes), key=names.index)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes of the task heads: what each output alone needs, narrowed to modules named
    ``head``/``heads`` where the exporter recorded module scopes (a one-output graph is all head
    otherwise). Names are in graph order."""
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    users: dict[str, set[str]] = {}
    for output in graph.output:
        stack, seen = [output.name], set()
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            users.setdefault(node.name, set()).add(output.name)
            stack.extend(node.input)
    exclusive = {name for name, outs in users.items() if len(outs) == 1}
    scoped = {node.name for node in graph.node if _in_head_scope(node)}
    has_scopes = any(prop.key == _SCOPES for node in graph.node for prop in node.metadata_props)
    chosen = exclusive & scoped if has_scopes else (exclusive if len(graph.output) > 1 else set())
    return [node.name for node in graph.node if node.name in chosen]


_SCOPES = "pkg.torch.onnx.name_scopes"


def _in_head_scope(node: onnx.NodeProto) -> bool:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            return any(part in ("head", "heads") for scope in prop.value.strip("[]").split(",")
                       for part in scope.strip(" '\"").split("."))
    return False


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over an image array, in small batches."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{input_name: images[i:i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, images: np.ndarray,
                  scheme: Int8Scheme, *, exclude_nodes: Sequence[str] = ()) -> None:
    """Write the QDQ INT8 graph of ``fp32_path`` to ``out_path``, calibrated on ``images``.

    ``exclude_nodes`` stay in FP32 (no Q/DQ around them). Raises CompileError when the images
    are not a non-empty float32 batch.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if images.ndim != 4 or len(images) == 0 or images.dtype != np.float32:
        raise CompileError(f"calibration images must be a non-empty float32 (N, C, H, W) batch, got "
                           f"{images.dtype} {images.shape}")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    input_name = onnx.load(os.fspath(fp32_path), load_external_data=False).graph.input[0].name
    with _quiet_quantizer():
        quantize_static(
            os.fspath(fp32_path), os.fspath(out_path), _Batches(input_name, images),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=scheme.reduce_range,
            activation_type=types[scheme.activations], weight_type=types[scheme.weights],
            nodes_to_exclude=list(exclude_nodes), calibrate_method=CalibrationMethod.MinMax,
            # the calibration graph reduces each tensor to its min/max in-graph, so memory stays
            # flat for any N (ORT's CalibMaxIntermediateOutputs discards batches: not used)
            extra_options={"ActivationSymmetric": scheme.symmetric_activations, "WeightSymmetric": True},
        )
    onnx.checker.check_model(os.fspath(out_path), full_check=True)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """quantize_static logs 'consider pre-processing' on the root logger: ORT's pre-processing
    (symbolic shape inference + optimisation) changed nothing on taskfold's BN-folded graphs
    and took 10+ s, so it is skipped and its advice dropped."""
    advice = logging.Filter()
    advice.filter = lambda record: "pre-process" not in record.getMessage()  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def count_fused_convs(int8_path: Path) -> tuple[int, int]:
    """(QLinearConv nodes, all convolutions) after ONNX Runtime's graph optimisations on this CPU:
    a QDQ conv that ORT does not fuse runs in FP32 between a dequantise and a quantise."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(os.fspath(int8_path), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    fused = sum(node.op_type == "QLinearConv" for node in nodes)
    return fused, fused + sum(node.op_type in ("Conv", "FusedConv") for node in nodes)
