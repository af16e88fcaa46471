"""Compile the stripped network with torch-tensorrt into a serialised ExportedProgram (``model.trt.ep``).

For users who stay in PyTorch: ``torch.export.load(path).module()`` (after ``import
torch_tensorrt``) gives a callable whose layers run as TensorRT engines; the runtime's
``backend="torch"`` does exactly that. Only possible where CUDA and the ``torch-tensorrt``
package are present; anywhere else it raises a CompileError saying which is missing.

The program takes an FP32 ``(N, 3, H, W)`` batch (N from 1 to ``max_batch``) and returns a tuple
of outputs in the manifest's task order. With ``fp16`` the network runs in FP16 with casts at
its edges (torch-tensorrt follows the graph's dtypes: ``use_explicit_typing``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskfold.compiler.errors import CompileError
from taskfold.compiler.export import _OrderedOutputs
from taskfold.runtime.backend_torch import TORCH_TRT_KEY
from taskfold.runtime.cuda import cuda_unavailable_reason

TORCH_TRT_FILE = "model.trt.ep"


class _HalfInside(nn.Module):
    """FP32 in and out, FP16 in between."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(out.float() for out in self.module(image.half()))


def torch_tensorrt_unavailable_reason() -> str | None:
    """None when a program can be built here, else why not."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        return f"--torch-tensorrt needs CUDA: {reason}"
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return "--torch-tensorrt needs the torch-tensorrt package (pip install 'taskfold[gpu]')"
    return None


def compile_torch_tensorrt(model: nn.Module, folder: Path, *, image_shape: tuple[int, int, int],
                           output_names: list[str], fp16: bool = False, max_batch: int = 32) -> dict[str, Any]:
    """Write ``folder/model.trt.ep``; returns the manifest's ``torch_tensorrt`` entry."""
    reason = torch_tensorrt_unavailable_reason()
    if reason is not None:
        raise CompileError(reason)
    import torch_tensorrt

    module: nn.Module = _OrderedOutputs(model, output_names).eval().cuda()
    if fp16:
        module = _HalfInside(module)
    spec = torch_tensorrt.Input(min_shape=(1, *image_shape), opt_shape=(max(1, max_batch // 4), *image_shape),
                                max_shape=(max_batch, *image_shape), dtype=torch.float32)
    example = torch.randn(2, *image_shape, device="cuda")
    with torch.no_grad():
        compiled = torch_tensorrt.compile(module, ir="dynamo", arg_inputs=[spec], use_explicit_typing=True)
        torch_tensorrt.save(compiled, str(folder / TORCH_TRT_FILE), output_format="exported_program",
                            arg_inputs=[example])
    return {TORCH_TRT_KEY: {"file": TORCH_TRT_FILE, "version": torch_tensorrt.__version__,
                            "precision": "fp16" if fp16 else "fp32", "max_batch": max_batch}}
