"""Gradient projection: PCGrad (Yu et al., 2020) and its auxiliary-learning variant PCGrad-Aux.

Both only ever subtract multiples of original task gradients, so the result is
``sum_t beta_t g_t`` and the coefficients follow from the Gram matrix alone
(``g_i' . g_j = c_i . gram[:, j]`` for ``g_i' = sum_k c_ik g_k``); :mod:`grads` applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.common import GradientStrategy, OnOptions
from taskfold.trainer.weighting.grads import combined_backward, primary_index, scale_losses
from taskfold.trainer.weighting.registry import WEIGHTINGS


def pcgrad_coefficients(gram: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PCGrad: each g_i, in turn, is projected onto the normal plane of every g_j it conflicts with
    (``g_i . g_j < 0``), visiting the other tasks in a fresh random order; the results are summed.
    Projections use the original g_j, as in the paper's Algorithm 1."""
    n = gram.shape[0]
    beta = torch.zeros(n, dtype=gram.dtype)
    for i in range(n):
        coeff = torch.zeros(n, dtype=gram.dtype)
        coeff[i] = 1.0
        for j in torch.randperm(n, generator=generator).tolist():
            dot = float(coeff @ gram[:, j])
            if j != i and dot < 0:
                coeff[j] -= dot / float(gram[j, j])
        beta += coeff
    return beta


def pcgrad_aux_coefficients(gram: torch.Tensor, primary: int) -> torch.Tensor:
    """PCGrad-Aux: the primary gradient is kept; an auxiliary gradient that conflicts with it is
    projected onto its normal plane (``g_a - (g_a . g_p / |g_p|^2) g_p``); no other pair is touched."""
    beta = torch.ones(gram.shape[0], dtype=gram.dtype)
    for a in range(gram.shape[0]):
        dot = float(gram[a, primary])
        if a != primary and dot < 0:
            beta[primary] -= dot / float(gram[primary, primary])
    return beta


def _conflicts(gram: torch.Tensor) -> float:
    """Number of task pairs whose gradients point against each other this step."""
    return float((torch.triu(gram, diagonal=1) < 0).sum())


@WEIGHTINGS.register("pcgrad")
class PCGrad(GradientStrategy):
    """Remove, pairwise, the part of each task gradient that conflicts with another's."""

    running_state = ("generator",)

    @dataclass
    class Options(OnOptions):
        seed: int = 0

    def __init__(self, options: Options, tasks: list[str], task_weights: dict[str, float]) -> None:
        super().__init__(options, tasks, task_weights)
        self.generator = torch.Generator().manual_seed(options.seed)

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        logs: dict[str, float] = {}

        def rule(gram: torch.Tensor) -> torch.Tensor:
            logs["conflicts"] = _conflicts(gram)
            return pcgrad_coefficients(gram, self.generator)

        combined_backward(scale_losses(losses, self.task_weights), ctx, self.on, rule)
        return logs


@WEIGHTINGS.register("pcgrad_aux")
class PCGradAux(GradientStrategy):
    """PCGrad restricted to auxiliary-vs-primary conflicts; the primary gradient is never altered."""

    requires_primary = True

    Options = OnOptions  # `on` is its only option

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        primary = primary_index(list(losses), ctx)
        logs: dict[str, float] = {}

        def rule(gram: torch.Tensor) -> torch.Tensor:
            logs["conflicts"] = float((gram[primary] < 0).sum())
            return pcgrad_aux_coefficients(gram, primary)

        combined_backward(scale_losses(losses, self.task_weights), ctx, self.on, rule)
        return logs
