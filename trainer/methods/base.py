"""The narrow contract through which a method plugs into the one training loop (trainer/loop.py).

The loop owns data, epochs, the weight optimiser, weighting, evaluation, logging and
checkpoints. A method owns only what makes it that method:

- ``build``: the network to train, from the ArchSpec;
- ``param_groups``: what the loop's weight optimiser updates (method-owned architecture
  parameters such as Aux-NAS's alpha are left out; per-group learning rates allowed, as an
  absolute ``lr`` or as ``lr_scale`` times ``train.lr``);
- ``attach_optimizer(optimizer)``: called once with the weight optimiser, for a method whose
  schedule resets its state (BMTAS, after every architecture change; a no-op elsewhere);
- ``arch_fraction``: the share of each epoch's training data reserved for architecture steps
  (0 = one-shot or nothing to search);
- ``start_epoch``: schedules (temperature, L1 weight), returning values to log;
- ``task_losses``: each task's loss from the network's outputs (DMTG mixes per-branch losses);
- ``arch_step``: one architecture update on an architecture batch;
- ``read_off``: the searched decision, saved into ``arch.json``;
- ``follow_up``: the config of a further stage trained after this one (BMTAS retrains the
  derived tree), or None;
- ``state_dict(model)`` / ``load_state_dict(model, state)``: what a resumed run needs besides the
  network's weights and the weight optimiser (architecture optimisers, phase flags); tensors,
  numbers, strings, lists and dicts only (see :mod:`taskfold.trainer.checkpoint`).

Methods are plain classes that implement this Protocol; :mod:`plain` holds the defaults a method
may call rather than inherit.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.registry import Registry
from taskfold.trainer.config import Config

METHODS: Registry = Registry("method")


@dataclass
class Progress:
    """Where training is: ``fraction`` runs from 0 at the first step to 1 at the last."""

    epoch: int
    num_epochs: int
    step: int
    total_steps: int

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)


class Method(Protocol):
    arch_fraction: float

    def build(self, spec: ArchSpec, *, backbone_weights: str | None) -> nn.Module: ...

    def param_groups(self, model: nn.Module) -> list[dict]: ...

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None: ...

    def start_epoch(self, model: nn.Module, progress: Progress) -> dict[str, float]: ...

    def task_losses(self, model: nn.Module, outputs: dict, targets: dict, tasks: list) -> dict[str, torch.Tensor]: ...

    def arch_step(self, model: nn.Module, images: torch.Tensor, targets: dict, tasks: list,
                  progress: Progress) -> dict[str, float]: ...

    def read_off(self, model: nn.Module) -> dict: ...

    def follow_up(self, cfg: Config, run_dir: Path, decision: dict) -> Config | None: ...

    def state_dict(self, model: nn.Module) -> dict: ...

    def load_state_dict(self, model: nn.Module, state: dict) -> None: ...
