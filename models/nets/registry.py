"""Networks by method name: ``build_network(spec)`` rebuilds what a run trained from its ArchSpec.

A network with options of its own declares them as a dataclass next to it (``AuxNetOptions``,
``GroupNetOptions``, ``BranchedNetOptions``); the method's ``Options`` extends that dataclass, so
every default exists once, and ``arch.json`` stores the resolved values (see models/arch.py).
"""
from __future__ import annotations

import dataclasses
from typing import TypeVar

from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.registry import Registry

NETWORKS: Registry = Registry("network")

OptionsT = TypeVar("OptionsT")


def network_options(cls: type[OptionsT], options: dict) -> OptionsT:
    """A network's options dataclass from an ArchSpec's ``options`` (the method's options, a
    superset: fields the network does not declare are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in options.items() if key in names})


def build_network(spec: ArchSpec, *, backbone_weights: str | None = None) -> nn.Module:
    """Build the network of ``spec.method``; ``backbone_weights`` initialises every backbone copy."""
    return NETWORKS.get(spec.method)(spec, backbone_weights=backbone_weights)
