"""Is a CUDA device visible? Asked of the driver itself, so no torch or CUDA toolkit is needed.

GPU backends are selected only when this says yes; otherwise they raise BackendUnavailable
with the returned reason, which is why the answer is a sentence rather than a bool.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

_DRIVER_NAMES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll", "libcuda.dylib")


def _load_driver() -> ctypes.CDLL | None:
    """The CUDA driver library, or None when it is not installed."""
    candidates = list(_DRIVER_NAMES)
    found = ctypes.util.find_library("cuda")
    if found:
        candidates.insert(0, found)
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """None when at least one CUDA device is usable, else why not (one short clause)."""
    driver = _load_driver()
    if driver is None:
        return "no CUDA device is visible (the CUDA driver library libcuda is not installed)"
    status = driver.cuInit(0)
    if status != 0:
        return f"no CUDA device is visible (cuInit failed with CUDA error {status})"
    count = ctypes.c_int(0)
    status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0 or count.value == 0:
        return "no CUDA device is visible (the driver reports 0 devices)"
    return None
