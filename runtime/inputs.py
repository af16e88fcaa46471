"""Check a batch of images against a bundle's input spec before any backend sees it.

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


def check_images(images: Any, spec: dict[str, Any]) -> np.ndarray:
    """Return ``images`` unchanged if it fits ``spec`` (the manifest ``input``); else InputError."""
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
    return images
