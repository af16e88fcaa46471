"""The contract between the training loop and a loss/gradient weighting strategy.

A strategy owns the backward pass of one training step: given each task's loss it leaves
``.grad`` filled on every trainable parameter of the model (and on its own learnable parameters),
so that the loop only has to call ``optimizer.step()``. This keeps strategies independent of the
architecture: the architecture says, through :class:`StepContext`, what its *shared* parameters
and its *shared representation* are, and the strategy decides which of the two it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

Needs = Literal["losses", "shared_params", "shared_features"]


@dataclass
class StepContext:
    """What a strategy may look at in one step.

    shared_params: parameters every task's loss depends on (a shared encoder, AuxNet's primary
        branch, GroupNet's stem, BranchNet's shared blocks). Empty when nothing is shared.
    shared_features: the shared representation(s) z the task losses were computed from, as
        produced in this forward pass (non-leaf tensors in the graph); empty when not available.
    primary: the primary task names (all tasks when the config names no primary).
    loss_scale: the fp16 GradScaler's scale (a 0-dim tensor on the device), None without one.
        Every backward pass of a strategy goes through :meth:`backward` (or the gradient plumbing
        of ``grads.py``, which divides the scale out of the per-task gradients a rule sees).
    """

    shared_params: list[nn.Parameter]
    shared_features: list[torch.Tensor] = field(default_factory=list)
    primary: list[str] = field(default_factory=list)
    loss_scale: torch.Tensor | None = None

    def scaled(self, total: torch.Tensor) -> torch.Tensor:
        """``total`` times the loss scale (itself without one)."""
        return total if self.loss_scale is None else total * self.loss_scale

    def backward(self, total: torch.Tensor) -> None:
        """``total.backward()``, loss-scaled under fp16 (``GradScaler.step`` unscales every grad)."""
        self.scaled(total).backward()


class WeightingStrategy(Protocol):
    """Selected by name in the config: ``weighting: {name: ial, ...options}``."""

    needs: Needs

    def parameters(self) -> list[nn.Parameter]:
        """Learnable parameters of the strategy itself (UW's log-variances, GradNorm's weights)."""

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        """Fill ``.grad`` of every trainable parameter; return values to log (e.g. task weights)."""

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        """Called once per epoch with each task's mean training loss (DWA needs it)."""

    def state_dict(self) -> dict:
        """What a resumed run restores (parameters, initial losses, loss history, generators)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s values."""
