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
from taskfold.models.modes import eval_mode


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
    ``tol`` or has another shape, and when any output of either side holds NaN or inf: the
    inputs are held-out images, and a graph that answers them with NaN never ships.
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
    for side, outputs in (("ONNX Runtime", got), ("PyTorch", want)):
        bad = [name for name in names if not np.isfinite(outputs[name]).all()]
        if bad:
            raise CompileError(f"outputs on held-out data contain NaN/inf ({', '.join(bad)}, {side}); "
                               "refusing to ship this graph")

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
    with eval_mode(model), torch.no_grad():
        out = model(torch.from_numpy(images).to(device))
    if isinstance(out, torch.Tensor):
        if len(names) != 1:
            raise CompileError(f"model returns one tensor but the ONNX graph has outputs {names}")
        out = {names[0]: out}
    missing = [n for n in names if n not in out]
    if missing:
        raise CompileError(f"model outputs {sorted(out)} lack ONNX outputs {missing}")
    return {n: out[n].detach().cpu().numpy() for n in names}


def _max_abs_diff(want: np.ndarray, got: np.ndarray, name: str) -> float:
    """Max |want - got|; NaN anywhere (even in both) counts as an infinite difference."""
    if want.shape != got.shape:
        raise CompileError(f"ONNX parity failed: {name} has shape {got.shape}, PyTorch gives {want.shape}")
    if want.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
    return float(np.nan_to_num(diff, nan=np.inf).max())
