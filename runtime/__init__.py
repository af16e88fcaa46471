"""Load a taskfold bundle and run it without PyTorch; count MACs of ONNX graphs; benchmark.

Imports only numpy, onnx and onnxruntime (GPU libraries are imported lazily by the backend
that needs them), so a service can ``pip install`` the runtime without torch.
"""
from __future__ import annotations

from taskfold.runtime.bench import benchmark
from taskfold.runtime.bundle import sha256_file, verify_bundle, write_manifest
from taskfold.runtime.errors import BackendUnavailable, BundleError, InputError
from taskfold.runtime.flops import OnnxCost, count_onnx
from taskfold.runtime.predictor import BACKENDS, Predictor, load

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "BundleError",
    "InputError",
    "OnnxCost",
    "Predictor",
    "benchmark",
    "count_onnx",
    "load",
    "sha256_file",
    "verify_bundle",
    "write_manifest",
]
