"""What a lower-precision graph costs in accuracy, per task, with each task's own metrics.

A graph is scored on the run's test split by the trainer's own evaluation (``evaluate`` with the
tasks' meters), through a module that hands each batch to ONNX Runtime, so the figures are the
ones training reported, computed the same way. The guard compares a variant with the FP32 graph:
``--int8-max-drop METRIC=VALUE`` entries (``task.metric`` or ``metric`` for every task that has
it; ``VALUE`` absolute in the metric's unit, or ``N%`` of the FP32 value) or, when none is
given, ``DEFAULT_RELATIVE_DROP`` of each task's main metric. A drop is a change in the worse
direction (down for mIoU, up for an angle error).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from taskfold.compiler.errors import CompileError

DEFAULT_RELATIVE_DROP = 0.01  # 1 % of each task's main metric


class OnnxNetwork(nn.Module):
    """An ONNX graph behind ``nn.Module``'s call: ``forward(images) -> {output: tensor}``.

    Inputs are cast to the graph's input type (FP16 I/O graphs) and outputs back to float32, so
    the tasks' meters see what they see in training.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_dtype = np.float16 if graph_input.type == "tensor(float16)" else np.float32
        self.output_names = [output.name for output in self.session.get_outputs()]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = images.detach().cpu().numpy().astype(self.input_dtype)
        outputs = self.session.run(self.output_names, {self.input_name: feed})
        return {name: torch.from_numpy(np.asarray(value, dtype=np.float32))
                for name, value in zip(self.output_names, outputs)}


def evaluate_graph(path: str | os.PathLike, dataset, tasks: list) -> dict[str, dict[str, float]]:
    """Each task's test metrics (and mean loss) for the ONNX graph at ``path``."""
    from taskfold.trainer.loop import evaluate

    return evaluate(OnnxNetwork(path), dataset, tasks)


def metric_deltas(reference: dict[str, dict[str, float]], other: dict[str, dict[str, float]]
                  ) -> dict[str, dict[str, float]]:
    """``other - reference`` for every task and metric both have."""
    return {task: {m: other[task][m] - value for m, value in metrics.items() if m in other.get(task, {})}
            for task, metrics in reference.items()}


@dataclass(frozen=True)
class MaxDrop:
    """The largest accepted drop of one metric (``task`` None: every task that has ``metric``)."""

    task: str | None
    metric: str
    value: float
    relative: bool

    def limit(self, reference: float) -> float:
        return self.value * abs(reference) if self.relative else self.value

    def text(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


def parse_max_drops(entries: Sequence[str]) -> list[MaxDrop]:
    """``["seg.miou=0.01", "rmse=2%"]`` → MaxDrop entries; CompileError naming a malformed one."""
    drops = []
    for entry in entries:
        key, sep, text = str(entry).partition("=")
        key, text = key.strip(), text.strip()
        relative = text.endswith("%")
        try:
            value = float(text[:-1] if relative else text)
        except ValueError:
            value = float("nan")
        if not sep or not key or not np.isfinite(value) or value < 0:
            raise CompileError(f"--int8-max-drop {entry!r}: expected METRIC=VALUE or TASK.METRIC=VALUE with a "
                               "number >= 0, absolute or in percent (e.g. seg.miou=0.01, mean=2%)")
        task, _, metric = key.rpartition(".")
        drops.append(MaxDrop(task or None, metric, value / 100 if relative else value, relative))
    return drops


def resolve_limits(drops: list[MaxDrop], tasks: list) -> list[tuple[str, str, MaxDrop]]:
    """``(task, metric, MaxDrop)`` for every limit that applies; the default when ``drops`` is empty.

    A task or metric that does not exist raises CompileError listing what does (checked before
    anything slow runs).
    """
    if not drops:
        return [(t.name, t.main_metric, MaxDrop(t.name, t.main_metric, DEFAULT_RELATIVE_DROP, True)) for t in tasks]
    by_name = {t.name: t for t in tasks}
    limits = []
    for drop in drops:
        if drop.task is not None and drop.task not in by_name:
            raise CompileError(f"--int8-max-drop: no task {drop.task!r} (tasks: {', '.join(by_name)})")
        chosen = [by_name[drop.task]] if drop.task else [t for t in tasks if drop.metric in t.metrics]
        if not chosen or any(drop.metric not in t.metrics for t in chosen):
            have = sorted({f"{t.name}.{m}" for t in (chosen or tasks) for m in t.metrics})
            raise CompileError(f"--int8-max-drop: no metric {drop.metric!r}"
                               f"{f' for task {drop.task!r}' if drop.task else ''} (available: {', '.join(have)})")
        limits += [(t.name, drop.metric, drop) for t in chosen]
    return limits


def guard_violations(limits: list[tuple[str, str, MaxDrop]], tasks: list, reference: dict[str, dict[str, float]],
                     other: dict[str, dict[str, float]]) -> list[str]:
    """One line per limit ``other`` breaks, naming the task, the metric and the figures."""
    higher_better = {t.name: t.metrics for t in tasks}
    lines = []
    for task, metric, drop in limits:
        before, after = reference[task][metric], other[task][metric]
        worse = before - after if higher_better[task][metric] else after - before
        limit = drop.limit(before)
        if not worse <= limit:  # NaN counts as a violation
            lines.append(f"{task} {metric} {before:.4f} -> {after:.4f} "
                         f"(drop {worse:.4f} > allowed {limit:.4f} = {drop.text()})")
    return lines
