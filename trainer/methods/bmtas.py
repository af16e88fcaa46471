"""BMTAS: search where each task branches off a shared encoder (``bmtas``), then retrain the
derived tree (``bmtas_retrain``, trained by ``taskfold run`` into ``RUN/retrain``).

Search schedule on the one training loop (progress = fraction of all weight steps):

- warm-up, the first ``warmup_fraction`` of training: one-hot routing (copy t trained on task t
  only), alpha frozen; architecture batches that fall in it are skipped;
- then every architecture batch (``arch_fraction`` of each epoch's data, interleaved with the
  weight steps by the loop) makes one alpha step with Adam (``alpha_lr``,
  ``alpha_weight_decay``) on ``sum_t w_t L_t + resource_lambda * E[MAdds] / M_shared``, where
  ``E[MAdds]`` is the resource loss of :mod:`taskfold.models.bmtas_resource` on the block
  look-up table and ``M_shared = sum_l c_l`` (one encoder's MAdds): the resource term is in
  "encoders", between 1 (fully shared) and T (separate), so lambda does not depend on the
  backbone or resolution;
- tau falls linearly from ``tau_start`` to ``tau_end`` over the search (after warm-up);
- ``reset_alpha_optimizer`` (default on, as the reference code's ``optimizer_arch.state =
  defaultdict(dict)`` before every alpha phase): the alpha Adam state is cleared at the start of
  every epoch (one alpha phase per epoch, its steps interleaved with the weight steps).

Why the alpha Adam state is reset. The resource loss is a coordination game: at any point where
all tasks hold the same routing distribution its gradient is zero along every direction that
would make them *choose* one of the copies they agree on (by symmetry), and that point is
unstable but flat. Adam moves coordinates whose gradients share a sign by about ``alpha_lr``
each, whatever their magnitudes, so two copies that rise together stay tied; once the others
have lost their mass, the tie-breaking gradient (proportional to the small difference between
the tied copies) is divided by a second-moment estimate that still remembers the large
gradients of the first steps (``beta2 = 0.999``: hundreds of steps of memory, more than a
CPU-sized search makes), and the tie never resolves. That left large-lambda searches with every
task at 0.49 / 0.49 between two copies and the per-task argmax splitting on noise. A fresh Adam
state each epoch gives the tie-breaking direction full-size steps again.

BatchNorm around alpha steps: the step uses batch statistics and leaves running statistics
untouched (tracking off). Every running statistic is reset once per alpha phase (at the start of
each searching epoch, and when warm-up ends), so the weight steps of the phase re-estimate them
over the whole phase for the routing distribution alpha moves through (the supergraph's BNs use
a cumulative average, see BranchNet). Resetting after every alpha step would leave evaluation,
and a ``retrain: supergraph`` start, with statistics from the handful of batches since the last
alpha step. The weight optimiser's state (momentum) is reset after every
*architecture change*: the end of warm-up, and every alpha step that changes the derived
(argmax) tree, i.e. whenever the network that the weights are being fitted for changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch
from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.bmtas_resource import (MAX_TASKS_EXACT, MAX_TASKS_PAPER_CHAIN, RESOURCE_ESTIMATORS,
                                            expected_madds)
from taskfold.models.nets import build_network
from taskfold.models.nets.branch import BranchNet, reset_bn_stats, set_bn_stat_tracking
from taskfold.models.nets.branched import BranchedNet, BranchedNetOptions, node_key
from taskfold.models.nets.tree import TreeError, tree_macs
from taskfold.trainer import distributed
from taskfold.trainer.config import Config, ConfigError, config_from_dict
from taskfold.trainer.methods.base import METHODS, Progress
from taskfold.trainer.methods.plain import Stateless, load_weights_into, per_task_losses, weighted_total
from taskfold.trainer.rundir import RunDir
from taskfold.trainer import bmtas_report  # noqa: F401  (registers the report section)

TASK_LIMITS = {"exact": MAX_TASKS_EXACT, "paper_chain": MAX_TASKS_PAPER_CHAIN}


@METHODS.register("bmtas")
class BMTASSearch:
    @dataclass
    class Options:
        tau_start: float = 5.0
        tau_end: float = 0.1
        warmup_fraction: float = 0.05
        arch_fraction: float = 0.2
        alpha_lr: float = 0.01
        alpha_weight_decay: float = 5e-5
        resource_lambda: float = 0.0
        resource_estimator: str = "exact"
        retrain: Literal["scratch", "supergraph"] = "scratch"
        retrain_epochs: int | None = None
        reset_alpha_optimizer: bool = True

    def __init__(self, options: Options) -> None:
        o = options
        problems = []
        if o.resource_lambda < 0:
            problems.append(f"method.resource_lambda: must be >= 0, got {o.resource_lambda}")
        if o.resource_estimator not in RESOURCE_ESTIMATORS:
            problems.append(f"method.resource_estimator: {o.resource_estimator!r}; available: "
                            f"{', '.join(RESOURCE_ESTIMATORS.names())}")
        if not (0 < o.tau_end <= o.tau_start):
            problems.append(f"method.tau_start/tau_end: need 0 < tau_end <= tau_start, got {o.tau_start}, {o.tau_end}")
        if not 0.0 <= o.warmup_fraction < 1.0:
            problems.append(f"method.warmup_fraction: must be in [0, 1), got {o.warmup_fraction}")
        if not 0.0 < o.arch_fraction < 1.0:
            problems.append(f"method.arch_fraction: must be in (0, 1), got {o.arch_fraction}")
        if o.retrain_epochs is not None and o.retrain_epochs < 1:
            problems.append(f"method.retrain_epochs: must be >= 1, got {o.retrain_epochs}")
        if problems:
            raise ConfigError("; ".join(problems))
        self.options = o
        self.arch_fraction = o.arch_fraction
        self.alpha_optimizer: torch.optim.Optimizer | None = None
        self.weight_optimizer: torch.optim.Optimizer | None = None
        self.arch_changes = 0
        self._routing: list[list[int]] | None = None

    def build(self, spec: ArchSpec, *, backbone_weights: str | None) -> nn.Module:
        limit = TASK_LIMITS.get(self.options.resource_estimator, MAX_TASKS_EXACT)
        if len(spec.tasks) > limit:
            raise ConfigError(f"method.resource_estimator: {self.options.resource_estimator!r} supports at most "
                              f"{limit} tasks, got {len(spec.tasks)}")
        if len(spec.tasks) < 2:
            raise ConfigError("method bmtas: needs at least two tasks to branch")
        model = build_network(spec, backbone_weights=backbone_weights)
        o = self.options
        self.alpha_optimizer = torch.optim.Adam(model.arch_parameters(), lr=o.alpha_lr,
                                                weight_decay=o.alpha_weight_decay)
        model.warmup = o.warmup_fraction > 0
        return model

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.weight_optimizer = optimizer

    def state_dict(self, model: BranchNet) -> dict:
        return {"alpha_optimizer": self.alpha_optimizer.state_dict(), "arch_changes": self.arch_changes,
                "routing": self._routing, "warmup": model.warmup, "tau": model.tau}

    def load_state_dict(self, model: BranchNet, state: dict) -> None:
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.arch_changes, self._routing = state["arch_changes"], state["routing"]
        model.warmup, model.tau = state["warmup"], state["tau"]

    def param_groups(self, model: BranchNet) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p is not model.alpha]}]

    def _architecture_changed(self) -> None:
        if self.weight_optimizer is not None:
            self.weight_optimizer.state.clear()
        self.arch_changes += 1

    def _sync(self, model: BranchNet, progress: Progress) -> None:
        """Warm-up on/off and tau for this point of training."""
        o = self.options
        fraction = progress.fraction
        if model.warmup and fraction >= o.warmup_fraction:
            model.warmup = False
            reset_bn_stats(model)
            self._architecture_changed()
        search = (fraction - o.warmup_fraction) / max(1e-12, 1.0 - o.warmup_fraction)
        model.tau = o.tau_start + (o.tau_end - o.tau_start) * min(1.0, max(0.0, search))

    def start_epoch(self, model: BranchNet, progress: Progress) -> dict[str, float]:
        was_warmup = model.warmup
        self._sync(model, progress)
        if not was_warmup and not model.warmup:   # a new alpha phase (_sync resets as warm-up ends)
            reset_bn_stats(model)
        if self.options.reset_alpha_optimizer and self.alpha_optimizer is not None:
            self.alpha_optimizer.state.clear()
        return {"tau": model.tau, "warmup": float(model.warmup), "arch_changes": float(self.arch_changes)}

    def task_losses(self, model, outputs, targets, tasks) -> dict[str, torch.Tensor]:
        return per_task_losses(outputs, targets, tasks)

    def resource(self, model: BranchNet) -> torch.Tensor:
        """E[MAdds] of the encoder blocks (look-up table units: MACs)."""
        table = torch.tensor(model.block_macs, dtype=torch.float64)
        return expected_madds(model.alpha, table, self.options.resource_estimator)

    def arch_step(self, model: BranchNet, images, targets, tasks, progress: Progress) -> dict[str, float]:
        self._sync(model, progress)
        if model.warmup:
            return {"warmup": 1.0}
        set_bn_stat_tracking(model, False)
        try:
            losses = per_task_losses(model(images), targets, tasks)
        finally:
            set_bn_stat_tracking(model, True)
        resource = self.resource(model)
        total = weighted_total(losses, tasks) + self.options.resource_lambda * resource / sum(model.block_macs)
        (grad,) = torch.autograd.grad(total, [model.alpha])
        model.alpha.grad = grad
        distributed.average_gradients([model.alpha], len(images))  # DDP: the global batch's gradient
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        routing = model.routing()
        if routing != self._routing:
            if self._routing is not None:
                self._architecture_changed()
            self._routing = routing
        return {"tau": model.tau, "expected_madds": float(resource.detach()), "arch_changes": float(self.arch_changes)}

    def read_off(self, model: BranchNet) -> dict:
        tree = model.derived_tree()
        with torch.no_grad():
            probs = torch.softmax(model.alpha, dim=-1)
            expected = float(self.resource(model))
        routing = model.routing()
        return {
            "tree": tree,
            "routing": dict(zip(model.task_names, routing)),
            "alpha_softmax": {name: probs[:, t].tolist() for t, name in enumerate(model.task_names)},
            "expected_encoder_macs": model.stem_macs + expected,
            "resource_estimator": self.options.resource_estimator,
            **tree_macs(tree, model.block_macs, model.stem_macs),
        }

    def follow_up(self, cfg: Config, run_dir: Path, decision: dict) -> Config:
        """The retrain stage: ``bmtas_retrain`` on the derived tree, same data, tasks and backbone."""
        raw = cfg.to_dict()
        method = {"name": "bmtas_retrain", "tree": decision["tree"], "routing": decision["routing"]}
        if self.options.retrain == "supergraph":
            method["init_checkpoint"] = str(RunDir(run_dir).weights_path())
        raw["method"] = method
        raw["name"] = f"{cfg.name}-retrain"
        raw["train"]["epochs"] = self.options.retrain_epochs or cfg.train.epochs
        return config_from_dict(raw)


@METHODS.register("bmtas_retrain")
class BMTASRetrain(Stateless):
    """Train a branched tree; a block shared by k tasks gets the learning rate divided by k."""

    arch_fraction = 0.0

    @dataclass
    class Options(BranchedNetOptions):
        routing: dict = field(default_factory=dict)
        init_checkpoint: str | None = None
        divide_shared_lr: bool = True

    def __init__(self, options: Options) -> None:
        if not options.tree:
            raise ConfigError("method.tree: required (one list of task groups per encoder layer)")
        if options.init_checkpoint is not None and not options.routing:
            raise ConfigError("method.routing: required with method.init_checkpoint (which supergraph copy "
                              "each node starts from)")
        self.options = options

    def build(self, spec: ArchSpec, *, backbone_weights: str | None) -> nn.Module:
        try:
            model = build_network(spec, backbone_weights=backbone_weights)
        except TreeError as exc:
            raise ConfigError(f"method.tree: {exc}") from None
        if self.options.init_checkpoint is not None:
            load_weights_into("method.init_checkpoint", self.options.init_checkpoint,
                              lambda state: model.load_supergraph(state, self.options.routing))
        return model

    def param_groups(self, model: BranchedNet) -> list[dict]:
        num_tasks = len(model.task_names)
        divide = self.options.divide_shared_lr
        groups = [{"params": list(model.stem.parameters()), "lr_scale": 1.0 / num_tasks if divide else 1.0},
                  {"params": list(model.heads.parameters())}]
        for layer, grouping in enumerate(model.tree):
            for g, group in enumerate(grouping):
                groups.append({"params": list(model.nodes[node_key(layer, g)].parameters()),
                               "lr_scale": 1.0 / len(group) if divide else 1.0})
        return groups

    def start_epoch(self, model, progress: Progress) -> dict[str, float]:
        return {}

    def task_losses(self, model, outputs, targets, tasks) -> dict[str, torch.Tensor]:
        return per_task_losses(outputs, targets, tasks)

    def arch_step(self, model, images, targets, tasks, progress) -> dict[str, float]:
        raise NotImplementedError("bmtas_retrain searches nothing (arch_fraction is 0)")

    def read_off(self, model: BranchedNet) -> dict:
        return {"tree": model.tree}

    def follow_up(self, cfg, run_dir, decision: dict) -> None:
        return None
