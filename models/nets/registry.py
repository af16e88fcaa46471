"""Networks by method name: ``build_network(spec)`` rebuilds what a run trained from its ArchSpec."""
from __future__ import annotations

from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.registry import Registry

NETWORKS: Registry = Registry("network")


def build_network(spec: ArchSpec, *, backbone_weights: str | None = None) -> nn.Module:
    """Build the network of ``spec.method``; ``backbone_weights`` initialises every backbone copy."""
    return NETWORKS.get(spec.method)(spec, backbone_weights=backbone_weights)
