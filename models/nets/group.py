"""GroupNet (DMTG): N tasks put into at most K groups in one shot.

An optional shared stem (the backbone's first ``stem_blocks`` blocks), then K group branches
(copies of the remaining blocks, identically initialised) and K×N heads (each branch has a head
for every task). Group logits ``S`` (N×K, zeros = uniform) are sampled with Gumbel-softmax each
training step; the method weighs task i's loss through branch k by ``Z[i, k]``.

Efficiency (the paper's own limitation with heavy heads): a global task's K heads are one
:class:`StackedMLPHead` evaluated in a single batched call, and in training any head whose
sampled weight is below ``skip_below`` is not run at all (nor a branch no task needs) — its
contribution to the loss and to the gradient of ``S`` is at most that weight times its loss
(soft sampling only: with ``hard`` sampling every head runs, as the straight-through gradient
needs all of them).
:meth:`GroupNet.pruned_network` keeps one head per task and only the branches tasks chose.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskfold.models.arch import ArchSpec
from taskfold.models.backbones import create_backbone
from taskfold.models.errors import ModelError
from taskfold.models.layers.heads import create_head, default_head
from taskfold.models.layers.stacked_heads import StackedMLPHead
from taskfold.models.nets.registry import NETWORKS


def run_blocks(blocks, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Apply blocks in order; (last output, every block's output)."""
    features = []
    for block in blocks:
        x = block(x)
        features.append(x)
    return x, features


class GroupNet(nn.Module):
    def __init__(self, spec: ArchSpec, *, backbone_weights: str | None = None) -> None:
        super().__init__()
        opts = spec.options
        self.num_groups = int(opts.get("num_groups", 2))
        stem_blocks = int(opts.get("stem_blocks", 0))
        backbone = create_backbone(spec.backbone, img_size=spec.image_size, weights=backbone_weights,
                                   **spec.backbone_options)
        if self.num_groups < 1:
            raise ModelError(f"DMTG needs num_groups >= 1, got {self.num_groups}")
        if not 0 <= stem_blocks < len(backbone.blocks):
            raise ModelError(f"stem_blocks must be in [0, {len(backbone.blocks) - 1}] for {spec.backbone}, got {stem_blocks}")
        self.tasks = spec.tasks
        self.stem = nn.ModuleList([backbone.stem, *backbone.blocks[:stem_blocks]])
        branch = nn.ModuleList(backbone.blocks[stem_blocks:])
        self.branches = nn.ModuleList([copy.deepcopy(branch) for _ in range(self.num_groups)])
        info = backbone.feature_info
        size = (spec.image_size, spec.image_size)
        hidden = int(opts.get("head_hidden", 0))
        self.heads = nn.ModuleDict()
        for t in spec.tasks:
            if t.output == "global":
                self.heads[t.name] = StackedMLPHead(self.num_groups, info[-1].num_chs, t.out_channels, hidden)
            else:
                self.heads[t.name] = nn.ModuleList([
                    create_head(default_head(spec.backbone, t.output), info, t.out_channels,
                                channels=spec.head_channels, output_size=size)
                    for _ in range(self.num_groups)])
        self.group_logits = nn.Parameter(torch.zeros(len(spec.tasks), self.num_groups))
        self.tau = float(opts.get("tau", 2.5))
        self.hard = bool(opts.get("hard", False))
        self.skip_below = float(opts.get("skip_below", 1e-3))
        self.assignment_weights: Tensor | None = None  # Z of the last training step, (N, K)
        self.active: Tensor | None = None  # which (task, group) heads ran in the last step
        self.shared_features: list[Tensor] = []

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.stem.parameters())

    def _stem(self, image: Tensor) -> tuple[Tensor, list[Tensor]]:
        return run_blocks(self.stem[1:], self.stem[0](image))

    def _branch(self, k: int, x: Tensor, stem_features: list[Tensor]) -> list[Tensor]:
        return stem_features + run_blocks(self.branches[k], x)[1]

    def fix_assignment(self, groups: list[int]) -> None:
        """Freeze the grouping (the random-grouping baseline): one-hot logits no noise can flip."""
        with torch.no_grad():
            self.group_logits.copy_(F.one_hot(torch.tensor(groups), self.num_groups).float() * 1e4)
        self.group_logits.requires_grad_(False)

    def assignment(self) -> list[int]:
        """Read-off: each task's group is the argmax of its logits."""
        return self.group_logits.argmax(dim=1).tolist()

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Training: {task: (n_active, B, ...)} outputs of the heads that ran (see ``active``).
        Eval: {task: (B, ...)} through each task's argmax group."""
        x, stem_features = self._stem(image)
        self.shared_features = [x]
        if not self.training:
            groups = self.assignment()
            feats = {k: self._branch(k, x, stem_features) for k in sorted(set(groups))}
            pooled = {k: f[-1].mean(dim=(2, 3)) for k, f in feats.items()}
            return {t.name: self._heads(t.name, feats, pooled, [k]).squeeze(0) for t, k in zip(self.tasks, groups)}
        z = F.gumbel_softmax(self.group_logits, tau=self.tau, hard=self.hard, dim=1)
        # hard samples are one-hot in value, yet the straight-through gradient on S needs every
        # head's loss: nothing may be skipped then
        active = torch.ones_like(z, dtype=torch.bool) if self.hard else z.detach() >= self.skip_below
        active[torch.arange(len(self.tasks)), z.detach().argmax(dim=1)] = True
        self.assignment_weights, self.active = z, active
        feats = {k: self._branch(k, x, stem_features) for k in active.any(dim=0).nonzero().flatten().tolist()}
        pooled = {k: f[-1].mean(dim=(2, 3)) for k, f in feats.items()}  # once per branch, for every task
        return {t.name: self._heads(t.name, feats, pooled, active[i].nonzero().flatten().tolist())
                for i, t in enumerate(self.tasks)}

    def _heads(self, task: str, feats: dict[int, list[Tensor]], pooled: dict[int, Tensor], groups: list[int]) -> Tensor:
        """Task ``task``'s heads on the given groups, stacked along a leading group axis."""
        head = self.heads[task]
        if not isinstance(head, StackedMLPHead):
            return torch.stack([head[k](feats[k]) for k in groups])
        inputs = torch.stack([pooled[k] for k in groups])
        return head(inputs, None if len(groups) == self.num_groups else torch.tensor(groups))

    def pruned_network(self) -> "PrunedGroupNet":
        groups = self.assignment()
        heads = {}
        for t, k in zip(self.tasks, groups):
            head = self.heads[t.name]
            heads[t.name] = head.copy_as_head(k) if isinstance(head, StackedMLPHead) else copy.deepcopy(head[k])
        branches = {k: copy.deepcopy(self.branches[k]) for k in sorted(set(groups))}
        return PrunedGroupNet(copy.deepcopy(self.stem), branches, heads, dict(zip([t.name for t in self.tasks], groups)))


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


NETWORKS.register("dmtg")(lambda spec, *, backbone_weights=None: GroupNet(spec, backbone_weights=backbone_weights))
