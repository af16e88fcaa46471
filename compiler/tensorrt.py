"""Build a TensorRT engine (``model.plan``) from a bundle's ONNX graph, with the real TensorRT API.

Only possible where CUDA and the ``tensorrt`` package are present; anywhere else it raises a
CompileError that says which of the two is missing. The engine has one optimisation profile
for the dynamic batch axis (1 … ``max_batch``) and is tied to the GPU and TensorRT version that
built it, which the manifest records.
"""
from __future__ import annotations

import json
from pathlib import Path

from taskfold.compiler.errors import CompileError
from taskfold.runtime.backend_trt import PLAN
from taskfold.runtime.bundle import write_manifest
from taskfold.runtime.cuda import cuda_unavailable_reason


def build_engine(onnx_path: Path, plan_path: Path, *, image_shape: tuple[int, int, int], max_batch: int = 32,
                 fp16: bool = False) -> str:
    """Parse ``onnx_path``, build and serialise an engine to ``plan_path``; returns TensorRT's version."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise CompileError(f"--tensorrt needs CUDA: {reason}")
    try:
        import tensorrt as trt
    except ImportError:
        raise CompileError("--tensorrt needs the tensorrt package (pip install tensorrt)") from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CompileError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, *image_shape), (max(1, max_batch // 4), *image_shape), (max_batch, *image_shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError("TensorRT failed to build an engine for this graph (its log above says why)")
    plan_path.write_bytes(bytes(serialized))
    return trt.__version__


def add_engine_to_bundle(bundle: Path, *, max_batch: int = 32, fp16: bool = False) -> None:
    """Build ``model.plan`` beside ``model.onnx`` and re-sign the manifest (sha256 of every file)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    _, channels, height, width = manifest["input"]["shape"]
    version = build_engine(bundle / "model.onnx", bundle / PLAN, image_shape=(channels, height, width),
                           max_batch=max_batch, fp16=fp16)
    manifest.pop("files", None)
    manifest["tensorrt"] = {"version": version, "max_batch": max_batch, "fp16": fp16}
    write_manifest(bundle, manifest)
