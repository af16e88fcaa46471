"""Build a TensorRT engine (``model.plan``) from one of a bundle's ONNX graphs, with the real TensorRT API.

Only possible where CUDA and the ``tensorrt`` package are present; anywhere else it raises a
CompileError that says which of the two is missing. The engine has one optimisation profile
for the dynamic batch axis (1 … ``max_batch``) and is tied to the GPU and TensorRT version that
built it, which the manifest records.

Precision comes from the graph, not from builder flags: the network is strongly typed (always so
in TensorRT 11, which removed the FP16/INT8 flags; asked for in TensorRT 10), so an FP16 graph
gives FP16 kernels and a QDQ graph gives INT8 ones (explicit quantisation: symmetric signed
int8, which is why ``--tensorrt --int8`` quantises a graph of its own with the ``tensorrt``
scheme). With both ``--fp16`` and ``--int8`` the engine comes from the QDQ graph; its
unquantised layers stay FP32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from taskfold.compiler.errors import CompileError
from taskfold.runtime.backend_trt import PLAN
from taskfold.runtime.cuda import cuda_unavailable_reason


def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else why not."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        return f"--tensorrt needs CUDA: {reason}"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "--tensorrt needs the tensorrt package (pip install 'taskfold[gpu]')"
    return None


def build_engine(onnx_path: Path, plan_path: Path, *, image_shape: tuple[int, int, int], max_batch: int = 32) -> str:
    """Parse ``onnx_path``, build and serialise an engine to ``plan_path``; returns TensorRT's version."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise CompileError(reason)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, *image_shape), (max(1, max_batch // 4), *image_shape), (max_batch, *image_shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError("TensorRT failed to build an engine for this graph (its log above says why)")
    plan_path.write_bytes(bytes(serialized))
    return trt.__version__


def build_engine_into(folder: Path, source: Path, *, image_shape: tuple[int, int, int], precision: str,
                      max_batch: int = 32) -> dict[str, Any]:
    """Build ``folder/model.plan`` from the graph ``source``; returns the manifest's ``tensorrt`` entry."""
    version = build_engine(source, folder / PLAN, image_shape=image_shape, max_batch=max_batch)
    return {"tensorrt": {"version": version, "max_batch": max_batch, "precision": precision,
                         "source": source.name}}
