"""GCS: Du et al. (2018), "Adapting auxiliary losses using gradient similarity".

The shared part gets ``g_p + sum_a [cos(g_p, g_a) > 0] g_a``: an auxiliary gradient is used only
when it points the primary's way this step (the paper's unweighted variant, the default). With
``weighted: true`` it gets ``max(0, cos) g_a`` instead (the paper's weighted variant). Task heads
are trained on their own losses regardless.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.common import GradientStrategy, OnOptions
from taskfold.trainer.weighting.grads import combined_backward, primary_index, scale_losses
from taskfold.trainer.weighting.registry import WEIGHTINGS


def cosines_to(gram: torch.Tensor, primary: int) -> torch.Tensor:
    """Cosine between every task gradient and the primary's (0 where either gradient is zero)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    denom = norms * norms[primary]
    return torch.where(denom > 0, gram[:, primary] / denom.clamp(min=1e-300), torch.zeros_like(denom))


@WEIGHTINGS.register("gcs")
class GradientCosineSimilarity(GradientStrategy):
    """Gate each auxiliary gradient on its cosine with the primary gradient."""

    requires_primary = True

    @dataclass
    class Options(OnOptions):
        weighted: bool = False

    def __init__(self, options: Options, tasks: list[str], task_weights: dict[str, float]) -> None:
        super().__init__(options, tasks, task_weights)
        self.weighted = options.weighted

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        names = list(losses)
        primary = primary_index(names, ctx)
        logs: dict[str, float] = {}

        def rule(gram: torch.Tensor) -> torch.Tensor:
            cos = cosines_to(gram, primary)
            beta = cos.clamp(min=0) if self.weighted else (cos > 0).to(gram.dtype)
            beta[primary] = 1.0
            logs.update({f"cos/{t}": float(c) for i, (t, c) in enumerate(zip(names, cos)) if i != primary})
            return beta

        combined_backward(scale_losses(losses, self.task_weights), ctx, self.on, rule)
        return logs
