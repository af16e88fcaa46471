"""The contract every network in NETWORKS keeps (checked for each one by tests/test_method_registry.py).

The training loop and the gradient-weighting strategies need to know what the tasks share; the
compiler needs to know what inference keeps. Every network says both, the same way:

- ``shared_parameters()``: the parameters every task's loss reaches (a strategy that combines
  per-task gradients, such as PCGrad or CAGrad, works on these);
- ``shared_features``: the shared representation(s) of the last forward call (strategies with
  ``on: features`` differentiate at these);
- ``inference_network()``: the network the compiler exports (the primary branch of an AuxNet,
  the pruned GroupNet, the network itself where nothing is cut);
- ``forward(image)`` → one output per task name.

A searchable network also has ``arch_parameters()``: what its method's architecture steps update.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class MultiTaskNetwork(Protocol):
    shared_features: list[Tensor]

    def shared_parameters(self) -> list[nn.Parameter]: ...

    def inference_network(self) -> nn.Module: ...

    def __call__(self, image: Tensor) -> dict[str, Tensor]: ...


@runtime_checkable
class SearchableNetwork(MultiTaskNetwork, Protocol):
    def arch_parameters(self) -> list[nn.Parameter]: ...
