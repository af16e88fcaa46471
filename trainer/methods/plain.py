"""``single`` and ``shared``: the two baselines, with no architecture to search.

The module-level functions are the default behaviour other methods call for the hooks they do
not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.errors import ModelError
from taskfold.models.nets import build_network
from taskfold.trainer.config import ConfigError
from taskfold.trainer.methods.base import METHODS, Progress


def per_task_losses(outputs: dict, targets: dict, tasks: list) -> dict[str, torch.Tensor]:
    """Each task's own loss on its own output."""
    return {t.name: t.loss(outputs[t.name], targets[t.target]) for t in tasks}


def weighted_total(losses: dict[str, torch.Tensor], tasks: list) -> torch.Tensor:
    """``sum_t w_t L_t`` with the recipe's ``tasks[].weight``: what an architecture step minimises,
    the same per-task scaling the weight steps get from their weighting strategy."""
    return sum(t.weight * losses[t.name] for t in tasks)


def load_weights_into(field: str, path: str | Path, load: Callable[[dict[str, torch.Tensor]], object]) -> None:
    """``load(state)`` with the safetensors weights at ``path`` (a method's ``init_*`` option); a
    missing file, or weights that do not fit the network, is a ConfigError naming ``field``."""
    if not Path(path).is_file():
        raise ConfigError(f"{field}: no checkpoint at {path}")
    try:
        load(load_file(str(path)))
    except (RuntimeError, ModelError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{field}: the weights at {path} do not fit this network ({reason})") from None


class Stateless:
    """For methods whose whole state is the network's weights and the loop's optimiser (their
    schedules are functions of the progress, recomputed on resume)."""

    def state_dict(self, model: nn.Module) -> dict:
        return {}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        pass

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing of the weight optimiser's state to manage."""


class PlainMethod(Stateless):
    """A method that trains the network as built: nothing searched, nothing read off."""

    arch_fraction = 0.0

    @dataclass
    class Options:
        pass

    def __init__(self, options: Options) -> None:
        self.options = options

    def build(self, spec: ArchSpec, *, backbone_weights: str | None) -> nn.Module:
        return build_network(spec, backbone_weights=backbone_weights)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": list(model.parameters())}]

    def start_epoch(self, model: nn.Module, progress: Progress) -> dict[str, float]:
        return {}

    def task_losses(self, model: nn.Module, outputs: dict, targets: dict, tasks: list) -> dict[str, torch.Tensor]:
        return per_task_losses(outputs, targets, tasks)

    def arch_step(self, model, images, targets, tasks, progress) -> dict[str, float]:
        raise NotImplementedError("plain methods have no architecture step")  # arch_fraction is 0

    def read_off(self, model: nn.Module) -> dict:
        return {}

    def follow_up(self, cfg, run_dir, decision: dict) -> None:
        return None


METHODS.register("single")(PlainMethod)
METHODS.register("shared")(PlainMethod)
