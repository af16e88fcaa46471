"""``load(bundle) -> Predictor``: verify a bundle, pick a backend, answer ``{task: array}``.

The predictor hides which method produced the graph: every bundle is one graph with one
output per task, and the manifest maps each task to its output name. Backends are looked up
by name in ``BACKENDS``; an unknown name or an unusable backend raises BackendUnavailable
listing what exists, never a silent substitute. ``precision`` picks which of the bundle's
graphs runs (FP32, or an INT8/FP16 variant the compiler added) and ``provider`` where
(:mod:`taskfold.runtime.providers`); the predictor reports both.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from taskfold.runtime.backend_ort import OrtBackend
from taskfold.runtime.backend_torch import TorchBackend
from taskfold.runtime.backend_trt import TrtBackend
from taskfold.runtime.bundle import open_bundle
from taskfold.runtime.errors import BackendUnavailable
from taskfold.runtime.inputs import check_images
from taskfold.runtime.precision import input_spec, resolve_precision
from taskfold.runtime.providers import execution_providers


class Backend(Protocol):
    """What a backend gives the predictor: a run function and what it actually runs on."""

    provider: str
    threads: int | None

    def run(self, images: np.ndarray, output_names: list[str]) -> list[np.ndarray]: ...


BACKENDS: dict[str, Callable[..., Backend]] = {"onnxruntime": OrtBackend, "tensorrt": TrtBackend,
                                               "torch": TorchBackend}


class Predictor:
    """A loaded bundle. Call it with an ``(N, C, H, W)`` float32 batch to get ``{task: array}``."""

    def __init__(self, bundle: Path, manifest: dict[str, Any], backend: Backend, backend_name: str,
                 precision: str = "fp32") -> None:
        self.bundle = bundle
        self.manifest = manifest
        self.backend = backend_name
        self.precision = precision
        self._backend = backend
        self._input_spec = input_spec(manifest, precision)
        self._outputs = [task["output"] for task in self.tasks]

    @property
    def tasks(self) -> list[dict[str, Any]]:
        """Task entries from the manifest (name, kind, output, shape, classes)."""
        return self.manifest["tasks"]

    @property
    def input_spec(self) -> dict[str, Any]:
        """The manifest's ``input``: name, shape (-1 = any), dtype, layout, mean, std (dtype float16
        for an FP16 graph compiled with FP16 inputs)."""
        return self._input_spec

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
        return (f"Predictor({self.manifest['name']!r}, tasks=[{names}], precision={self.precision!r}, "
                f"provider={self.provider!r})")


def load(
    bundle: str | os.PathLike[str],
    backend: str = "onnxruntime",
    *,
    precision: str | None = None,
    provider: str | None = None,
    providers: Sequence[Any] | None = None,
    threads: int | None = None,
) -> Predictor:
    """Verify ``bundle`` (its manifest's hash, the sha256 of every file, the graph against the
    manifest) and open it with ``backend``, which runs exactly the bytes that were verified.

    ``precision`` ("fp32", "int8", "fp16"; default: the manifest's ``default_precision``, else
    fp32) picks the graph. ``provider`` (onnxruntime only: "auto" (default), "cpu", "cuda",
    "tensorrt") picks the execution providers, and ``providers`` lists them explicitly instead;
    a provider asked for by name that cannot start raises BackendUnavailable. ``threads`` sets the
    intra-op thread count (default: every CPU this process may use).
    """
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    verified = open_bundle(bundle)
    manifest = verified.manifest
    chosen = resolve_precision(manifest, precision)
    if backend == "onnxruntime":
        if provider is not None and providers is not None:
            raise BackendUnavailable("give provider= (auto, cpu, cuda, tensorrt) or providers= (a list), not both")
        providers = providers if providers is not None else execution_providers(provider or "auto")
    elif provider is not None:
        raise BackendUnavailable(f"provider= applies to the onnxruntime backend, not {backend!r}")
    runner = BACKENDS[backend](verified, precision=chosen, providers=providers, threads=threads)
    verified.verify_rest()  # the files the backend did not read (other variants, an engine)
    return Predictor(verified.folder, manifest, runner, backend, chosen)
