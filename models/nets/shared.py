"""Hard parameter sharing (``shared``: one encoder, one head per task — Aux-Head / naive MTL) and
its no-sharing twin (``single``: one full encoder+head network per task)."""
from __future__ import annotations

import torch
from torch import nn

from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.models.backbones import create_backbone
from taskfold.models.layers.heads import create_head, default_head
from taskfold.models.nets.base import KeptAsTrained
from taskfold.models.nets.registry import NETWORKS


def build_heads(spec: ArchSpec, feature_info: list, tasks: list[TaskHead]) -> nn.ModuleDict:
    """One head per task, of the kind that suits the backbone and the task's output."""
    size = (spec.image_size, spec.image_size)
    return nn.ModuleDict({
        t.name: create_head(default_head(feature_info, t.output, spec.dense_head), feature_info, t.out_channels,
                            channels=spec.head_channels, output_size=size)
        for t in tasks
    })


class SharedNet(KeptAsTrained, nn.Module):
    """One backbone whose block features feed every task's head.

    After a forward pass ``shared_features`` holds the block outputs the heads read (the shared
    representation a gradient-based weighting strategy differentiates against).
    """

    def __init__(self, spec: ArchSpec, *, backbone_weights: str | None = None,
                 tasks: list[TaskHead] | None = None) -> None:
        super().__init__()
        self.backbone = create_backbone(spec.backbone, img_size=spec.image_size, weights=backbone_weights,
                                        **spec.backbone_options)
        self.heads = build_heads(spec, self.backbone.feature_info, tasks or spec.tasks)
        self.read_indices = sorted({i for head in self.heads.values() for i in head.feature_indices})
        self.shared_features: list[torch.Tensor] = []

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone.forward_features(image)
        self.shared_features = [features[i] for i in self.read_indices]
        return {name: head(features) for name, head in self.heads.items()}


class SingleTaskNets(KeptAsTrained, nn.Module):
    """Independent networks, one per task, trained side by side: nothing is shared, so summing the
    task losses gives each network exactly its own single-task gradient."""

    def __init__(self, spec: ArchSpec, *, backbone_weights: str | None = None) -> None:
        super().__init__()
        self.nets = nn.ModuleDict({
            t.name: SharedNet(spec, backbone_weights=backbone_weights, tasks=[t]) for t in spec.tasks
        })
        self.shared_features: list[torch.Tensor] = []

    def shared_parameters(self) -> list[nn.Parameter]:
        return []

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for net in self.nets.values():
            out.update(net(image))
        return out


@NETWORKS.register("shared")
def _shared(spec: ArchSpec, *, backbone_weights: str | None = None) -> nn.Module:
    return SharedNet(spec, backbone_weights=backbone_weights)


@NETWORKS.register("single")
def _single(spec: ArchSpec, *, backbone_weights: str | None = None) -> nn.Module:
    return SingleTaskNets(spec, backbone_weights=backbone_weights)
