"""Aux-G (fixed primary → auxiliary links) and Aux-NAS (searched links in both directions).

Aux-NAS objective: ``w_P L_P + sum_k w_Ak L_Ak + lambda(t) * ||alpha^P||_1`` (``tasks[].weight``). alpha and the weights are
updated alternately on two non-overlapping halves of each epoch's training data (the loop
re-splits every epoch), with separate optimisers: the loop's for the weights, Adam for alpha
here. ``lambda`` follows the paper (linear 0 → lambda_max over training, lambda_max = 100) or the
reference code (0 until 50 %, linear to lambda_max = 1000 at 80 %, then flat).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.nets import build_network
from taskfold.models.nets.aux import AuxNet, AuxNetOptions
from taskfold.models.weights import sub_state
from taskfold.trainer import distributed
from taskfold.trainer.config import ConfigError
from taskfold.trainer.methods.base import METHODS, Progress
from taskfold.trainer.methods.plain import per_task_losses, weighted_total
from taskfold.trainer.rundir import RunDir

LAMBDA_MAX = {"paper": 100.0, "reference": 1000.0}


def lambda_at(schedule: str, lambda_max: float, fraction: float) -> float:
    """The L1 weight on alpha^P at a point of training (fraction in [0, 1])."""
    if schedule == "paper":
        return lambda_max * min(1.0, max(0.0, fraction))
    if fraction < 0.5:
        return 0.0
    return lambda_max * min(1.0, (fraction - 0.5) / 0.3)


def init_branches_from_runs(model: AuxNet, init_from: dict[str, str]) -> None:
    """Load each named branch (backbone + head) from a finished ``single`` or ``shared`` run."""
    for task, run_dir in init_from.items():
        if task not in model.task_order:
            raise ConfigError(f"method.init_from: {task!r} is not one of the tasks ({', '.join(model.task_order)})")
        path = RunDir(run_dir).weights_path()
        if not path.is_file():
            raise ConfigError(f"method.init_from.{task}: no checkpoint at {path}")
        state = load_file(str(path))
        b = model.task_order.index(task)
        for prefix in (f"nets.{task}.", ""):  # a `single` run nests each task's net; `shared` does not
            backbone = sub_state(state, f"{prefix}backbone.")
            head = sub_state(state, f"{prefix}heads.{task}.")
            if backbone and head:
                model.branches[b].load_state_dict(backbone)
                model.heads[b].load_state_dict(head)
                break
        else:
            raise ConfigError(f"method.init_from.{task}: {run_dir} has no single-task weights for {task!r}")


class AuxMethod:
    """Aux-G-Stage / Aux-G-Layer / Aux-NAS on the shared training loop."""

    @dataclass
    class Options(AuxNetOptions):
        lambda_schedule: Literal["paper", "reference"] = "paper"
        lambda_max: float | None = None
        alpha_lr: float = 1e-2
        init_from: dict = field(default_factory=dict)

    searched = False

    def __init__(self, options: Options) -> None:
        o = options
        for name in ("alpha_p_init", "alpha_a_init"):
            if not 0.0 < getattr(o, name) < 1.0:
                raise ConfigError(f"method.{name}: must be in (0, 1), got {getattr(o, name)}")
        if o.window < 1:
            raise ConfigError(f"method.window: must be >= 1, got {o.window}")
        self.options = o
        self.lambda_max = o.lambda_max if o.lambda_max is not None else LAMBDA_MAX[o.lambda_schedule]
        if self.lambda_max < 0:
            raise ConfigError(f"method.lambda_max: must be >= 0, got {self.lambda_max}")
        self.arch_fraction = 0.5 if self.searched else 0.0
        self.alpha_optimizer: torch.optim.Optimizer | None = None

    def build(self, spec: ArchSpec, *, backbone_weights: str | None) -> nn.Module:
        if len(spec.primary) != 1 or len(spec.tasks) < 2:
            raise ConfigError(f"method {spec.method!r} needs `primary:` (one task) and at least one auxiliary task")
        model = build_network(spec, backbone_weights=backbone_weights)
        init_branches_from_runs(model, self.options.init_from)
        if self.searched:
            self.alpha_optimizer = torch.optim.Adam(model.arch_parameters(), lr=self.options.alpha_lr)
        return model

    def state_dict(self, model: AuxNet) -> dict:
        return {"alpha_optimizer": self.alpha_optimizer.state_dict()} if self.searched else {}

    def load_state_dict(self, model: AuxNet, state: dict) -> None:
        if self.searched:
            self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Aux methods leave the weight optimiser's state alone."""

    def param_groups(self, model: AuxNet) -> list[dict]:
        alpha = {id(p) for p in model.arch_parameters()}
        return [{"params": [p for p in model.parameters() if id(p) not in alpha]}]

    def start_epoch(self, model: AuxNet, progress: Progress) -> dict[str, float]:
        return self._alpha_summary(model) if self.searched else {}

    def task_losses(self, model, outputs, targets, tasks) -> dict[str, torch.Tensor]:
        return per_task_losses(outputs, targets, tasks)

    def arch_step(self, model: AuxNet, images, targets, tasks, progress: Progress) -> dict[str, float]:
        lam = lambda_at(self.options.lambda_schedule, self.lambda_max, progress.fraction)
        losses = per_task_losses(model(images), targets, tasks)
        total = weighted_total(losses, tasks) + lam * model.alpha_values("P").sum()
        params = model.arch_parameters()
        grads = torch.autograd.grad(total, params)
        for p, g in zip(params, grads):
            p.grad = g
        distributed.average_gradients(params, len(images))  # DDP: the global batch's gradient
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        return {"lambda": lam, **self._alpha_summary(model)}

    @staticmethod
    def _alpha_summary(model: AuxNet) -> dict[str, float]:
        with torch.no_grad():
            p, a = model.alpha_values("P"), model.alpha_values("A")
        return {"max_alpha_p": float(p.max()), "mean_alpha_p": float(p.mean()), "mean_alpha_a": float(a.mean())}

    def read_off(self, model: AuxNet) -> dict:
        if not self.searched:
            return {"links": {k: v for k, v in model.sources.items()}}
        with torch.no_grad():
            alphas = {k: torch.sigmoid(v).tolist() for k, v in model.alpha_logits.items()}
        return {"alpha": alphas, **self._alpha_summary(model)}

    def follow_up(self, cfg, run_dir, decision: dict) -> None:
        return None


@METHODS.register("aux_nas")
class AuxNAS(AuxMethod):
    searched = True


METHODS.register("aux_g_stage")(AuxMethod)
METHODS.register("aux_g_layer")(AuxMethod)
