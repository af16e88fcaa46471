"""DMTG: one-shot grouping of N tasks into at most K groups.

Each step the network samples ``Z = GumbelSoftmax(S, tau)`` row-wise; task i's loss is
``sum_k Z[i, k] * L[i, k]`` (L[i, k]: task i's loss through branch k's head), and the logits S are
trained jointly with the weights by the same backward pass (one optimiser; ``logits_lr`` gives S
its own learning rate). ``tau`` is fixed (``tau_final: null``, as in the paper and the reference
code) or annealed exponentially from ``tau`` to ``tau_final``. Read-off: argmax per task.

``assignment: random`` is the baseline in the same harness: tasks dealt at random into exactly
``num_groups`` non-empty groups (seeded by ``assignment_seed``), frozen for the whole run.

``init_from`` starts the network from a finished naive-MTL (``shared``) run, as the paper does
("initialized by the pre-trained naive MTL weights"): the grouping signal is then about which
tasks help each other on a trained encoder, not about random features. ``finetune_epochs`` adds
the optional fine-tune of the pruned model: a follow-up stage (``RUN/retrain``) that freezes the
read-off (``assignment: fixed``, ``groups``) and trains on from the search's weights
(``init_checkpoint``), so only each task's chosen head and the chosen branches learn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch
from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.nets import build_network
from taskfold.models.nets.group import GroupNet, GroupNetOptions
from taskfold.models.nets.registry import network_options
from taskfold.trainer.config import Config, ConfigError, config_from_dict
from taskfold.trainer.methods.base import METHODS, Progress
from taskfold.trainer.methods.plain import Stateless, load_weights_into
from taskfold.trainer.report import REPORT_SECTIONS, line_style, pyplot
from taskfold.trainer.rundir import RunDir

# A task counts as decided when its chosen group holds at least this probability; below
# UNDECIDED_MARGIN over the uniform 1/K it is still close to a coin toss.
DECIDED = 0.9
UNDECIDED_MARGIN = 0.1


def random_groups(num_tasks: int, num_groups: int, seed: int) -> list[int]:
    """Tasks dealt in a random order into ``num_groups`` groups, none of them empty."""
    order = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed)).tolist()
    groups = [0] * num_tasks
    for position, task in enumerate(order):
        groups[task] = position % num_groups
    return groups


@METHODS.register("dmtg")
class DMTGMethod(Stateless):
    arch_fraction = 0.0

    @dataclass
    class Options(GroupNetOptions):
        max_groups: int = 16
        tau_final: float | None = None
        logits_lr: float | None = None
        assignment: Literal["learned", "random", "fixed"] = "learned"
        assignment_seed: int = 0
        groups: list | None = None  # assignment: fixed — each task's group, in task order
        init_from: str | None = None  # a finished naive-MTL (`shared`) run directory
        init_checkpoint: str | None = None  # GroupNet weights to start from (the fine-tune stage)
        finetune_epochs: int = 0

    def __init__(self, options: Options) -> None:
        o = options
        if o.num_groups < 1:
            raise ConfigError(f"method.num_groups: must be >= 1, got {o.num_groups}")
        if o.num_groups > o.max_groups:
            raise ConfigError(f"method.num_groups: {o.num_groups} groups exceed method.max_groups = {o.max_groups}")
        if o.tau <= 0 or (o.tau_final is not None and o.tau_final <= 0):
            raise ConfigError("method.tau and method.tau_final must be > 0")
        if (o.assignment == "fixed") != (o.groups is not None):
            raise ConfigError("method.groups: give it exactly when method.assignment is fixed")
        if o.finetune_epochs < 0:
            raise ConfigError(f"method.finetune_epochs: must be >= 0, got {o.finetune_epochs}")
        if not 0.0 <= o.skip_below < 1.0:
            raise ConfigError(f"method.skip_below: must be in [0, 1), got {o.skip_below}")
        self.options = o

    def build(self, spec: ArchSpec, *, backbone_weights: str | None) -> nn.Module:
        o, n = self.options, len(spec.tasks)
        if o.num_groups > n:
            raise ConfigError(f"method.num_groups: {o.num_groups} groups for only {n} tasks")
        if o.groups is not None and (len(o.groups) != n or not all(
                isinstance(g, int) and 0 <= g < o.num_groups for g in o.groups)):
            raise ConfigError(f"method.groups: needs one group in [0, {o.num_groups - 1}] for each of the {n} tasks, "
                              f"got {o.groups}")
        model = build_network(spec, backbone_weights=backbone_weights)
        if o.init_from is not None:
            load_weights_into("method.init_from", RunDir(o.init_from).weights_path(), model.load_shared)
        if o.init_checkpoint is not None:
            load_weights_into("method.init_checkpoint", o.init_checkpoint, model.load_state_dict)
        if o.assignment == "random":
            model.fix_assignment(random_groups(n, o.num_groups, o.assignment_seed))
        elif o.assignment == "fixed":
            model.fix_assignment(o.groups)
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
        z, active = outputs.weights, outputs.active  # the Gumbel sample these outputs were computed under
        losses = {}
        for i, t in enumerate(tasks):
            groups = active[i].nonzero().flatten()
            losses[t.name] = (z[i, groups] * t.copy_losses(outputs[t.name], targets[t.target])).sum()
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

    def follow_up(self, cfg: Config, run_dir: Path, decision: dict) -> Config | None:
        """With ``finetune_epochs``: the fine-tune of the pruned model, the read-off frozen."""
        o = self.options
        if o.finetune_epochs == 0 or o.assignment == "fixed":
            return None
        raw = cfg.to_dict()
        raw["method"].update(assignment="fixed", groups=[decision["assignment"][t["name"]] for t in raw["tasks"]],
                             init_checkpoint=str(RunDir(run_dir).weights_path()),
                             init_from=None, finetune_epochs=0)
        raw["name"] = f"{cfg.name}-finetune"
        raw["train"]["epochs"] = o.finetune_epochs
        return config_from_dict(raw)


def decidedness(probabilities: list[float]) -> str:
    """How settled one task's assignment is: ``decided``, ``leaning`` or ``near uniform``."""
    chosen = max(probabilities)
    if chosen >= DECIDED:
        return "decided"
    if chosen < 1.0 / len(probabilities) + UNDECIDED_MARGIN:
        return "near uniform"
    return "leaning"


