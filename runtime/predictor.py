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
from taskfold.runtime.bundle import open_bundle
from taskfold.runtime.errors import BackendUnavailable
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

    def __call__(self, images: np.ndarray, *, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
        """``{task: output}`` for a batch normalised with the manifest's mean/std (see
        :func:`taskfold.runtime.inputs.normalize`). NaN/inf pixels are refused (InputError) unless
        ``allow_nonfinite``: they would give NaN outputs that look like answers."""
        check_images(images, self.input_spec, allow_nonfinite=allow_nonfinite)
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
    """Verify ``bundle`` (its manifest's hash, the sha256 of every file, the graph against the
    manifest) and open it with ``backend``, which runs exactly the bytes that were verified.

    ``providers`` (onnxruntime only) lists execution providers in priority order, default CPU;
    a requested provider that cannot start raises BackendUnavailable. ``threads`` sets the
    intra-op thread count (default: every CPU this process may use).
    """
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    verified = open_bundle(bundle)
    runner = BACKENDS[backend](verified, providers=providers, threads=threads)
    verified.verify_rest()  # the files the backend did not read (a plan, other variants)
    return Predictor(verified.folder, verified.manifest, runner, backend)
