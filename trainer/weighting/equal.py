"""EW: the plain (optionally fixed-weighted) sum of task losses — the baseline every method uses."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("ew")
class EqualWeighting:
    """``sum_t w_t * L_t`` with the fixed per-task weights of the config (default 1)."""

    needs = "losses"

    @dataclass
    class Options:
        pass

    def __init__(self, options: Options, tasks: list[str], task_weights: dict[str, float]) -> None:
        self.task_weights = task_weights

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        total = sum(self.task_weights.get(t, 1.0) * loss for t, loss in losses.items())
        total.backward()
        return {}

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        pass