def groups_summary(decision: dict, assignment_mode: str) -> list[str]:
    """The groups, announced as found only when every task's assignment is decided, and a table
    of how decided each task is (P of the chosen group, its lead over the runner-up)."""
    groups = "; ".join("{" + ", ".join(g) + "}" for g in decision["groups"])
    probabilities = decision["probabilities"]
    states = {name: decidedness(p) for name, p in probabilities.items()}
    if assignment_mode != "learned":
        headline = f"Groups ({assignment_mode} assignment, not searched): {groups}."
    elif all(state == "decided" for state in states.values()):
        headline = f"Groups found: {groups} (every task's group has P >= {DECIDED})."
    else:
        unsettled = sum(state != "decided" for state in states.values())
        headline = (f"No grouping found yet: {unsettled} of {len(states)} tasks have P(chosen group) < {DECIDED}, "
                    f"so the argmax read-off {groups} (what the compiler keeps) is not a finding; "
                    "train longer, anneal tau or raise method.logits_lr.")
    lines = [headline, "", "| task | group | P(group) | lead over runner-up | state |", "|---|---:|---:|---:|---|"]
    for name, p in probabilities.items():
        ranked = sorted(p, reverse=True)
        lead = ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0)
        lines.append(f"| {name} | {decision['assignment'][name]} | {ranked[0]:.3f} | {lead:.3f} | {states[name]} |")
    return lines


@REPORT_SECTIONS.register("dmtg")
def report_section(run: RunDir, records: list[dict]) -> list[str]:
    """The N×K assignment probabilities at the end (heatmap) and over training, and the groups
    with how decided each task is."""
    plt = pyplot()

    spec = run.load_arch()
    decision = spec.decision
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
        axes[1].plot([h[name][k] for h in history] + [final[i][k]], label=f"{name} → {k}",
                     **line_style(len(history) + 1))
    axes[1].set(xlabel="epoch", ylabel="P(chosen group)", title="over training", ylim=(0, 1))
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(run.path / "groups.png", dpi=90)
    plt.close(fig)
    mode = network_options(DMTGMethod.Options, spec.options).assignment
    return ["## Task groups (DMTG)", "", *groups_summary(decision, mode), "", "![groups](groups.png)", ""]
