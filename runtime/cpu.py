"""What this CPU can do for 8-bit inference, read from the kernel's CPU flags (no extra package).

The fast and safe INT8 setting differs by CPU: x86 cores with VNNI (``avx512_vnni``,
``avx_vnni``, AMX) accumulate u8×s8 products in 32 bits, while plain AVX2 cores use
``VPMADDUBSW``, which adds two u8×s8 products into a saturating 16-bit lane, so full-range int8
weights can overflow there. The compiler picks its quantisation scheme from this and the
runtime refuses an INT8 graph built for VNNI on a CPU without it.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CPU_KINDS = ("vnni", "avx2", "arm")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` (x86) or ``Features`` (ARM) of the first CPU in /proc/cpuinfo; empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``model name`` in /proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_kind() -> str:
    """``vnni``, ``avx2`` (x86 without a VNNI instruction) or ``arm``: what picks the INT8 scheme."""
    if platform.machine().lower() in ("aarch64", "arm64") or platform.machine().lower().startswith("arm"):
        return "arm"
    return "vnni" if any(flag in cpu_flags() for flag in VNNI_FLAGS) else "avx2"
