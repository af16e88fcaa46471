"""GroupNet (DMTG): N tasks put into at most K groups in one shot.

An optional shared stem (the backbone's first ``stem_blocks`` blocks), then K group branches
(copies of the remaining blocks, identically initialised) and K×N heads (each branch has a head
for every task). Group logits ``S`` (N×K, zeros = uniform) are sampled with Gumbel-softmax each
training step; the method weighs task i's loss through branch k by ``Z[i, k]``.

Efficiency (the paper's own limitation with heavy heads): a global task's K heads are one
:class:`StackedMLPHead`, run by one call on the branches' pooled features (pooled once per branch
for all tasks). In training with soft sampling any head whose sampled weight is below
``skip_below`` is not run at all (nor a branch no task needs): its contribution to the loss and
to the gradient of ``S`` is at most that weight times its loss. With ``hard`` sampling every head
runs, as the straight-through gradient on ``S`` needs every head's loss, but only as a value: the
heads and branches no task chose run without autograd, so the backward pass costs what the
chosen heads cost. Heads that did not run with autograd have no gradient, so the optimiser skips
them too (each head copy owns its parameters).
:meth:`GroupNet.inference_network` keeps one head per task and only the branches tasks chose.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.models.backbones import Backbone
from taskfold.models.errors import ModelError
from taskfold.models.layers.stacked_heads import StackedMLPHead
from taskfold.models.nets.registry import NETWORKS, network_options
from taskfold.models.nets.shared import build_heads, spec_backbone
from taskfold.models.weights import sub_state


def run_blocks(blocks, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Apply blocks in order; (last output, every block's output)."""
    features = []
    for block in blocks:
        x = block(x)
        features.append(x)
    return x, features


@dataclass
class GroupNetOptions:
    """What a GroupNet is built with (DMTG's Options extend it)."""

    num_groups: int = 2  # K: at most this many groups
    stem_blocks: int = 0  # backbone blocks shared by every group before the branches
    head_hidden: int = 0  # hidden width of a global task's MLP head (0: linear)
    tau: float = 2.5  # Gumbel-softmax temperature (the method anneals it)
    hard: bool = False  # straight-through one-hot samples
    skip_below: float = 1e-3  # soft sampling: heads with a sampled weight below this are not run


class SampledOutputs(dict):
    """A training forward's outputs, ``{task: (n_active, B, ...)}``, carrying the Gumbel sample they
    were computed under: ``weights`` Z (N, K) and ``active`` (N, K), which (task, group) heads ran
    (the rows of each task's output, in group order). DMTG's loss weighs each head's loss by Z."""

    def __init__(self, outputs: dict[str, Tensor], *, weights: Tensor, active: Tensor) -> None:
        super().__init__(outputs)
        self.weights, self.active = weights, active


