"""Check a batch of images against a bundle's input spec before any backend sees it.

What a bundle takes: float32 ``(N, 3, H, W)`` images already normalised per channel with the
manifest's ``input.mean`` / ``input.std``, i.e. ``(pixel / 255 - mean) / std`` — the same
preprocessing the training data had. :func:`normalize` applies it to 0–1 images.

Backends report a bad input with long, backend-specific messages (or, worse, broadcast it);
checking here gives one line that names the problem and the fix. Nothing is converted
silently: a float64 batch is refused with the cast to apply, because a hidden copy would
distort latency measurements and hide a caller's preprocessing bug.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from taskfold.runtime.errors import InputError


def _shape_text(shape: list[int]) -> str:
    """Spec shape with dynamic dimensions written as N, e.g. ``(N,3,64,64)``."""
    return "(" + ",".join("N" if d is None or d < 0 else str(d) for d in shape) + ")"


def check_images(images: Any, spec: dict[str, Any], *, allow_nonfinite: bool = False) -> np.ndarray:
    """Return ``images`` unchanged if it fits ``spec`` (the manifest ``input``); else InputError.

    NaN or infinite values are refused unless ``allow_nonfinite``: a network turns them into
    NaN outputs, which downstream code would read as predictions.
    """
    shape = list(spec["shape"])
    want = _shape_text(shape)
    if not isinstance(images, np.ndarray):
        raise InputError(f"expected a numpy array of shape {want}, got {type(images).__name__}")
    got = "(" + ",".join(str(d) for d in images.shape) + ")"
    if images.ndim != len(shape):
        raise InputError(f"expected a {len(shape)}-D NCHW batch {want}, got shape {got}")
    if images.shape[0] == 0:
        raise InputError(f"expected a non-empty batch {want}, got shape {got}")
    if shape[1] is not None and shape[1] > 0 and images.shape[1] != shape[1]:
        raise InputError(f"expected {shape[1]} channels (shape {want}), got {images.shape[1]} in shape {got}")
    fixed = [(axis, d) for axis, d in enumerate(shape) if axis >= 2 and d is not None and d > 0]
    if any(images.shape[axis] != d for axis, d in fixed):
        size = "x".join(str(d) for d in shape[2:])
        got_size = "x".join(str(d) for d in images.shape[2:])
        raise InputError(f"expected spatial size {size} (shape {want}), got {got_size} in shape {got}")
    dtype = np.dtype(spec.get("dtype", "float32"))
    if images.dtype != dtype:
        raise InputError(
            f"expected dtype {dtype}, got {images.dtype}; convert with images.astype(np.{dtype})"
        )
    if not allow_nonfinite and np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        bad = int(np.count_nonzero(~np.isfinite(images)))
        raise InputError(f"the images hold {bad} NaN/inf value(s); fix the input "
                         "(or pass allow_nonfinite=True to run it anyway)")
    return images


def normalize(images: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """``(images - mean) / std`` per channel with the manifest's ``input.mean``/``input.std``, for
    0–1 images ``(N, C, H, W)``; the result is float32."""
    mean, std = spec.get("mean"), spec.get("std")
    if mean is None or std is None:
        raise InputError("this bundle's manifest has no input.mean/input.std to normalise with")
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1] != len(mean):
        shape = getattr(images, "shape", None)
        raise InputError(f"normalize: expected an (N,{len(mean)},H,W) array of 0-1 images, got shape {shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise InputError(f"normalize: expected 0-1 float images, got dtype {images.dtype} "
                         "(convert 0-255 images with images / 255)")
    finite = images[np.isfinite(images)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise InputError(f"normalize: expected 0-1 images, got values in [{finite.min():.3g}, {finite.max():.3g}] "
                         "(convert 0-255 images with images / 255)")
    if any(v == 0 for v in std):
        raise InputError("this bundle's manifest has a zero input.std")
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((images.astype(np.float32) - m) / s).astype(np.float32)
