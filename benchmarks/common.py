"""Helpers shared by the benchmark scripts: paired timing in one process, matmul peak.

This machine is shared and noisy, so every comparison is made side by side: the candidates are
timed in alternating rounds (the order rotates each round) and the script reports the ratio of
their medians, never an absolute number on its own.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import time
from typing import Callable

import numpy as np


def rotated(names: list, r: int) -> list:
    """``names`` in the order of round ``r``: rotated by one each round, so no candidate always
    runs first (or right after the same neighbour)."""
    return names[r % len(names):] + names[:r % len(names)]


def binary_infer_request(image: np.ndarray) -> tuple[bytes, str]:
    """A v2 infer request for ``image`` as input ``image``, binary in both directions (what
    tritonclient sends by default): the body and its ``Inference-Header-Content-Length``."""
    header = json.dumps({"inputs": [{"name": "image", "shape": list(image.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": image.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + image.tobytes(), str(len(header))


def paired_samples(candidates: dict[str, Callable[[], object]], *, rounds: int = 15, per_round: int = 5,
                   warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each candidate in every round, measured in alternating rounds (the
    order rotates each round), so round r of every candidate saw about the same machine load."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(rounds):
        for name in rotated(list(candidates), r):
            fn = candidates[name]
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - start) / per_round)
    return samples


def print_ratios(samples: dict[str, list[float]], base: str, width: int = 20) -> None:
    """One line per candidate of :func:`paired_samples`: median ms, ratio of medians to ``base``
    and the spread (min–max) of the per-round ratios."""
    for name, values in samples.items():
        ratios = [v / b for v, b in zip(values, samples[base])]
        print(f"{name:>{width}}: median {statistics.median(values) * 1e3:8.1f} ms  "
              f"{statistics.median(values) / statistics.median(samples[base]):6.2f}× {base}  "
              f"(per-round {min(ratios):.2f}–{max(ratios):.2f})")


def paired_medians(candidates: dict[str, Callable[[], object]], *, rounds: int = 15, per_round: int = 5,
                   warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in alternating rounds."""
    samples = paired_samples(candidates, rounds=rounds, per_round=per_round, warmup=warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


def fixed_batch_step(cfg, run_dir, batch: int) -> Callable[[], object]:
    """One weight step (``loop.weight_step``: forward, losses, the strategy's backward, the
    optimiser) of the run ``cfg`` sets up in ``run_dir``, on its first ``batch`` training samples."""
    from taskfold.trainer.data.loader import load_batch
    from taskfold.trainer.loop import setup, weight_step

    state = setup(cfg, run_dir)
    images, targets = state.to_device(*load_batch(state.datasets["train"], range(batch)))
    return lambda: weight_step(state, images, targets)


def matmul_peak_gflops(size: int = 1024, repeats: int = 20) -> float:
    """Best FP32 matrix-multiply throughput of this machine through PyTorch (GFLOP/s, 2·n³ flops)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def train_recipe(recipe: str, overrides: list[str], out_dir) -> dict:
    """Train one recipe with overrides into ``out_dir``, with every follow-up stage its method asks
    for (BMTAS's retrain, DMTG's fine-tune, in ``out_dir/retrain``); returns the last stage's test
    metrics and the first stage's read-off decision. A finished run with the same resolved config
    is reused (so an interrupted benchmark resumes); anything else in ``out_dir`` is replaced."""
    import shutil
    from pathlib import Path

    import yaml

    from taskfold.trainer.config import load_config
    from taskfold.trainer.loop import train_stages
    from taskfold.trainer.rundir import RunDir

    out_dir, cfg = Path(out_dir), load_config(recipe, overrides + ["train.progress=false"])
    run = RunDir(out_dir)
    done = run.last_stage().test_metrics()
    if done is not None and yaml.safe_load(run.config_path.read_text()) == cfg.to_dict():
        return {"test": done, "decision": run.load_arch().decision}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    summary, _ = train_stages(cfg, out_dir)
    summary["decision"] = run.load_arch().decision
    return summary


def mean_std(values: list[float]) -> str:
    import statistics

    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16",
              "avx512_fp16", "amx_bf16")


def cpu_line() -> str:
    """``lscpu``'s model name and the SIMD flags that decide the INT8 scheme and native bf16/fp16."""
    fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                  .splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    present = [f for f in SIMD_FLAGS if f in flags]
    absent = [f for f in SIMD_FLAGS if f not in flags]
    return (f"CPU: {fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs; "
            f"flags: {' '.join(present)} (no {' '.join(absent)})")
