"""Reading one network's weights out of another's state dict.

A method that starts from another run (Aux-NAS's branches from single-task runs, DMTG from a
naive-MTL run, BMTAS's retrain from its supergraph) takes the tensors under one module prefix of
that run's ``model.safetensors`` and loads them into a module of its own network.
"""
from __future__ import annotations

from torch import Tensor


def sub_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix`` (e.g. ``"backbone.blocks.0."``), the prefix removed."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
