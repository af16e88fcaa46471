"""DMTG: one-shot grouping of N tasks into at most K groups.

Each step the network samples ``Z = GumbelSoftmax(S, tau)`` row-wise; task i's loss is
``sum_k Z[i, k] * L[i, k]`` (L[i, k]: task i's loss through branch k's head), and the logits S are
trained jointly with the weights by the same backward pass (one optimiser; ``logits_lr`` gives S
its own learning rate). ``tau`` is fixed (``tau_final: null``, as in the paper and the reference
code) or annealed exponentially from ``tau`` to ``tau_final``. Read-off: argmax per task.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.nets import build_network
from taskfold.models.nets.group import GroupNet
from taskfold.trainer.config import ConfigError
from taskfold.trainer.methods.base import METHODS, Progress


@METHODS.register("dmtg")
class DMTGMethod:
    arch_fraction = 0.0

    @dataclass
    class Options:
        num_groups: int = 2
        max_groups: int = 16
        stem_blocks: int = 0
        head_hidden: int = 0
        tau: float = 2.5
        tau_final: float | None = None
        hard: bool = False
        skip_below: float = 1e-3
        logits_lr: float | None = None

    def __init__(self, options: Options) -> None:
        o = options
        if o.num_groups < 1:
            raise ConfigError(f"method.num_groups: must be >= 1, got {o.num_groups}")
        if o.num_groups > o.max_groups:
            raise ConfigError(f"method.num_groups: {o.num_groups} groups exceed method.max_groups = {o.max_groups}")
        if o.tau <= 0 or (o.tau_final is not None and o.tau_final <= 0):
            raise ConfigError("method.tau and method.tau_final must be > 0")
        if not 0.0 <= o.skip_below < 1.0:
            raise ConfigError(f"method.skip_below: must be in [0, 1), got {o.skip_below}")
        self.options = o

    def build(self, spec: ArchSpec, *, backbone_weights: str | None) -> nn.Module:
        if self.options.num_groups > len(spec.tasks):
            raise ConfigError(f"method.num_groups: {self.options.num_groups} groups for only {len(spec.tasks)} tasks")
        return build_network(spec, backbone_weights=backbone_weights)

    def param_groups(self, model: GroupNet) -> list[dict]:
        if self.options.logits_lr is None:
            return [{"params": list(model.parameters())}]
        rest = [p for p in model.parameters() if p is not model.group_logits]
        return [{"params": rest}, {"params": [model.group_logits], "lr": self.options.logits_lr}]

    def tau_at(self, fraction: float) -> float:
        o = self.options
        if o.tau_final is None:
            return o.tau
        return o.tau * (o.tau_final / o.tau) ** min(1.0, max(0.0, fraction))

    def start_epoch(self, model: GroupNet, progress: Progress) -> dict[str, float]:
        model.tau = self.tau_at(progress.fraction)
        return {"tau": model.tau}

    def task_losses(self, model: GroupNet, outputs: dict, targets: dict, tasks: list) -> dict[str, torch.Tensor]:
        z, active = model.assignment_weights, model.active
        losses = {}
        for i, t in enumerate(tasks):
            groups = active[i].nonzero().flatten().tolist()
            target = targets[t.target]
            losses[t.name] = sum(z[i, k] * t.loss(out, target) for k, out in zip(groups, outputs[t.name]))
        return losses

    def arch_step(self, model, images, targets, tasks, progress) -> dict[str, float]:
        raise NotImplementedError("DMTG trains its logits jointly with the weights (arch_fraction is 0)")

    def read_off(self, model: GroupNet) -> dict:
        with torch.no_grad():
            probs = torch.softmax(model.group_logits, dim=1)
        assignment = model.assignment()
        names = [t.name for t in model.tasks]
        groups = {k: [n for n, g in zip(names, assignment) if g == k] for k in sorted(set(assignment))}
        return {"assignment": dict(zip(names, assignment)), "groups": [groups[k] for k in groups],
                "probabilities": {n: row for n, row in zip(names, probs.tolist())}}

    def follow_up(self, cfg, run_dir, decision: dict) -> None:
        return None