class GroupNet(nn.Module):
    """The DMTG training network over ``backbone``: its first ``options.stem_blocks`` blocks shared,
    the rest copied once per group; ``heads[task]`` holds the task's K head copies (an
    ``nn.ModuleList`` of dense heads or one :class:`StackedMLPHead`), one per group, in group order."""

    def __init__(self, backbone: Backbone, heads: dict[str, nn.Module], tasks: list[TaskHead],
                 options: GroupNetOptions) -> None:
        super().__init__()
        self.num_groups = options.num_groups
        stem_blocks = options.stem_blocks
        if not 0 <= stem_blocks < len(backbone.blocks):
            raise ModelError(f"stem_blocks must be in [0, {len(backbone.blocks) - 1}] for {backbone.name}, "
                             f"got {stem_blocks}")
        if list(heads) != [t.name for t in tasks]:
            raise ModelError(f"GroupNet needs one head entry per task, in task order; got {list(heads)}")
        self.tasks = list(tasks)
        self.stem = nn.ModuleList([backbone.stem, *backbone.blocks[:stem_blocks]])
        branch = nn.ModuleList(backbone.blocks[stem_blocks:])
        self.branches = nn.ModuleList([copy.deepcopy(branch) for _ in range(self.num_groups)])
        self.heads = nn.ModuleDict(heads)
        self.group_logits = nn.Parameter(torch.zeros(len(tasks), self.num_groups))
        self.tau = options.tau
        self.hard = options.hard
        self.skip_below = options.skip_below
        self.shared_features: list[Tensor] = []

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.stem.parameters())

    def _stem(self, image: Tensor) -> tuple[Tensor, list[Tensor]]:
        return run_blocks(self.stem[1:], self.stem[0](image))

    def _branch(self, k: int, x: Tensor, stem_features: list[Tensor]) -> list[Tensor]:
        return stem_features + run_blocks(self.branches[k], x)[1]

    def load_shared(self, state: dict[str, Tensor]) -> None:
        """Start from a naive-MTL (``shared``) network's weights, as the paper does: its encoder into
        the stem and every branch (so the K branches stay identical), each task's head into all K
        of its copies. A global head loads only if it has the MTL head's shape (``head_hidden: 0``,
        a linear layer); otherwise it keeps its fresh initialisation."""
        stem_blocks = len(self.stem) - 1
        self.stem[0].load_state_dict(sub_state(state, "backbone.stem."))
        for i in range(stem_blocks):
            self.stem[1 + i].load_state_dict(sub_state(state, f"backbone.blocks.{i}."))
        for branch in self.branches:
            for j, block in enumerate(branch):
                block.load_state_dict(sub_state(state, f"backbone.blocks.{stem_blocks + j}."))
        for t in self.tasks:
            head, saved = self.heads[t.name], sub_state(state, f"heads.{t.name}.")
            if not saved:
                raise ModelError(f"the naive-MTL weights have no head for task {t.name!r}")
            if not isinstance(head, StackedMLPHead):
                for copy_k in head:
                    copy_k.load_state_dict(saved)
            elif head.num_layers == 1 and set(saved) == {"fc.weight", "fc.bias"}:
                with torch.no_grad():
                    for weights, biases in zip(head.copy_weights, head.copy_biases):
                        weights[0].copy_(saved["fc.weight"].t())
                        biases[0].copy_(saved["fc.bias"])

    def fix_assignment(self, groups: list[int]) -> None:
        """Freeze the grouping (the random-grouping baseline, the fine-tune of a read-off): one-hot
        logits no noise can flip, so only the chosen head of each task runs."""
        with torch.no_grad():
            self.group_logits.copy_(F.one_hot(torch.tensor(groups), self.num_groups).float() * 1e4)
        self.group_logits.requires_grad_(False)

    def assignment(self) -> list[int]:
        """Read-off: each task's group is the argmax of its logits."""
        return self.group_logits.argmax(dim=1).tolist()

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Training: {task: (n_active, B, ...)} outputs of the heads that ran, as
        :class:`SampledOutputs` (with the sample: which heads ran and their weights).
        Eval: {task: (B, ...)} through each task's argmax group."""
        x, stem_features = self._stem(image)
        self.shared_features = [x]
        if not self.training:
            groups = self.assignment()
            feats = {k: self._branch(k, x, stem_features) for k in sorted(set(groups))}
            pooled = {k: f[-1].mean(dim=(2, 3)) for k, f in feats.items()}
            return {t.name: self._heads(t.name, feats, pooled, [k]).squeeze(0) for t, k in zip(self.tasks, groups)}
        z = F.gumbel_softmax(self.group_logits, tau=self.tau, hard=self.hard, dim=1)
        chosen = z.detach().argmax(dim=1)
        # hard samples are one-hot in value, yet the straight-through gradient on S needs every
        # head's loss: all heads run, but only the chosen ones (and their branches) with autograd.
        # Frozen logits (a fixed grouping) need no gradient, so then only chosen heads run.
        score_all = self.hard and self.group_logits.requires_grad
        active = torch.ones_like(z, dtype=torch.bool) if score_all else z.detach() >= self.skip_below
        active[torch.arange(len(self.tasks)), chosen] = True
        learn = set(chosen.tolist()) if score_all else None  # branches that get a gradient (None: all)
        feats = {}
        for k in active.any(dim=0).nonzero().flatten().tolist():
            with torch.set_grad_enabled(learn is None or k in learn):
                feats[k] = self._branch(k, x, stem_features)
        pooled = {k: f[-1].mean(dim=(2, 3)) for k, f in feats.items()}  # once per branch, for every task
        return SampledOutputs({t.name: self._task_heads(t.name, feats, pooled, active[i].nonzero().flatten().tolist(),
                                                        int(chosen[i]))
                               for i, t in enumerate(self.tasks)}, weights=z, active=active)

    def _task_heads(self, task: str, feats: dict[int, list[Tensor]], pooled: dict[int, Tensor], groups: list[int],
                    chosen: int) -> Tensor:
        """Training outputs of ``task`` on ``groups``. With hard sampling only the ``chosen`` head
        has a non-zero weight, so the others are scored without autograd: their losses still reach
        S's straight-through gradient as values, and nothing is back-propagated through them
        (about K+2 instead of 3K head passes per task and step)."""
        if len(groups) == 1 or not self.hard:
            return self._heads(task, feats, pooled, groups)
        at = groups.index(chosen)
        others = groups[:at] + groups[at + 1:]
        with torch.no_grad():
            rest = self._heads(task, feats, pooled, others) if others else None
        mine = self._heads(task, feats, pooled, [chosen])
        return mine if rest is None else torch.cat([rest[:at], mine, rest[at:]])

    def _heads(self, task: str, feats: dict[int, list[Tensor]], pooled: dict[int, Tensor], groups: list[int]) -> Tensor:
        """Task ``task``'s heads on the given groups, stacked along a leading group axis."""
        head = self.heads[task]
        if not isinstance(head, StackedMLPHead):
            return torch.stack([head[k](feats[k]) for k in groups])
        return head(torch.stack([pooled[k] for k in groups]), groups)

    def inference_network(self) -> "PrunedGroupNet":
        """One head per task (its most likely group) and only the branches some task chose."""
        groups = self.assignment()
        heads = {}
        for t, k in zip(self.tasks, groups):
            head = self.heads[t.name]
            heads[t.name] = head.copy_as_head(k) if isinstance(head, StackedMLPHead) else copy.deepcopy(head[k])
        branches = {k: copy.deepcopy(self.branches[k]) for k in sorted(set(groups))}
        return PrunedGroupNet(copy.deepcopy(self.stem), branches, heads, dict(zip([t.name for t in self.tasks], groups)))

    def inference_summary(self, kept: nn.Module, images: Tensor, *, force: bool) -> dict:
        """The heads and branches pruning dropped, and the groups that stayed."""
        chosen = sorted(set(kept.assignment.values()))
        n, k = len(self.tasks), self.num_groups
        return {"stripped": [f"{k * n - n} unselected heads", f"{k - len(chosen)} empty group branches"],
                "groups": {str(g): [t for t, a in kept.assignment.items() if a == g] for g in chosen}}


