"""IAL: impartial auxiliary learning (METHODS.md, ``ial-unprejudiced-aux.txt`` Sec. III-C).

Two stages in one backward pass, one primary task p:

- decoder stage: every task-specific parameter (decoder/head) and each ``s_t = log sigma_t`` is
  trained on the uncertainty objective ``sum_t L_t / (2 sigma_t^2) + log sigma_t`` (Eqs. 3-5), so a
  task's weight depends only on its own loss and auxiliary decoders are trained in full;
- encoder stage: the gradient on the shared feature z is (Eqs. 6-8)

      grad_z L_p + sum_{a aux} f(sigma_a) * (|grad_z L_p| / |grad_z L_a|) * grad_z L_a,
      f(x) = min(1, g(1 - x)),

  and is back-propagated from z into the encoder (Eq. 10). Norm matching keeps the primary
  dominant whatever the tasks' natural gradient scales; f shrinks a noisy (high sigma) auxiliary
  task. sigma is read, not differentiated, here. ``on: params`` applies the same rule to the
  gradients of the shared parameters, for networks with no single shared z.

The paper leaves g open ("maps to [0, inf)"). Choices: ``relu`` (max(0, x), default: weight 0 at
sigma >= 1, rising as the task's loss falls below 1), ``sigmoid`` (always some weight, 0.5 at
sigma = 1), ``identity`` (an ablation: outside the paper's range, it turns the auxiliary gradient
around when sigma > 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.common import GradientStrategy, OnOptions
from taskfold.trainer.weighting.grads import (On, combined_backward, primary_index, scale_losses,
                                              strategy_parameter)
from taskfold.trainer.weighting.registry import WEIGHTINGS
from taskfold.trainer.weighting.uncertainty import sigma_logs, uncertainty_objective

G_FUNCTIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "identity": lambda x: x}


def auxiliary_weight(sigma: torch.Tensor, g: str) -> torch.Tensor:
    """``f(sigma) = min(1, g(1 - sigma))``, Eq. 9."""
    return G_FUNCTIONS[g](1 - sigma).clamp(max=1.0)


def ial_coefficients(gram: torch.Tensor, primary: int, f_sigma: torch.Tensor) -> torch.Tensor:
    """``beta_p = 1``, ``beta_a = f(sigma_a) |g_p| / |g_a|`` (0 for a zero auxiliary gradient)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    beta = torch.where(norms > 0, f_sigma * norms[primary] / norms.clamp(min=1e-300), torch.zeros_like(norms))
    beta[primary] = 1.0
    return beta


@WEIGHTINGS.register("ial")
class ImpartialAuxiliaryLearning(GradientStrategy):
    """Uncertainty-weighted decoders, primary-dominated encoder."""

    requires_primary = True

    needs = "shared_features"  # the default `on`; each instance sets its own

    @dataclass
    class Options(OnOptions):
        g: Literal["relu", "sigmoid", "identity"] = "relu"  # the keys of G_FUNCTIONS
        on: On = "features"
        init_log_sigma: float = 0.0

    def __init__(self, options: Options, tasks: list[str], task_weights: dict[str, float]) -> None:
        super().__init__(options, tasks, task_weights)
        self.tasks = list(tasks)
        self.g = options.g
        self.log_sigma = strategy_parameter([options.init_log_sigma] * len(self.tasks))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_sigma]

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        scaled = scale_losses(losses, self.task_weights)
        names = list(scaled)
        primary = primary_index(names, ctx)
        sigma = self.log_sigma.detach().exp().to("cpu", torch.float64)[[self.tasks.index(t) for t in names]]
        f_sigma = auxiliary_weight(sigma, self.g)
        decoder_objective = uncertainty_objective(scaled, self.log_sigma, self.tasks)
        combined_backward(scaled, ctx, self.on, lambda gram: ial_coefficients(gram, primary, f_sigma),
                          rest_total=decoder_objective)
        logs = sigma_logs(self.log_sigma, self.tasks)
        logs.update({f"aux_weight/{t}": float(f) for i, (t, f) in enumerate(zip(names, f_sigma)) if i != primary})
        return logs
