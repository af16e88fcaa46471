"""The ONNX Runtime backend: one InferenceSession over one of the bundle's graphs (by precision).

The session is built from the verified bytes of the graph (and of its external-data files,
handed over in memory), never from a path, so what runs is exactly what was hashed.

Execution providers are never swapped behind the caller's back. ONNX Runtime itself quietly
drops a provider whose initialisation fails (e.g. CUDA without a GPU) and runs on the CPU;
this backend checks the session's providers after creation and raises instead.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort

from taskfold.runtime.bundle import VerifiedBundle
from taskfold.runtime.cuda import cuda_unavailable_reason
from taskfold.runtime.errors import BackendUnavailable, BundleError, InputError
from taskfold.runtime.precision import check_int8_cpu, graph_file, input_spec
from taskfold.runtime.providers import wheel_advice

ProviderSpec = Union[str, tuple[str, dict[str, Any]]]
DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _provider_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


class OrtBackend:
    """Runs the bundle's ONNX graph; ``provider`` is the provider ONNX Runtime actually uses first."""

    def __init__(
        self,
        bundle: VerifiedBundle,
        *,
        precision: str = "fp32",
        providers: Sequence[ProviderSpec] | None = None,
        threads: int | None = None,
        spin_wait: bool = True,
    ) -> None:
        requested = list(providers) if providers else list(DEFAULT_PROVIDERS)
        check_int8_cpu(bundle.manifest, precision, [_provider_name(s) for s in requested])
        available = ort.get_available_providers()
        for spec in requested:
            name = _provider_name(spec)
            if name not in available:
                raise BackendUnavailable(
                    f"onnxruntime provider {name!r} is not available in this onnxruntime build "
                    f"(available: {', '.join(available)})"
                    + (f"; {wheel_advice()}" if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "")
                )
        if threads is not None and threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        self.threads = threads if threads is not None else available_cpus()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        if not spin_wait:  # idle intra-op threads sleep rather than spin (see predictor.load)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        name = graph_file(bundle.manifest, precision)
        graph = bundle.graph(name, input_spec=input_spec(bundle.manifest, precision))
        if graph.external:
            names = list(graph.external)
            options.add_external_initializers_from_files_in_memory(
                names, [graph.external[n] for n in names], [len(graph.external[n]) for n in names])
        self._external = graph.external  # ONNX Runtime reads these buffers; keep them alive
        try:
            self.session = ort.InferenceSession(graph.data, sess_options=options, providers=requested)
        except Exception as exc:  # ORT's own errors: a graph it cannot load (bad op, bad weights)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"bundle {bundle.folder}: ONNX Runtime cannot load {name} ({first[:300]})") from None
        used = self.session.get_providers()
        dropped = [_provider_name(s) for s in requested if _provider_name(s) not in used]
        if dropped:
            reason = _cuda_reason(dropped) or "see the onnxruntime log for the cause (CUDA and cuDNN libraries?)"
            raise BackendUnavailable(
                f"onnxruntime could not start provider(s) {', '.join(dropped)} "
                f"(it would have run on {', '.join(used)} instead): {reason}"
            )
        self.provider = used[0]
        self.input_name = bundle.manifest["input"]["name"]
        self._options, self._providers = options, requested

    def for_graph(self, model: onnx.ModelProto) -> OrtBackend:
        """The same providers and threads over another graph (a pruned sub-graph of this one)."""
        other = copy.copy(self)
        other.session = ort.InferenceSession(model.SerializeToString(), sess_options=self._options,
                                             providers=self._providers)
        return other

    def run(self, images: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
        """Outputs in the order of ``output_names``."""
        return self.session.run(output_names, {self.input_name: images})


def _cuda_reason(dropped: list[str]) -> str | None:
    """Why CUDA-based providers failed to start, when that is the likely cause."""
    if not any(name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for name in dropped):
        return None
    return cuda_unavailable_reason()
