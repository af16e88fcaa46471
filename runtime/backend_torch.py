"""The torch backend: runs the bundle's torch-tensorrt program (``model.trt.ep``) for users who stay
in PyTorch.

``taskfold compile RUN --torch-tensorrt`` saves the stripped network compiled by torch-tensorrt
as a serialised ExportedProgram whose graph calls TensorRT engines. torch and torch_tensorrt
(which registers those engine ops, so it must be imported before loading) are imported only
when this backend is chosen, after checking that the CUDA driver sees a device: importing
``taskfold.runtime`` never imports torch.
"""
from __future__ import annotations

import importlib
import io
from typing import Any, Sequence

import numpy as np

from taskfold.runtime.bundle import VerifiedBundle
from taskfold.runtime.cuda import cuda_unavailable_reason
from taskfold.runtime.errors import BackendUnavailable, BundleError

TORCH_TRT_KEY = "torch_tensorrt"


class TorchBackend:
    """Calls the loaded program on CUDA tensors; outputs come back as float32 numpy arrays."""

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
        entry = manifest.get(TORCH_TRT_KEY)
        if not entry or entry.get("file") not in manifest["files"]:
            raise BundleError(f"bundle {bundle.folder}: no torch-tensorrt program (build one with "
                              "`taskfold compile RUN_DIR --torch-tensorrt`)")
        if precision != entry.get("precision", "fp32"):
            raise BackendUnavailable(f"backend 'torch': the program was compiled for {entry.get('precision')}, "
                                     f"not {precision}")
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"backend 'torch' runs a torch-tensorrt program, which needs CUDA: {reason}")
        try:
            self._torch = importlib.import_module("torch")
            trt = importlib.import_module("torch_tensorrt")
        except ImportError as exc:
            raise BackendUnavailable(f"backend 'torch' needs torch and torch-tensorrt ({exc.name} is not "
                                     "installed; pip install 'taskfold[gpu]')") from None
        # The verified bytes, not the file again (see VerifiedBundle).
        self._module = self._torch.export.load(io.BytesIO(bundle.read(entry["file"]))).module()
        self._order = [task["output"] for task in manifest["tasks"]]
        self.provider = f"torch-tensorrt {trt.__version__}"
        self.threads: int | None = None

    def run(self, images: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
        """One call of the program on the batch; outputs in the order of ``output_names``."""
        torch = self._torch
        with torch.inference_mode():
            outputs = self._module(torch.from_numpy(np.ascontiguousarray(images)).cuda())
        by_name = dict(zip(self._order, outputs))
        return [by_name[name].float().cpu().numpy() for name in output_names]
