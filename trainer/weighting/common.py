"""What most strategies have in common, so that each strategy module only states its own rule.

- :class:`StrategyBase`: keeps the config's fixed per-task weights (``self.task_weights``), has no
  learnable parameters of its own and nothing to do at the end of an epoch; a strategy that has
  (UW, GradNorm, IAL, DWA) overrides ``parameters`` or ``end_epoch``.
- :class:`GradientStrategy`: a strategy that compares task gradients on the shared part of the
  network named by its ``on`` option (see :class:`grads.SharedPart`); it sets ``self.on`` and
  ``self.needs`` from it. Its options subclass :class:`OnOptions`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from taskfold.trainer.weighting.base import Needs
from taskfold.trainer.weighting.grads import On


class StrategyBase:
    """Defaults for the parts of :class:`base.WeightingStrategy` a strategy does not use."""

    needs: Needs = "losses"

    def __init__(self, options: object, tasks: list[str], task_weights: dict[str, float]) -> None:
        self.task_weights = task_weights

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        pass

    # Attributes (besides parameters()) that change during training and that a resume restores.
    running_state: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        """The learnable parameters (by position) and the ``running_state`` attributes; a
        ``torch.Generator`` is saved as its state."""
        state = {"parameters": [p.detach().clone() for p in self.parameters()]}
        for name in self.running_state:
            value = getattr(self, name)
            state[name] = value.get_state() if isinstance(value, torch.Generator) else copy.deepcopy(value)
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for param, value in zip(self.parameters(), state["parameters"], strict=True):
                param.copy_(value)
        for name in self.running_state:
            current = getattr(self, name)
            if isinstance(current, torch.Generator):
                current.set_state(state[name])
            else:
                setattr(self, name, state[name])


@dataclass
class OnOptions:
    """``on``: compare the task gradients on the shared ``params`` or on the shared ``features``."""

    on: On = "params"


class GradientStrategy(StrategyBase):
    """A strategy that works on the task gradients of the shared part chosen by ``options.on``."""

    needs: Needs = "shared_params"  # the default `on`; each instance sets its own

    def __init__(self, options: OnOptions, tasks: list[str], task_weights: dict[str, float]) -> None:
        super().__init__(options, tasks, task_weights)
        self.on = options.on
        self.needs = "shared_params" if options.on == "params" else "shared_features"
