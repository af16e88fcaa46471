"""Hard parameter sharing (``shared``: one encoder, one head per task — Aux-Head / naive MTL) and
its no-sharing twin (``single``: one full encoder+head network per task).

Also the two ArchSpec readers every network builder in NETWORKS shares: :func:`spec_backbone` and
:func:`build_heads`. Networks themselves take built parts and their options, never an ArchSpec.
"""
from __future__ import annotations

import torch
from torch import nn

from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.models.backbones import Backbone, create_backbone
from taskfold.models.layers.heads import create_head, default_head
from taskfold.models.nets.base import KeptAsTrained
from taskfold.models.nets.registry import NETWORKS


def spec_backbone(spec: ArchSpec, weights: str | None) -> Backbone:
    """A fresh backbone as ``spec`` describes it (its own random initialisation, or ``weights``)."""
    return create_backbone(spec.backbone, img_size=spec.image_size, weights=weights, **spec.backbone_options)


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

    def __init__(self, backbone: Backbone, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
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

    def __init__(self, nets: dict[str, SharedNet]) -> None:
        super().__init__()
        self.nets = nn.ModuleDict(nets)
        self.shared_features: list[torch.Tensor] = []

    def shared_parameters(self) -> list[nn.Parameter]:
        return []

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for net in self.nets.values():
            out.update(net(image))
        return out


def _shared_net(spec: ArchSpec, tasks: list[TaskHead], weights: str | None) -> SharedNet:
    backbone = spec_backbone(spec, weights)
    return SharedNet(backbone, build_heads(spec, backbone.feature_info, tasks))


@NETWORKS.register("shared")
def _shared(spec: ArchSpec, *, backbone_weights: str | None = None) -> nn.Module:
    return _shared_net(spec, spec.tasks, backbone_weights)


@NETWORKS.register("single")
def _single(spec: ArchSpec, *, backbone_weights: str | None = None) -> nn.Module:
    return SingleTaskNets({t.name: _shared_net(spec, [t], backbone_weights) for t in spec.tasks})
