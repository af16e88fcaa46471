"""GradNorm: Chen, Badrinarayanan, Lee & Rabinovich (ICML 2018).

Learnable task weights w_t (init 1). The network is trained on ``sum_t w_t L_t``; the weights are
trained on ``L_grad = sum_t |G_t - mean(G) * r_t^alpha|`` with ``G_t = |grad_W (w_t L_t)| =
w_t |grad_W L_t|`` (W: the shared parameters, or the shared features with ``on: features``, which
stands in for the paper's "last shared layer"), ``r_t = (L_t/L_t(0)) / mean_k(L_k/L_k(0))`` and
the target ``mean(G) r_t^alpha`` held constant. Since G_t is linear in w_t,
``dL_grad/dw_t = sign(G_t - target_t) * |grad_W L_t|``: no double backward is needed.

The loop steps the optimiser after ``backward``, so the paper's renormalisation ``sum_t w_t = T``
(after each update) is applied at the start of the next ``backward``. L_t(0) is the first step's loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taskfold.trainer.weighting.base import StepContext
from taskfold.trainer.weighting.common import GradientStrategy, OnOptions
from taskfold.trainer.weighting.grads import combined_backward, scale_losses, strategy_parameter
from taskfold.trainer.weighting.registry import WEIGHTINGS


def gradnorm_weight_grad(weights: torch.Tensor, grad_norms: torch.Tensor, loss_ratios: torch.Tensor,
                         alpha: float) -> torch.Tensor:
    """Gradient of ``L_grad`` w.r.t. the weights (float64), the target treated as a constant."""
    norms = weights * grad_norms
    relative = loss_ratios / loss_ratios.mean()
    target = norms.mean() * relative ** alpha
    return torch.sign(norms - target) * grad_norms


@WEIGHTINGS.register("gradnorm")
class GradNorm(GradientStrategy):
    """Learn task weights that equalise the tasks' gradient norms, scaled by training progress."""

    running_state = ("initial_losses",)

    @dataclass
    class Options(OnOptions):
        alpha: float = 1.5

    def __init__(self, options: Options, tasks: list[str], task_weights: dict[str, float]) -> None:
        super().__init__(options, tasks, task_weights)
        self.tasks = list(tasks)
        self.alpha = options.alpha
        self.weights = strategy_parameter([1.0] * len(self.tasks))
        self.initial_losses: torch.Tensor | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.weights]

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        scaled = scale_losses(losses, self.task_weights)
        names = [t for t in self.tasks if t in scaled]
        index = [self.tasks.index(t) for t in names]
        with torch.no_grad():
            self.weights.clamp_(min=1e-6)
            self.weights.mul_(len(self.tasks) / self.weights.sum())
        current = torch.stack([scaled[t].detach() for t in names]).to("cpu", torch.float64)
        if self.initial_losses is None:
            self.initial_losses = current.clamp(min=1e-12)
        w = self.weights.detach().to("cpu", torch.float64)[index]

        def rule(gram: torch.Tensor) -> torch.Tensor:
            grad = gradnorm_weight_grad(w, gram.diagonal().clamp(min=0).sqrt(),
                                        current / self.initial_losses[index], self.alpha)
            full = torch.zeros_like(self.weights)
            full[index] = grad.to(full)
            full = ctx.scaled(full)  # set directly, so scaled like every other grad the GradScaler unscales
            self.weights.grad = full if self.weights.grad is None else self.weights.grad + full
            return w

        ordered = {t: scaled[t] for t in names}
        rest = sum(float(wt) * ordered[t] for wt, t in zip(w, names))
        combined_backward(ordered, ctx, self.on, rule, rest_total=rest)
        return {f"weight/{t}": float(v) for t, v in zip(self.tasks, self.weights.detach())}
