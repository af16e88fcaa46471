"""``load(bundle) -> Predictor``: verify a bundle, pick a backend, answer ``{task: array}``.

The predictor hides which method produced the graph: every bundle is one graph with one
output per task, and the manifest maps each task to its output name. Backends are looked up
by name in ``BACKENDS``; an unknown name or an unusable backend raises BackendUnavailable
listing what exists, never a silent substitute. ``precision`` picks which of the bundle's
graphs runs (FP32, or an INT8/FP16 variant the compiler added) and ``provider`` where
(:mod:`taskfold.runtime.providers`); the predictor reports both. ``predictor(x, tasks=[...])``
runs a pruned sub-graph that computes only the asked tasks (see :mod:`taskfold.runtime.subsets`).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from taskfold.runtime.backend_ort import OrtBackend
from taskfold.runtime.backend_torch import TorchBackend
from taskfold.runtime.backend_trt import TrtBackend
from taskfold.runtime.bundle import open_bundle
from taskfold.runtime.errors import BackendUnavailable, InputError
from taskfold.runtime.inputs import check_images
from taskfold.runtime.precision import graph_file, input_spec, resolve_precision
from taskfold.runtime.providers import execution_providers
from taskfold.runtime.subsets import SubsetGraphs


class Backend(Protocol):
    """What a backend gives the predictor: a run function and what it actually runs on."""

    provider: str
    threads: int | None

    def run(self, images: np.ndarray, output_names: list[str]) -> list[np.ndarray]: ...


BACKENDS: dict[str, Callable[..., Backend]] = {"onnxruntime": OrtBackend, "tensorrt": TrtBackend,
                                               "torch": TorchBackend}


class BundleCost(dict):
    """The manifest's ``cost`` (macs, params, per_task_macs), callable for the MACs of a task subset.

    ``predictor.cost["macs"]`` is the whole graph as compiled; ``predictor.cost(tasks=["seg", "depth"])``
    counts the graph that ``predictor(x, tasks=["seg", "depth"])`` runs, from that graph itself:
    blocks the tasks share once, other tasks' branches and heads not at all (so it is not the sum
    of their ``per_task_macs`` when they share blocks).
    """

    def __init__(self, manifest_cost: dict[str, Any], macs_of: Callable[[Sequence[str] | None], int]) -> None:
        super().__init__(manifest_cost)
        self._macs_of = macs_of

    def __call__(self, tasks: Sequence[str] | None = None) -> int:
        """MACs per image of running ``tasks`` (default: every task)."""
        return self._macs_of(tasks)


class Predictor:
    """A loaded bundle. Call it with an ``(N, C, H, W)`` float32 batch to get ``{task: array}``."""

    def __init__(self, bundle: Path, manifest: dict[str, Any], backend: Backend, backend_name: str,
                 precision: str, graphs: SubsetGraphs) -> None:
        self.bundle = bundle
        self.manifest = manifest
        self.backend = backend_name
        self.precision = precision
        self._backend = backend
        self._input_spec = input_spec(manifest, precision)
        self._task_outputs = {task["name"]: task["output"] for task in self.tasks}
        self._graphs = graphs
        self._subset_backends: dict[frozenset[str], Backend] = {}
        self._subset_lock = threading.Lock()

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
    def cost(self) -> BundleCost:
        """The manifest's ``cost`` (macs, params, per_task_macs; empty if absent); ``cost(tasks=[...])``
        gives the MACs of running only those tasks (see :class:`BundleCost`)."""
        return BundleCost(self.manifest.get("cost", {}),
                          lambda tasks: self._graphs.macs(self._outputs_of(self.task_names(tasks))))

    @property
    def provider(self) -> str:
        """The execution provider or engine that actually runs the graph."""
        return self._backend.provider

    @property
    def threads(self) -> int | None:
        """Intra-op CPU threads (None where the backend does not use CPU threads)."""
        return self._backend.threads

    def task_names(self, tasks: Sequence[str] | None = None) -> list[str]:
        """``tasks`` checked against the bundle (every task, in manifest order, when None)."""
        known = list(self._task_outputs)
        if tasks is None:
            return known
        if isinstance(tasks, str):
            raise InputError(f"tasks must be a list of task names, e.g. tasks=[{tasks!r}], not a string")
        names = list(tasks)
        unknown = [name for name in names if name not in self._task_outputs]
        if unknown:
            raise InputError(f"unknown task(s) {', '.join(map(repr, unknown))}; this bundle has {', '.join(known)}")
        if not names:
            raise InputError(f"tasks is empty; ask for at least one of {', '.join(known)}")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InputError(f"task(s) {', '.join(map(repr, twice))} asked more than once")
        return names

    def __call__(self, images: np.ndarray, *, tasks: Sequence[str] | None = None,
                 allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
        """``{task: output}`` for a batch normalised with the manifest's mean/std (see
        :func:`taskfold.runtime.inputs.normalize`), for every task or only ``tasks`` (in that order).
        NaN/inf pixels are refused (InputError) unless ``allow_nonfinite``: they would give NaN
        outputs that look like answers.

        With ``tasks``, a pruned graph that computes only those outputs runs (built on first use,
        then cached), so the call costs ``self.cost(tasks)`` MACs per image rather than the whole
        graph. A backend that cannot run a sub-graph (a TensorRT engine is built for the whole
        graph) runs everything and returns the asked outputs.
        """
        check_images(images, self.input_spec, allow_nonfinite=allow_nonfinite)
        names = self.task_names(tasks)
        outputs = self._outputs_of(names)
        backend = self._backend if len(names) == len(self._task_outputs) else self._backend_for(outputs)
        return dict(zip(names, backend.run(images, outputs)))

    def _outputs_of(self, names: list[str]) -> list[str]:
        return [self._task_outputs[name] for name in names]

    def _backend_for(self, outputs: list[str]) -> Backend:
        """The backend over the sub-graph computing ``outputs``, made once per set of outputs."""
        key = frozenset(outputs)
        with self._subset_lock:
            if key not in self._subset_backends:
                for_graph = getattr(self._backend, "for_graph", None)
                self._subset_backends[key] = (for_graph(self._graphs.graph(key)) if for_graph is not None
                                              else self._backend)
            return self._subset_backends[key]

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
    spin_wait: bool = True,
) -> Predictor:
    """Verify ``bundle`` (its manifest's hash, the sha256 of every file, the graph against the
    manifest) and open it with ``backend``, which runs exactly the bytes that were verified.

    ``precision`` ("fp32", "int8", "fp16"; default: the manifest's ``default_precision``, else
    fp32) picks the graph. ``provider`` (onnxruntime only: "auto" (default), "cpu", "cuda",
    "tensorrt") picks the execution providers, and ``providers`` lists them explicitly instead;
    a provider asked for by name that cannot start raises BackendUnavailable. ``threads`` sets the
    intra-op thread count (default: every CPU this process may use). ``spin_wait=False`` (onnxruntime
    only) lets idle intra-op threads sleep instead of spinning for work: for a process whose cores
    also run other threads, such as ``taskfold serve``'s event loop, which spinning threads starve.
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
    if not spin_wait and backend != "onnxruntime":
        raise BackendUnavailable(f"spin_wait= applies to the onnxruntime backend, not {backend!r}")
    options = {"spin_wait": spin_wait} if backend == "onnxruntime" else {}
    runner = BACKENDS[backend](verified, precision=chosen, providers=providers, threads=threads, **options)
    verified.verify_rest()  # the files the backend did not read (other variants, an engine)
    name, spec = graph_file(manifest, chosen), input_spec(manifest, chosen)
    # Task subsets prune this graph, read again through the bundle (its hash checked once more).
    graphs = SubsetGraphs(lambda: verified.graph(name, input_spec=spec).proto)
    return Predictor(verified.folder, manifest, runner, backend, chosen, graphs)
