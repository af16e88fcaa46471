"""AuxNet: one primary and K auxiliary single-task branches joined by fusion ops (Aux-G, Aux-NAS).

Every task has its own full backbone and head; nothing is shared. Links carry a branch's fused
block outputs into the fusion op of another branch's later block (the window: the ``window``
blocks before it). Three link layouts:

- ``aux_g_stage``: primary → auxiliary, fixed (alpha = 1), into the last block of every stage;
- ``aux_g_layer``: primary → auxiliary, fixed, into every block;
- ``aux_nas``: both directions into every block, each link with a learnable
  ``alpha = sigmoid(logit)``; alpha^P (auxiliary → primary) is pushed to zero by an L1 penalty
  so that the auxiliary branches can be cut away at inference.

Each auxiliary branch links only with the primary, so links grow linearly with K.
:meth:`AuxNet.inference_network` returns the primary branch alone: what the compiler exports.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.backbones import Backbone
from taskfold.models.errors import ModelError
from taskfold.models.layers.fusion import FusionNorm, FusionOp
from taskfold.models.nets.registry import NETWORKS, network_options
from taskfold.models.nets.shared import build_heads, spec_backbone

AuxLayout = Literal["aux_g_stage", "aux_g_layer", "aux_nas"]  # the link layouts, one per Aux method
AUX_METHODS: tuple[str, ...] = get_args(AuxLayout)
PRIMARY = 0  # branch index of the primary task


@dataclass
class AuxNetOptions:
    """What an AuxNet is built and stripped with (the Aux methods' Options extend it)."""

    window: int = 3  # blocks before a fused block whose outputs it reads
    alpha_p_init: float = 0.5  # initial alpha of links auxiliary → primary
    alpha_a_init: float = 0.5  # initial alpha of links primary → auxiliary
    strip_threshold: float = 1e-2  # the largest alpha^P the compiler cuts without --force


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class AuxNet(nn.Module):
    """The training network of an Aux method: ``branches[b]`` and ``heads[b]`` answer task
    ``task_order[b]`` (the primary first), joined by the fusion ops of the link ``layout``."""

    def __init__(self, branches: list[Backbone], heads: list[nn.Module], task_order: list[str], layout: AuxLayout,
                 options: AuxNetOptions) -> None:
        super().__init__()
        if layout not in AUX_METHODS:
            raise ModelError(f"AuxNet builds {', '.join(AUX_METHODS)}; got method {layout!r}")
        if not len(branches) == len(heads) == len(task_order) >= 2:
            raise ModelError(f"AuxNet needs one branch and one head per task, primary and at least one auxiliary; "
                             f"got {len(branches)} branches, {len(heads)} heads, {len(task_order)} tasks")
        self.task_order = list(task_order)
        self.layout = layout
        self.options = options
        self.branches = nn.ModuleList(branches)
        info = self.branches[0].feature_info
        self.heads = nn.ModuleList(heads)
        self.sources: dict[str, list[tuple[int, int]]] = {}
        self.fusions = nn.ModuleDict()
        self.alpha_logits = nn.ParameterDict()
        init = {"P": _logit(options.alpha_p_init), "A": _logit(options.alpha_a_init)}
        for dst, block, direction, srcs in self._links(self.branches[0].stages, len(info)):
            key = f"b{dst}_{block}"
            self.sources[key] = srcs
            self.fusions[key] = FusionOp(info[block].num_chs, [info[j].num_chs for _, j in srcs])
            if self.layout == "aux_nas":
                self.alpha_logits[key] = nn.Parameter(torch.full((len(srcs),), init[direction]))
        self.cut_aux_to_primary = False  # True: alpha^P treated as exactly zero (what stripping assumes)
        self.shared_features: list[torch.Tensor] = []

    def _links(self, stages: list[list[int]], num_blocks: int):
        """Yield (dst branch, dst block, "P"|"A", [(src branch, src block), ...]) for every fusion op."""
        if self.layout == "aux_g_stage":
            targets = [stage[-1] for stage in stages]
        else:
            targets = list(range(num_blocks))
        aux = range(1, len(self.task_order))
        for block in targets:
            window = list(range(max(0, block - self.options.window), block))
            if not window:
                continue
            if self.layout == "aux_nas":
                yield PRIMARY, block, "P", [(k, j) for k in aux for j in window]
            for k in aux:
                yield k, block, "A", [(PRIMARY, j) for j in window]

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alpha_logits.values())

    def alphas(self, key: str) -> torch.Tensor:
        if self.layout != "aux_nas":
            return self.fusions[key].conv.weight.new_ones(len(self.sources[key]))
        alpha = torch.sigmoid(self.alpha_logits[key])
        if self.cut_aux_to_primary and key.startswith(f"b{PRIMARY}_"):
            return torch.zeros_like(alpha)
        return alpha

    def alpha_values(self, direction: str) -> torch.Tensor:
        """All alpha^P ("P": auxiliary → primary) or alpha^A ("A") values, concatenated."""
        keys = [k for k in self.alpha_logits if k.startswith(f"b{PRIMARY}_") == (direction == "P")]
        if not keys:
            return torch.zeros(0)
        return torch.cat([torch.sigmoid(self.alpha_logits[k]) for k in keys])

    def shared_parameters(self) -> list[nn.Parameter]:
        """The primary branch: auxiliary losses reach it through the primary → auxiliary links."""
        return list(self.branches[PRIMARY].parameters())

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        current = [branch.stem(image) for branch in self.branches]
        fused: list[list[torch.Tensor]] = [[] for _ in self.branches]
        for block in range(len(self.branches[0].blocks)):
            raw = [branch.blocks[block](x) for branch, x in zip(self.branches, current)]
            for b, x in enumerate(raw):
                key = f"b{b}_{block}"
                if key in self.fusions:
                    inputs = [fused[src][j] for src, j in self.sources[key]]
                    x = self.fusions[key](x, inputs, self.alphas(key))
                fused[b].append(x)
            current = [f[-1] for f in fused]
        self.shared_features = fused[PRIMARY]
        return {name: head(fused[b]) for b, (name, head) in enumerate(zip(self.task_order, self.heads))}

    def inference_network(self) -> "StrippedPrimary":
        """The primary branch alone, with alpha^P taken as zero: its fusion ops reduce to BN+ReLU."""
        norms = {int(key.split("_")[1]): op.without_inputs() for key, op in self.fusions.items()
                 if key.startswith(f"b{PRIMARY}_")}
        return StrippedPrimary(self.branches[PRIMARY], norms, self.heads[PRIMARY], self.task_order[0])

    def inference_summary(self, kept: nn.Module, images: torch.Tensor, *, force: bool) -> dict:
        """What the cut removed, and why it is safe: the largest alpha^P must be at most the
        options' ``strip_threshold`` (else the primary still reads auxiliary features and cutting
        them changes its answers), unless ``force``."""
        with torch.no_grad():
            alpha_p = self.alpha_values("P")
        max_alpha_p = float(alpha_p.max()) if alpha_p.numel() else 0.0
        threshold = self.options.strip_threshold
        if max_alpha_p > threshold and not force:
            raise ModelError(f"max alpha^P = {max_alpha_p:.3g} exceeds strip_threshold {threshold:g}: the primary "
                             "task still uses auxiliary features (train longer or raise lambda_max, or pass --force)")
        primary_convs = sum(1 for key in self.fusions if key.startswith(f"b{PRIMARY}_"))
        removed = [f"auxiliary branch {name} (backbone + head)" for name in self.task_order[1:]]
        removed += [f"{len(self.fusions) - primary_convs} auxiliary fusion ops",
                    f"{primary_convs} primary fusion 1x1 convs"]
        return {"stripped": removed, "max_alpha_aux_to_primary": max_alpha_p, "strip_threshold": threshold,
                "strip_forced": max_alpha_p > threshold}


