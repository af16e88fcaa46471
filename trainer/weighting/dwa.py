"""DWA: Liu, Johns & Davison (2019) Dynamic Weight Average.

``w_t = T * softmax_t(r_t / tau)`` with ``r_t = L_t(e-1) / L_t(e-2)``, the ratio of the task's mean
training loss over the last two epochs: a task whose loss has stopped falling gets more weight.
Epochs 0 and 1 have no two-epoch history and use ``w_t = 1``. The history comes from
``end_epoch``, which the loop calls with each task's mean (raw, unweighted) training loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.common import StrategyBase
from taskfold.trainer.weighting.grads import scale_losses
from taskfold.trainer.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("dwa")
class DynamicWeightAverage(StrategyBase):
    """Loss weights from each task's recent rate of descent; no gradients are inspected."""

    running_state = ("history",)

    @dataclass
    class Options:
        temperature: float = 2.0

    def __init__(self, options: Options, tasks: list[str], task_weights: dict[str, float]) -> None:
        super().__init__(options, tasks, task_weights)
        self.tasks = list(tasks)
        self.temperature = options.temperature
        self.history: list[dict[str, float]] = []

    def weights(self) -> dict[str, float]:
        """This epoch's weights (uniform until two epochs of history exist)."""
        if len(self.history) < 2:
            return {t: 1.0 for t in self.tasks}
        last, before = self.history[-1], self.history[-2]
        ratios = [last[t] / max(before[t], 1e-12) for t in self.tasks]
        top = max(ratios)
        exps = [math.exp((r - top) / self.temperature) for r in ratios]
        return {t: len(self.tasks) * e / sum(exps) for t, e in zip(self.tasks, exps)}

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        weights = self.weights()
        scaled = scale_losses(losses, self.task_weights)
        ctx.backward(sum(weights[t] * loss for t, loss in scaled.items()))
        return {f"weight/{t}": w for t, w in weights.items()}

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        self.history = (self.history + [dict(epoch_losses)])[-2:]
