"""DMTG: one-shot grouping of N tasks into at most K groups.

Each step the network samples ``Z = GumbelSoftmax(S, tau)`` row-wise; task i's loss is
``sum_k Z[i, k] * L[i, k]`` (L[i, k]: task i's loss through branch k's head), and the logits S are
trained jointly with the weights by the same backward pass (one optimiser; ``logits_lr`` gives S
its own learning rate). ``tau`` is fixed (``tau_final: null``, as in the paper and the reference
code) or annealed exponentially from ``tau`` to ``tau_final``. Read-off: argmax per task.

``assignment: random`` is the baseline in the same harness: tasks dealt at random into exactly
``num_groups`` non-empty groups (seeded by ``assignment_seed``), frozen for the whole run.
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
from taskfold.trainer.report import REPORT_SECTIONS, pyplot
from taskfold.trainer.rundir import RunDir


def random_groups(num_tasks: int, num_groups: int, seed: int) -> list[int]:
    """Tasks dealt in a random order into ``num_groups`` groups, none of them empty."""
    order = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed)).tolist()
    groups = [0] * num_tasks
    for position, task in enumerate(order):
        groups[task] = position % num_groups
    return groups


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
        assignment: str = "learned"
        assignment_seed: int = 0

    def __init__(self, options: Options) -> None:
        o = options
        if o.num_groups < 1:
            raise ConfigError(f"method.num_groups: must be >= 1, got {o.num_groups}")
        if o.num_groups > o.max_groups:
            raise ConfigError(f"method.num_groups: {o.num_groups} groups exceed method.max_groups = {o.max_groups}")
        if o.tau <= 0 or (o.tau_final is not None and o.tau_final <= 0):
            raise ConfigError("method.tau and method.tau_final must be > 0")
        if o.assignment not in ("learned", "random"):
            raise ConfigError(f"method.assignment: {o.assignment!r}; expected learned or random")
        if not 0.0 <= o.skip_below < 1.0:
            raise ConfigError(f"method.skip_below: must be in [0, 1), got {o.skip_below}")
        self.options = o

    def build(self, spec: ArchSpec, *, backbone_weights: str | None) -> nn.Module:
        if self.options.num_groups > len(spec.tasks):
            raise ConfigError(f"method.num_groups: {self.options.num_groups} groups for only {len(spec.tasks)} tasks")
        model = build_network(spec, backbone_weights=backbone_weights)
        if self.options.assignment == "random":
            model.fix_assignment(random_groups(len(spec.tasks), self.options.num_groups, self.options.assignment_seed))
        return model

    def param_groups(self, model: GroupNet) -> list[dict]:
        """The logits S in a group of their own: no weight decay (it would pull them back to uniform)
        and, with ``logits_lr``, their own learning rate."""
        rest = [p for p in model.parameters() if p is not model.group_logits]
        logits = {"params": [model.group_logits], "weight_decay": 0.0}
        if self.options.logits_lr is not None:
            logits["lr"] = self.options.logits_lr
        return [{"params": rest}, logits]

    def tau_at(self, fraction: float) -> float:
        o = self.options
        if o.tau_final is None:
            return o.tau
        return o.tau * (o.tau_final / o.tau) ** min(1.0, max(0.0, fraction))

    def start_epoch(self, model: GroupNet, progress: Progress) -> dict:
        model.tau = self.tau_at(progress.fraction)
        with torch.no_grad():
            probs = torch.softmax(model.group_logits, dim=1).tolist()
        return {"tau": model.tau, "probabilities": dict(zip([t.name for t in model.tasks], probs))}

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


@REPORT_SECTIONS.register("dmtg")
def report_section(run: RunDir, records: list[dict]) -> list[str]:
    """The N×K assignment probabilities at the end (heatmap) and over training, and the groups."""
    plt = pyplot()

    decision = run.load_arch().decision
    names = list(decision["probabilities"])
    final = [decision["probabilities"][n] for n in names]
    history = [r["probabilities"] for r in records if r.get("type") == "schedule" and "probabilities" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(names) + 2))
    image = axes[0].imshow(final, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes[0].set(yticks=range(len(names)), yticklabels=names, xlabel="group", title="P(task in group), end")
    axes[0].set_xticks(range(len(final[0])))
    fig.colorbar(image, ax=axes[0])
    for i, name in enumerate(names):
        k = decision["assignment"][name]
        axes[1].plot([h[name][k] for h in history] + [final[i][k]], label=f"{name} → {k}")
    axes[1].set(xlabel="epoch", ylabel="P(chosen group)", title="over training", ylim=(0, 1))
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(run.path / "groups.png", dpi=90)
    plt.close(fig)
    groups = "; ".join("{" + ", ".join(g) + "}" for g in decision["groups"])
    return ["## Task groups (DMTG)", "", f"Groups found: {groups}.", "", "![groups](groups.png)", ""]