class StrippedPrimary(nn.Module):
    """Backbone blocks of the primary branch, BN+ReLU after each fused block, the primary head."""

    def __init__(self, backbone: nn.Module, norms: dict[int, FusionNorm], head: nn.Module, task: str) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.norms = nn.ModuleDict({str(i): copy.deepcopy(n) for i, n in norms.items()})
        self.head = copy.deepcopy(head)
        self.task = task

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.backbone.stem(image)
        features = []
        for i, block in enumerate(self.backbone.blocks):
            x = block(x)
            if str(i) in self.norms:
                x = self.norms[str(i)](x)
            features.append(x)
        return {self.task: self.head(features)}


def build_aux_net(spec: ArchSpec, *, backbone_weights: str | None = None) -> AuxNet:
    """An AuxNet from ``spec``: the primary task first, then the others in task order, each with
    its own freshly initialised backbone (or ``backbone_weights``) and head."""
    if len(spec.primary) != 1 or len(spec.tasks) < 2:
        raise ModelError("aux methods need `primary:` set to one task and at least one auxiliary task")
    by_name = {t.name: t for t in spec.tasks}
    task_order = spec.primary + [t.name for t in spec.tasks if t.name != spec.primary[0]]
    branches = [spec_backbone(spec, backbone_weights) for _ in task_order]
    info = branches[0].feature_info
    heads = [build_heads(spec, info, [by_name[name]])[name] for name in task_order]
    return AuxNet(branches, heads, task_order, spec.method, network_options(AuxNetOptions, spec.options))


for _method in AUX_METHODS:
    NETWORKS.register(_method)(build_aux_net)
