"""EW: the plain (optionally fixed-weighted) sum of task losses — the baseline every method uses."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.common import StrategyBase
from taskfold.trainer.weighting.registry import WEIGHTINGS


@WEIGHTINGS.register("ew")
class EqualWeighting(StrategyBase):
    """``sum_t w_t * L_t`` with the fixed per-task weights of the config (default 1)."""

    @dataclass
    class Options:
        pass

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        total = sum(self.task_weights.get(t, 1.0) * loss for t, loss in losses.items())
        ctx.backward(total)
        return {}
