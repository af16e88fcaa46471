"""Which graph of a bundle runs: ``precision="fp32"|"int8"|"fp16"`` → a file the manifest lists.

A bundle always holds ``model.onnx`` (FP32); ``taskfold compile --int8/--fp16`` adds variants
under the manifest's ``precisions`` (file, scheme, per-task metrics) and may make one of them
the ``default_precision``. An INT8 graph quantised for VNNI CPUs (full-range weights) is
refused on an x86 CPU without VNNI, where its fused convolutions can saturate.
"""
from __future__ import annotations

from typing import Any

from taskfold.runtime.cpu import cpu_kind
from taskfold.runtime.errors import BackendUnavailable, BundleError

PRECISIONS = ("fp32", "int8", "fp16")
FP32_FILE = "model.onnx"


def held_precisions(manifest: dict[str, Any]) -> list[str]:
    """The precisions whose graph the bundle holds, FP32 first."""
    return ["fp32", *(p for p in manifest.get("precisions", {}) if p != "fp32")]


def resolve_precision(manifest: dict[str, Any], precision: str | None) -> str:
    """``precision``, or the manifest's default; BundleError when the bundle holds no such graph."""
    chosen = precision or manifest.get("default_precision", "fp32")
    held = held_precisions(manifest)
    if chosen not in held:
        hint = " (compile with --int8 or --fp16 to add one)" if chosen in PRECISIONS else ""
        raise BundleError(f"bundle {manifest.get('name')!r} has no {chosen!r} graph; it holds: "
                          f"{', '.join(held)}{hint}")
    return chosen


def graph_file(manifest: dict[str, Any], precision: str) -> str:
    """The file of ``precision``'s graph, which must be listed (and so hashed) in the manifest."""
    name = FP32_FILE if precision == "fp32" else manifest["precisions"][precision].get("file")
    if not isinstance(name, str) or name not in manifest["files"]:
        raise BundleError(f"bundle {manifest.get('name')!r}: manifest.json does not list the {precision} graph "
                          f"{name!r} in its files")
    return name


def input_spec(manifest: dict[str, Any], precision: str) -> dict[str, Any]:
    """The manifest's ``input``, with dtype float16 for an FP16 graph compiled with FP16 I/O."""
    entry = manifest.get("precisions", {}).get(precision, {})
    return {**manifest["input"], "dtype": "float16"} if entry.get("io") == "fp16" else manifest["input"]


def check_int8_cpu(manifest: dict[str, Any], precision: str, providers: list[str]) -> None:
    """Refuse a VNNI-targeted INT8 graph on the CPU provider of an x86 CPU without VNNI."""
    if precision != "int8" or providers[0] != "CPUExecutionProvider":
        return
    target = manifest["precisions"]["int8"].get("scheme", {}).get("target")
    if target == "vnni" and cpu_kind() == "avx2":
        raise BackendUnavailable(
            "the INT8 graph was quantised for CPUs with VNNI (full-range weights); on this CPU (AVX2 without "
            "VNNI) its fused convolutions can saturate: recompile with --int8-target avx2")
