"""UW: Kendall, Gal & Cipolla (2018) homoscedastic-uncertainty weighting.

Form used (the paper's regression form, also IAL's decoder stage, METHODS.md):

    sum_t  L_t / (2 sigma_t^2) + log sigma_t,   learnable s_t = log sigma_t (init 0: sigma = 1).

The other common form ``exp(-s') L + s'/2`` (s' = log sigma^2) is the same objective up to the
constant change of variable s' = 2s + log 2; ours starts each task at weight 1/2 instead of 1, and
keeps sigma itself meaningful for IAL's ``f(sigma)``. The optimum of s_t is sigma_t^2 = L_t, so each
task's weight depends on its own loss only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.common import StrategyBase
from taskfold.trainer.weighting.grads import scale_losses, strategy_parameter
from taskfold.trainer.weighting.registry import WEIGHTINGS


def uncertainty_objective(losses: dict[str, torch.Tensor], log_sigma: nn.Parameter,
                          tasks: list[str]) -> torch.Tensor:
    """``sum_t exp(-2 s_t) / 2 * L_t + s_t`` over the tasks present in ``losses``."""
    return sum(0.5 * torch.exp(-2 * log_sigma[i]) * losses[t] + log_sigma[i]
               for i, t in enumerate(tasks) if t in losses)


def sigma_logs(log_sigma: nn.Parameter, tasks: list[str]) -> dict[str, float]:
    """``sigma/<task>`` and ``weight/<task>`` = 1 / (2 sigma^2), for the run log."""
    sigma = log_sigma.detach().exp().tolist()
    logs = {f"sigma/{t}": s for t, s in zip(tasks, sigma)}
    logs.update({f"weight/{t}": 0.5 / s ** 2 for t, s in zip(tasks, sigma)})
    return logs


@WEIGHTINGS.register("uw")
class UncertaintyWeighting(StrategyBase):
    """Learned per-task weights ``1/(2 sigma_t^2)``, with ``log sigma_t`` as the regulariser."""

    @dataclass
    class Options:
        init_log_sigma: float = 0.0

    def __init__(self, options: Options, tasks: list[str], task_weights: dict[str, float]) -> None:
        super().__init__(options, tasks, task_weights)
        self.tasks = list(tasks)
        self.log_sigma = strategy_parameter([options.init_log_sigma] * len(self.tasks))

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_sigma]

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        ctx.backward(uncertainty_objective(scale_losses(losses, self.task_weights), self.log_sigma, self.tasks))
        return sigma_logs(self.log_sigma, self.tasks)
