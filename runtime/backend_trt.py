"""The TensorRT backend: deserialises the bundle's ``model.plan`` with the real TensorRT API.

TensorRT and cuda-python (device memory and copies, so the runtime still needs no torch) are
imported only when this backend is chosen, after checking that the CUDA driver sees a device;
each missing piece raises BackendUnavailable naming it. Engines are tied to the GPU and
TensorRT version that built them, so a plan that fails to deserialise is a BundleError.
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

import numpy as np

from taskfold.runtime.bundle import VerifiedBundle
from taskfold.runtime.cuda import cuda_unavailable_reason
from taskfold.runtime.errors import BackendUnavailable, BundleError

PLAN = "model.plan"


def _import_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime`` since 12.6, ``cuda.cudart`` before)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailable(
        "backend 'tensorrt' needs the cuda-python package for device memory (pip install cuda-python)"
    )


class TrtBackend:
    """Runs a serialised TensorRT engine; inputs and outputs go through device buffers."""

    def __init__(
        self,
        bundle: VerifiedBundle,
        *,
        precision: str = "fp32",
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
    ) -> None:
        if providers or threads is not None:
            raise BackendUnavailable("providers and threads apply to the onnxruntime backend only")
        manifest = bundle.manifest
        built = manifest.get("tensorrt", {}).get("precision", "fp32")
        if PLAN in manifest["files"] and precision != built:
            raise BackendUnavailable(f"backend 'tensorrt': {PLAN} was built for {built}, not {precision} "
                                     f"(rebuild with `taskfold compile RUN --tensorrt --{precision}`)")
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"backend 'tensorrt' needs CUDA: {reason}")
        try:
            trt = importlib.import_module("tensorrt")
        except ImportError:
            raise BackendUnavailable("backend 'tensorrt': the tensorrt package is not installed") from None
        self._cudart = _import_cudart()
        if PLAN not in manifest["files"]:
            raise BundleError(
                f"bundle {bundle.folder}: no {PLAN} (build one with `taskfold compile RUN_DIR --tensorrt`)"
            )
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(bundle.read(PLAN))
        if self._engine is None:
            raise BundleError(
                f"bundle {bundle.folder}: {PLAN} could not be deserialised (built for another GPU or TensorRT version?)"
            )
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._stream = self._call(self._cudart.cudaStreamCreate())
        self.input_name: str = manifest["input"]["name"]
        self.provider = f"TensorRT {trt.__version__}"
        self.threads: int | None = None

    def _call(self, result: tuple[Any, ...]) -> Any:
        """Unwrap cuda-python's ``(error, *values)`` convention, raising on any CUDA error."""
        error, *values = result
        if error != self._cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA call failed: {error}")
        return values[0] if values else None

    def run(self, images: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
        """Copy the batch in, execute the engine on its stream, copy every output back."""
        cudart, ctx = self._cudart, self._context
        images = np.ascontiguousarray(images)
        ctx.set_input_shape(self.input_name, images.shape)
        hosts = {
            name: np.empty(
                tuple(ctx.get_tensor_shape(name)),
                dtype=self._trt.nptype(self._engine.get_tensor_dtype(name)),
            )
            for name in self._outputs
        }
        device: dict[str, int] = {}
        try:
            for name, host in [(self.input_name, images), *hosts.items()]:
                device[name] = int(self._call(cudart.cudaMalloc(max(host.nbytes, 1))))
                ctx.set_tensor_address(name, device[name])
            to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._call(cudart.cudaMemcpyAsync(
                device[self.input_name], images.ctypes.data, images.nbytes, to_device, self._stream
            ))
            if not ctx.execute_async_v3(int(self._stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            for name, host in hosts.items():
                self._call(cudart.cudaMemcpyAsync(
                    host.ctypes.data, device[name], host.nbytes, to_host, self._stream
                ))
            self._call(cudart.cudaStreamSynchronize(self._stream))
        finally:
            for pointer in device.values():
                cudart.cudaFree(pointer)
        return [hosts[name] for name in output_names]