class PrunedGroupNet(nn.Module):
    """Stem, the branches some task chose, one head per task: one graph, N outputs."""

    def __init__(self, stem: nn.ModuleList, branches: dict[int, nn.ModuleList], heads: dict[str, nn.Module],
                 assignment: dict[str, int]) -> None:
        super().__init__()
        self.stem = stem
        self.branches = nn.ModuleDict({str(k): b for k, b in branches.items()})
        self.heads = nn.ModuleDict(heads)
        self.assignment = assignment

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        x, stem_features = run_blocks(self.stem[1:], self.stem[0](image))
        feats = {int(k): stem_features + run_blocks(branch, x)[1] for k, branch in self.branches.items()}
        return {task: head(feats[self.assignment[task]]) for task, head in self.heads.items()}


@NETWORKS.register("dmtg")
def build_group_net(spec: ArchSpec, *, backbone_weights: str | None = None) -> GroupNet:
    """A GroupNet from ``spec``: K identical copies of each dense task's head, as the paper
    initialises a task's head in every group, and one K-copy MLP head per global task."""
    options = network_options(GroupNetOptions, spec.options)
    backbone = spec_backbone(spec, backbone_weights)
    if options.num_groups < 1:
        raise ModelError(f"DMTG needs num_groups >= 1, got {options.num_groups}")
    info = backbone.feature_info
    heads: dict[str, nn.Module] = {}
    for t in spec.tasks:
        if t.output == "global":
            heads[t.name] = StackedMLPHead(options.num_groups, info[-1].num_chs, t.out_channels, options.head_hidden)
        else:
            head = build_heads(spec, info, [t])[t.name]
            heads[t.name] = nn.ModuleList([copy.deepcopy(head) for _ in range(options.num_groups)])
    return GroupNet(backbone, heads, spec.tasks, options)
