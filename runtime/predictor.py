"""``load(bundle) -> Predictor``: verify a bundle, pick a backend, answer ``{task: array}``.

The predictor hides which method produced the graph: every bundle is one graph with one
output per task, and the manifest maps each task to its output name. Backends are looked up
by name in ``BACKENDS``; an unknown name or an unusable backend raises BackendUnavailable
listing what exists, never a silent substitute.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from taskfold.runtime.backend_ort import OrtBackend
from taskfold.runtime.backend_trt import TrtBackend
from taskfold.runtime.bundle import verify_bundle
from taskfold.runtime.errors import BackendUnavailable, BundleError
from taskfold.runtime.inputs import check_images


class Backend(Protocol):
    """What a backend gives the predictor: a run function and what it actually runs on."""

    provider: str
    threads: int | None

    def run(self, images: np.ndarray, output_names: list[str]) -> list[np.ndarray]: ...


BACKENDS: dict[str, Callable[..., Backend]] = {"onnxruntime": OrtBackend, "tensorrt": TrtBackend}


class Predictor:
    """A loaded bundle. Call it with an ``(N, C, H, W)`` float32 batch to get ``{task: array}``."""

    def __init__(self, bundle: Path, manifest: dict[str, Any], backend: Backend, backend_name: str) -> None:
        self.bundle = bundle
        self.manifest = manifest
        self.backend = backend_name
        self._backend = backend
        self._outputs = [task["output"] for task in self.tasks]

    @property
    def tasks(self) -> list[dict[str, Any]]:
        """Task entries from the manifest (name, kind, output, shape, classes)."""
        return self.manifest["tasks"]

    @property
    def input_spec(self) -> dict[str, Any]:
        """The manifest's ``input``: name, shape (-1 = any), dtype, layout, mean, std."""
        return self.manifest["input"]

    @property
    def cost(self) -> dict[str, Any]:
        """The manifest's ``cost``: macs, params, per_task_macs (empty dict if absent)."""
        return self.manifest.get("cost", {})

    @property
    def provider(self) -> str:
        """The execution provider or engine that actually runs the graph."""
        return self._backend.provider

    @property
    def threads(self) -> int | None:
        """Intra-op CPU threads (None where the backend does not use CPU threads)."""
        return self._backend.threads

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        check_images(images, self.input_spec)
        arrays = self._backend.run(images, self._outputs)
        return {task["name"]: array for task, array in zip(self.tasks, arrays)}

    def __repr__(self) -> str:
        names = ", ".join(task["name"] for task in self.tasks)
        return f"Predictor({self.manifest['name']!r}, tasks=[{names}], provider={self.provider!r})"


def load(
    bundle: str | os.PathLike[str],
    backend: str = "onnxruntime",
    *,
    providers: Sequence[Any] | None = None,
    threads: int | None = None,
) -> Predictor:
    """Verify ``bundle`` (sha256 of every file) and open it with ``backend``.

    ``providers`` (onnxruntime only) lists execution providers in priority order, default CPU;
    a requested provider that cannot start raises BackendUnavailable. ``threads`` sets the
    intra-op thread count (default: every CPU this process may use).
    """
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    folder = Path(bundle)
    manifest = verify_bundle(folder)
    if "model.onnx" not in manifest["files"]:
        raise BundleError(f"bundle {folder}: manifest.json does not list model.onnx")
    outputs = [task.get("output") for task in manifest["tasks"]]
    if not outputs or not all(isinstance(name, str) for name in outputs):
        raise BundleError(f"bundle {folder}: every task in manifest.json needs an 'output' name")
    runner = BACKENDS[backend](folder, manifest, providers=providers, threads=threads)
    return Predictor(folder, manifest, runner, backend)
