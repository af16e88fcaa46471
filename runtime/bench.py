"""Latency and throughput of a loaded predictor, per batch size.

Each timed call is the whole ``predictor(images)`` (input checks, backend run, output dict),
which is what a caller of the runtime pays. Warm-up calls are discarded so one-time costs
(memory arena growth, kernel selection) do not land in the percentiles.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import numpy as np

from taskfold.runtime.errors import InputError
from taskfold.runtime.predictor import Predictor


def _batch_shape(predictor: Predictor, batch: int) -> tuple[int, ...]:
    """The input shape with the batch set; every other dimension must be fixed in the manifest."""
    rest = list(predictor.input_spec["shape"][1:])
    if any(d is None or d < 1 for d in rest):
        raise InputError(f"cannot benchmark input shape {predictor.input_spec['shape']}: only the batch may be dynamic")
    return (batch, *rest)


def benchmark(
    predictor: Predictor,
    batch_sizes: Iterable[int] = (1, 8),
    *,
    warmup: int = 5,
    iters: int = 30,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per batch size: batch, p50/p90/p99/mean latency in ms, throughput_ips, precision,
    provider, threads.

    ``tasks`` times ``predictor(images, tasks=tasks)``: the pruned graph of only those tasks.
    """
    if iters < 1 or warmup < 0:
        raise InputError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    rng = np.random.default_rng(seed)
    dtype = np.dtype(predictor.input_spec.get("dtype", "float32"))
    rows = []
    for batch in batch_sizes:
        if batch < 1:
            raise InputError(f"batch sizes must be >= 1, got {batch}")
        images = rng.standard_normal(_batch_shape(predictor, batch)).astype(dtype)
        for _ in range(warmup):
            predictor(images, tasks=tasks)
        times_ms = np.empty(iters)
        for i in range(iters):
            start = time.perf_counter()
            predictor(images, tasks=tasks)
            times_ms[i] = (time.perf_counter() - start) * 1e3
        p50, p90, p99 = np.percentile(times_ms, [50, 90, 99])
        mean_ms = float(times_ms.mean())
        rows.append({
            "batch": batch,
            "p50_ms": float(p50),
            "p90_ms": float(p90),
            "p99_ms": float(p99),
            "mean_ms": mean_ms,
            "throughput_ips": batch * 1e3 / mean_ms,
            "precision": predictor.precision,
            "provider": predictor.provider,
            "threads": predictor.threads,
        })
    return rows
