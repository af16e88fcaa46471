"""``provider="auto"|"cpu"|"cuda"|"tensorrt"`` → ONNX Runtime execution providers, never silently.

``auto`` takes the CUDA provider when a CUDA device and ``onnxruntime-gpu`` are both present, else
the CPU; it reports what it chose through ``Predictor.provider``. It does not take the TensorRT
provider on its own, because that one builds an engine per input shape when a session starts
(minutes); ask for it by name. A provider asked for by name that cannot run here raises
BackendUnavailable saying why (no device, the CPU-only onnxruntime wheel, or both wheels
installed at once, which leaves whichever was installed last in charge of the module).
"""
from __future__ import annotations

import importlib.metadata

import onnxruntime as ort

from taskfold.runtime.cuda import cuda_unavailable_reason
from taskfold.runtime.errors import BackendUnavailable

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
CHAINS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    # ONNX Runtime assigns what TensorRT cannot run to CUDA, then to the CPU
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def execution_providers(provider: str) -> list[str]:
    """The provider chain for ``provider``; BackendUnavailable when a named GPU provider cannot run."""
    if provider not in PROVIDERS:
        raise BackendUnavailable(f"unknown provider {provider!r}; available: {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if provider == "auto":
        usable = cuda_unavailable_reason() is None and CHAINS["cuda"][0] in available
        return CHAINS["cuda" if usable else "cpu"]
    if provider == "cpu":
        return CHAINS["cpu"]
    first = CHAINS[provider][0]
    if first not in available:
        raise BackendUnavailable(f"provider {provider!r}: this onnxruntime build has no {first} "
                                 f"(available: {', '.join(available)}); {wheel_advice()}")
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"provider {provider!r} needs CUDA: {reason}")
    return CHAINS[provider]


def wheel_advice() -> str:
    """How to get a GPU build of onnxruntime, tailored to what is installed now."""
    installed = [name for name in ("onnxruntime", "onnxruntime-gpu") if _installed(name)]
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    if len(installed) == 2:
        return f"onnxruntime and onnxruntime-gpu are both installed and overwrite each other's files: {fix}"
    return f"replace the CPU build with the GPU one: {fix}"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
