"""The contract every network in NETWORKS keeps (checked for each one by tests/test_method_registry.py).

The training loop and the gradient-weighting strategies need to know what the tasks share; the
compiler needs to know what inference keeps. Every network says both, the same way:

- ``shared_parameters()``: the parameters every task's loss reaches (a strategy that combines
  per-task gradients, such as PCGrad or CAGrad, works on these);
- ``shared_features``: the shared representation(s) of the last forward call (strategies with
  ``on: features`` differentiate at these);
- ``inference_network()``: the network the compiler exports (the primary branch of an AuxNet,
  the pruned GroupNet, the network itself where nothing is cut); a network that is never
  exported as it is (a search supergraph) raises :class:`~taskfold.models.errors.ModelError`
  saying what to compile instead;
- ``inference_summary(kept, images, *, force)``: what ``kept`` (its ``inference_network()``)
  dropped, as the manifest's ``"stripped"`` list, and whatever else the compiler records about it
  (``manifest["compile"]``). A network whose cut is unsafe by its own measure (an AuxNet whose
  primary branch still reads auxiliary features) raises ModelError unless ``force``. ``images``
  are held-out inputs, for anything measured on a forward pass;
- ``forward(image)`` → one output per task name.

With these, one generic path compiles every method (compiler/strip.py): a method is one method
file (trainer/methods/) plus one network file (here).

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

    def inference_summary(self, kept: nn.Module, images: Tensor, *, force: bool) -> dict: ...

    def __call__(self, image: Tensor) -> dict[str, Tensor]: ...


@runtime_checkable
class SearchableNetwork(MultiTaskNetwork, Protocol):
    def arch_parameters(self) -> list[nn.Parameter]: ...


class KeptAsTrained:
    """Mixin of a network that inference keeps whole (nothing cut; a network with something to
    report about itself, such as BranchedNet's MAdds, overrides ``inference_summary``)."""

    def inference_network(self) -> nn.Module:
        return self  # type: ignore[return-value]

    def inference_summary(self, kept: nn.Module, images: Tensor, *, force: bool) -> dict:
        return {"stripped": []}
