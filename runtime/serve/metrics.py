"""Per-model counters and histograms, written in the Prometheus text format for ``GET /metrics``.

The same quantities as Triton's metrics endpoint (request successes and failures, inferences,
executions, request latency, time queued and time computing) plus the size of each ONNX Runtime
call and why it started (full, nothing else arriving, queue delay over), which show what dynamic
batching achieved. Every update happens on the server's event loop, so no locks are needed.
With ``--workers N`` each process keeps and serves its own numbers (a scrape reaches one
process; the ``pid`` of the process is in ``taskfold_process_info``).
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field

from taskfold.runtime.serve.batching import FULL, MAX_DELAY, NONE_ARRIVING, BatchRecord

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.total:.9g}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


@dataclass
class ModelMetrics:
    success: int = 0
    failures: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    inferences: int = 0  # images answered
    executions: int = 0  # ONNX Runtime calls
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    dispatches: dict[str, int] = field(default_factory=lambda: dict.fromkeys((FULL, NONE_ARRIVING, MAX_DELAY), 0))
    queue_s: float = 0.0  # summed over requests: queued until their call started
    compute_s: float = 0.0  # summed over calls

    def succeeded(self, seconds: float, images: int) -> None:
        self.success += 1
        self.inferences += images
        self.latency.observe(seconds)

    def failed(self, status: int) -> None:
        self.failures[status] = self.failures.get(status, 0) + 1

    def executed(self, batch: BatchRecord) -> None:
        self.executions += 1
        self.batch_size.observe(batch.rows)
        self.dispatches[batch.reason] += 1
        self.queue_s += batch.queued_s
        self.compute_s += batch.compute_s


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def render(models: dict[str, ModelMetrics], version: str) -> str:
    """The exposition text for every model (``version`` is the model version label)."""
    families: list[tuple[str, str, str, list[str]]] = [
        ("taskfold_request_success_total", "counter", "Inference requests answered with 200.", []),
        ("taskfold_request_failure_total", "counter", "Inference requests answered with an error, by HTTP status.", []),
        ("taskfold_inference_count_total", "counter", "Images inferred (a batch of N counts N).", []),
        ("taskfold_inference_exec_count_total", "counter", "ONNX Runtime calls (one per dynamic batch).", []),
        ("taskfold_request_duration_seconds", "histogram", "Time from request received to response ready.", []),
        ("taskfold_batch_size", "histogram", "Images per ONNX Runtime call, after dynamic batching.", []),
        ("taskfold_batch_dispatch_total", "counter", "ONNX Runtime calls by why they started: full (max batch), "
         "none_arriving (no other request on its way), max_delay (queue delay over).", []),
        ("taskfold_queue_duration_seconds_total", "counter", "Time requests waited in the batch queue, summed.", []),
        ("taskfold_compute_duration_seconds_total", "counter", "Time in ONNX Runtime calls, summed.", []),
    ]
    for name, m in models.items():
        labels = f'model="{_label(name)}",version="{_label(version)}"'
        families[0][3].append(f"taskfold_request_success_total{{{labels}}} {m.success}")
        families[1][3].extend(f'taskfold_request_failure_total{{{labels},code="{code}"}} {n}'
                              for code, n in sorted(m.failures.items()))
        families[2][3].append(f"taskfold_inference_count_total{{{labels}}} {m.inferences}")
        families[3][3].append(f"taskfold_inference_exec_count_total{{{labels}}} {m.executions}")
        families[4][3].extend(m.latency.lines("taskfold_request_duration_seconds", labels))
        families[5][3].extend(m.batch_size.lines("taskfold_batch_size", labels))
        families[6][3].extend(f'taskfold_batch_dispatch_total{{{labels},reason="{reason}"}} {n}'
                              for reason, n in m.dispatches.items())
        families[7][3].append(f"taskfold_queue_duration_seconds_total{{{labels}}} {m.queue_s:.9g}")
        families[8][3].append(f"taskfold_compute_duration_seconds_total{{{labels}}} {m.compute_s:.9g}")
    lines: list[str] = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
    lines += ["# HELP taskfold_process_info The serving process.", "# TYPE taskfold_process_info gauge",
              f'taskfold_process_info{{pid="{os.getpid()}"}} 1']
    resident = _resident_bytes()
    if resident is not None:
        lines += ["# HELP process_resident_memory_bytes Resident memory size in bytes.",
                  "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {resident}"]
    return "\n".join(lines) + "\n"
