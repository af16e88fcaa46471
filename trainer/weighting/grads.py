"""Gradient plumbing shared by every gradient-based strategy (PCGrad, PCGrad-Aux, CAGrad, GCS,
GradNorm, IAL), so that each strategy module only states its rule.

Every one of those rules ends up giving the shared part of the network a *linear combination*
``sum_t beta_t * grad L_t`` of the task gradients, with coefficients ``beta`` that depend on the
gradients only through their Gram matrix (dot products, norms, cosines; PCGrad's projections too).
So a strategy is a function ``gram -> beta`` and this module does the rest:

1. per-task gradients on the *probe* tensors (the shared parameters, or the shared features z),
   with ``torch.autograd.grad(..., retain_graph=True)``;
2. everything that is not shared (task heads, decoders, auxiliary branches, the strategy's own
   parameters) gets the gradient of the strategy's ``rest_total`` loss and nothing else;
3. the shared part gets ``sum_t beta_t * grad L_t``: written straight into ``.grad`` for parameters,
   or back-propagated as the loss ``sum_t beta_t * L_t`` into the parameters upstream of z. The
   latter equals ``z.backward(sum_t beta_t * grad_z L_t)`` when z is one tensor, and stays exact
   when the listed features feed one another (block outputs of one backbone), where back-propagating
   each feature's gradient would count the later blocks' share twice.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from taskfold.trainer.config import ConfigError
from taskfold.trainer.weighting.base import StepContext

ON_CHOICES = ("params", "features")

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


def graph_leaves(roots: Sequence[torch.Tensor], stop: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """Leaf tensors that require grad and that ``roots`` depend on, without looking past ``stop``.

    Walks the autograd graph (``AccumulateGrad`` nodes hold the leaves). It tells which parameters a
    loss reaches *other than through* the shared features, without the model having to list them.
    """
    stop_nodes = {t.grad_fn for t in stop if t.grad_fn is not None}
    stop_ids = {id(t) for t in stop}
    leaves: dict[int, torch.Tensor] = {}
    for root in roots:
        if root.grad_fn is None and root.requires_grad and id(root) not in stop_ids:
            leaves[id(root)] = root
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen: set = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop_nodes:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in stop_ids:
            leaves[id(variable)] = variable
        stack.extend(fn for fn, _ in node.next_functions)
    return list(leaves.values())


class SharedPart:
    """Where the task gradients are compared (``on``) and how their combination reaches the weights.

    ``on="params"`` probes ``ctx.shared_params``; ``on="features"`` probes ``ctx.shared_features``.
    Asking for features from a network that shares parameters but exposes no features is a
    configuration mistake and is refused rather than silently answered with something else.
    """

    def __init__(self, ctx: StepContext, on: str) -> None:
        check_choice("on", on, ON_CHOICES)
        self.on = on
        source = ctx.shared_params if on == "params" else ctx.shared_features
        self.probes = [t for t in source if t.requires_grad]
        if on == "features" and not self.probes and any(p.requires_grad for p in ctx.shared_params):
            raise ConfigError("weighting.on: 'features' but this network exposes no shared_features; "
                              "use on: params")

    @property
    def empty(self) -> bool:
        """Nothing is shared: there is nothing to combine."""
        return not self.probes

    def task_grads(self, losses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[bool]]:
        """``[T, n]`` flattened gradient of each loss on the probes, and which probes any loss reaches."""
        rows, used = [], [False] * len(self.probes)
        for loss in losses:
            grads: Sequence[torch.Tensor | None] = [None] * len(self.probes)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, self.probes, retain_graph=True, allow_unused=True)
            flat = []
            for k, (probe, grad) in enumerate(zip(self.probes, grads)):
                used[k] = used[k] or grad is not None
                flat.append((torch.zeros_like(probe) if grad is None else grad).reshape(-1))
            rows.append(torch.cat(flat))
        return torch.stack(rows), used

    def backward(self, losses: Sequence[torch.Tensor], grads: torch.Tensor, used: list[bool],
                 beta: torch.Tensor, rest_total: torch.Tensor) -> None:
        """Shared part: ``sum_t beta_t grad L_t``; every other leaf of ``rest_total``: its gradient."""
        if self.on == "params":
            shared = self.probes
            rest = [t for t in graph_leaves([rest_total]) if id(t) not in {id(p) for p in shared}]
        else:
            shared = graph_leaves(self.probes)
            rest = graph_leaves([rest_total], stop=self.probes)
            both = {id(t) for t in shared} & {id(t) for t in rest}
            if both:
                raise ConfigError(f"weighting.on: 'features': {len(both)} parameter(s) reach the losses both "
                                  "through shared_features and around them; use on: params")
        if rest:
            torch.autograd.backward(rest_total, inputs=rest, retain_graph=self.on == "features")
        if self.on == "params":
            _accumulate(self.probes, used, beta.to(grads.device, grads.dtype) @ grads)
        elif shared:
            objective = sum(float(b) * loss for b, loss in zip(beta, losses) if loss.requires_grad)
            if isinstance(objective, torch.Tensor):
                torch.autograd.backward(objective, inputs=shared)


def _accumulate(params: list[torch.Tensor], used: list[bool], flat: torch.Tensor) -> None:
    """Add slices of ``flat`` to ``.grad`` (accumulating, like ``backward``); skip unreached params."""
    offset = 0
    for param, reached in zip(params, used):
        piece = flat[offset:offset + param.numel()].view_as(param)
        offset += param.numel()
        if reached:
            param.grad = piece.clone() if param.grad is None else param.grad + piece


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
            rest_total.backward()
        return None
    task_losses = [losses[t] for t in names]
    grads, used = part.task_grads(task_losses)
    gram = (grads @ grads.T).detach().to("cpu", torch.float64)
    beta = rule(gram)
    part.backward(task_losses, grads, used, beta, rest_total)
    return beta


def strategy_parameter(values: list[float]) -> nn.Parameter:
    """A strategy's own learnable vector (one entry per task), kept in float32 on the CPU.

    Its 0-dim entries mix with losses on any device (PyTorch treats 0-dim CPU tensors as scalars).
    """
    return nn.Parameter(torch.tensor(values, dtype=torch.float32))
