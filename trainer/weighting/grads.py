"""Gradient plumbing shared by every gradient-based strategy (PCGrad, PCGrad-Aux, CAGrad, GCS,
GradNorm, IAL), so that each strategy module only states its rule.

Every one of those rules ends up giving the shared part of the network a *linear combination*
``sum_t beta_t * grad L_t`` of the task gradients, with coefficients ``beta`` that depend on the
gradients only through their Gram matrix (dot products, norms, cosines; PCGrad's projections too).
So a strategy is a function ``gram -> beta`` and this module does the rest:

1. per-task gradients on the *probe* tensors (the shared parameters, or the shared features z),
   with ``torch.autograd.grad(..., retain_graph=True)``;
2. one backward pass of the strategy's ``rest_total`` loss trains everything that is not shared
   (task heads, decoders, auxiliary branches, the strategy's own parameters), while a hook on each
   probe replaces the gradient arriving there with ``sum_t beta_t * grad L_t``: for parameters that
   is their ``.grad``; for z it is then back-propagated into the encoder, as IAL's Eq. 10 asks.
   No parameter list is needed beyond what :class:`StepContext` already says.
"""
from __future__ import annotations

import typing
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from taskfold.trainer.config import ConfigError
from taskfold.trainer.weighting.base import StepContext

On = Literal["params", "features"]  # where task gradients are compared: shared parameters or features
ON_CHOICES = typing.get_args(On)

# gram (T x T, float64, CPU) -> beta (T, float64, CPU)
CoefficientRule = Callable[[torch.Tensor], torch.Tensor]


def check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    """Raise the ConfigError ``build_options`` would raise for a bad value of a string option."""
    if value not in choices:
        raise ConfigError(f"weighting.{field}: expected one of {', '.join(choices)}, got {value!r}")


def scale_losses(losses: dict[str, torch.Tensor], task_weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Apply the config's fixed per-task weights: every strategy sees ``w_t * L_t`` as task t's loss."""
    return {t: task_weights.get(t, 1.0) * loss for t, loss in losses.items()}


def primary_index(names: list[str], ctx: StepContext) -> int:
    """Position of the single primary task among ``names`` (strategies with ``requires_primary``)."""
    if len(ctx.primary) != 1 or ctx.primary[0] not in names:
        raise ConfigError(f"this weighting needs exactly one primary task among {names}, got {ctx.primary}")
    return names.index(ctx.primary[0])


class SharedPart:
    """Where the task gradients are compared (``on``) and how their combination reaches the weights.

    ``on="params"`` probes ``ctx.shared_params``; ``on="features"`` probes ``ctx.shared_features``.
    Asking for features from a network that shares parameters but exposes no features is a
    configuration mistake and is refused rather than silently answered with something else.
    """

    def __init__(self, ctx: StepContext, on: str) -> None:
        check_choice("on", on, ON_CHOICES)
        self.on = on
        self.ctx = ctx
        source = ctx.shared_params if on == "params" else ctx.shared_features
        self.probes = [t for t in source if t.requires_grad]
        if on == "features" and not self.probes and any(p.requires_grad for p in ctx.shared_params):
            raise ConfigError("weighting.on: 'features' but this network exposes no shared_features; "
                              "use on: params")

    @property
    def empty(self) -> bool:
        """Nothing is shared: there is nothing to combine."""
        return not self.probes

    def task_grads(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[T, n]``: each loss's gradient on the probes, flattened (zeros where it does not reach),
        in float32 (features from an autocast forward are bf16/fp16) and unscaled (under fp16 the
        losses are differentiated loss-scaled, so small gradients survive, then divided back)."""
        rows = []
        for loss in losses:
            grads: Sequence[torch.Tensor | None] = [None] * len(self.probes)
            if loss.requires_grad:
                grads = torch.autograd.grad(self.ctx.scaled(loss), self.probes, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                                   for p, g in zip(self.probes, grads)]))
        grads = torch.stack(rows)
        return grads if self.ctx.loss_scale is None else grads / self.ctx.loss_scale

    def backward(self, grads: torch.Tensor, beta: torch.Tensor, rest_total: torch.Tensor) -> None:
        """One ``rest_total.backward()`` in which the gradient arriving at each probe is replaced by
        its slice of ``sum_t beta_t g_t``.

        The replacement is a tensor hook, so autograd does the bookkeeping: a parameter that reaches
        the losses both through z and around it (AuxNet's auxiliary branch feeding the primary)
        gets the combined gradient through z plus its own task's gradient around it; for features
        that feed one another, the hook on an earlier feature sees the already-combined gradient of
        the later one and replaces it with its own combination, which is exactly what the chain
        rule gives for ``sum_t beta_t L_t`` there, so nothing is counted twice.
        """
        combined = self.ctx.scaled(beta.to(grads.device, grads.dtype) @ grads)
        handles, offset = [], 0
        for probe in self.probes:
            piece = combined[offset:offset + probe.numel()].view_as(probe)
            offset += probe.numel()
            handles.append(probe.register_hook(lambda grad, piece=piece: piece.to(grad.dtype)))
        try:
            if rest_total.requires_grad:
                self.ctx.backward(rest_total)
        finally:
            for handle in handles:
                handle.remove()


def combined_backward(losses: dict[str, torch.Tensor], ctx: StepContext, on: str, rule: CoefficientRule,
                      rest_total: torch.Tensor | None = None) -> torch.Tensor | None:
    """Run one backward pass where the shared part gets ``sum_t beta_t grad L_t``, ``beta = rule(gram)``.

    ``rest_total`` (default ``sum_t L_t``) is what everything else (heads, decoders, the strategy's
    own parameters) is trained on. With nothing shared, ``rest_total.backward()`` is the whole
    step: there is no conflict to resolve. Returns ``beta`` (None when nothing is shared).
    """
    names = list(losses)
    if rest_total is None:
        rest_total = sum(losses.values())
    part = SharedPart(ctx, on)
    if part.empty:
        if isinstance(rest_total, torch.Tensor) and rest_total.requires_grad:
            ctx.backward(rest_total)
        return None
    grads = part.task_grads([losses[t] for t in names])
    gram = (grads @ grads.T).detach().to("cpu", torch.float64)
    if ctx.loss_scale is not None and not bool(torch.isfinite(gram).all()):
        # fp16 overflow: the rule never sees it; the inf/NaN reaches the probes' .grad and the
        # GradScaler skips this step and lowers the scale.
        beta = torch.ones(len(names), dtype=torch.float64)
    else:
        beta = rule(gram)
    part.backward(grads, beta, rest_total)
    return beta


def strategy_parameter(values: list[float]) -> nn.Parameter:
    """A strategy's own learnable vector (one entry per task), in float32; made on the CPU, the
    training loop moves it to the run's device with the network."""
    return nn.Parameter(torch.tensor(values, dtype=torch.float32))
