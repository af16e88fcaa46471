"""What inference keeps of a trained network, for every method alike:
``strip(model, *, force, reference_inputs) -> StripResult``.

The network says what inference keeps (``inference_network()``) and what that dropped
(``inference_summary``, see models/nets/base.py); this module adds what holds for every network:
a network that cannot be exported, or whose cut is unsafe without ``force``, is refused in one
line, and where something was cut, the drift — the largest difference between the training
network and what inference keeps, over the kept outputs on held-out images — is measured and
recorded as ``strip_drift_max_abs``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from taskfold.compiler.errors import CompileError
from taskfold.models.errors import ModelError


@dataclass
class StripResult:
    model: nn.Module
    outputs: list[str]  # task names the inference graph answers, in output order
    info: dict = field(default_factory=dict)  # goes into manifest["compile"]


def strip(model: nn.Module, *, force: bool = False, reference_inputs: torch.Tensor) -> StripResult:
    """The network to export from ``model`` (a MultiTaskNetwork: its ``inference_network()``), the
    task names it answers and what the manifest records about the cut; ``force`` cuts even where
    the network's own check advises against it (the summary then says so)."""
    try:
        kept = model.inference_network()
        info = model.inference_summary(kept, reference_inputs, force=force)
    except ModelError as exc:
        raise CompileError(str(exc)) from None
    model.eval()
    kept.eval()
    with torch.no_grad():
        small = kept(reference_inputs)
        if kept is not model:
            full = model(reference_inputs)
            info["strip_drift_max_abs"] = max(float((full[name] - small[name]).abs().max()) for name in small)
    return StripResult(model=kept, outputs=list(small), info=info)
