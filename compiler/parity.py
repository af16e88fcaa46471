"""Prove an exported graph computes what the PyTorch model computes, on real inputs.

The exporter and ONNX Runtime each rewrite the graph (constant folding, fused kernels), so
a bundle is only trusted after the same inputs went through both and every output agreed
within a tolerance.
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from taskfold.compiler.errors import CompileError


def check_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    inputs: np.ndarray | torch.Tensor,
    *,
    tol: float,
) -> dict[str, float]:
    """Max abs difference per ONNX output between ``model`` (eval, no_grad) and ONNX Runtime (CPU).

    ``model.forward`` returns a dict keyed by the graph's output names, or one Tensor when
    the graph has one output. Raises ``CompileError`` when an output differs by more than
    ``tol``, has another shape, or is NaN in one and not the other.
    """
    images = as_image_batch(inputs)
    session = ort.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    try:
        got = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images})))
    except Exception as exc:  # ORT's own errors (wrong shape, ...) are long and not ValueErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompileError(f"ONNX Runtime failed on inputs of shape {images.shape}: {first}") from exc
    want = _torch_outputs(model, images, names)

    diffs = {name: _max_abs_diff(want[name], got[name], name) for name in names}
    for name, diff in diffs.items():
        if not diff <= tol:
            raise CompileError(f"ONNX parity failed: {name} differs by {diff:.1e} > tol {tol:.1e}")
    return diffs


def as_image_batch(inputs: np.ndarray | torch.Tensor) -> np.ndarray:
    """Contiguous float32 (N, C, H, W) array with N >= 1: the one dtype the graph's input takes."""
    array = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    if array.ndim != 4 or len(array) == 0:
        raise CompileError(f"parity inputs must be a non-empty (N, C, H, W) batch, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _torch_outputs(model: nn.Module, images: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """The model's outputs as numpy, keyed like the graph's outputs; the model's mode is restored."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(images).to(device))
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor):
        if len(names) != 1:
            raise CompileError(f"model returns one tensor but the ONNX graph has outputs {names}")
        out = {names[0]: out}
    missing = [n for n in names if n not in out]
    if missing:
        raise CompileError(f"model outputs {sorted(out)} lack ONNX outputs {missing}")
    return {n: out[n].detach().cpu().numpy() for n in names}


def _max_abs_diff(want: np.ndarray, got: np.ndarray, name: str) -> float:
    """Max |want - got|; equal infs and matching NaNs count as equal, any other NaN as infinite."""
    if want.shape != got.shape:
        raise CompileError(f"ONNX parity failed: {name} has shape {got.shape}, PyTorch gives {want.shape}")
    if want.size == 0:
        return 0.0
    want64, got64 = want.astype(np.float64), got.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN here; handled just below
        diff = np.abs(want64 - got64)
    same = (want64 == got64) | (np.isnan(want64) & np.isnan(got64))
    diff = np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf))
    return float(diff.max())
