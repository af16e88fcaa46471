"""What each method keeps at inference: ``STRIPPERS[method](model, spec, *, force, reference_inputs) -> StripResult``.

``single`` and ``shared`` keep the network as trained. Methods with searched parts register a
stripper that removes what inference does not need (auxiliary branches, pruned heads, unused
branches) and says what it removed, for the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.models.registry import Registry

STRIPPERS: Registry = Registry("compiler stripper")


@dataclass
class StripResult:
    model: nn.Module
    outputs: list[str]  # task names the inference graph answers, in output order
    info: dict = field(default_factory=dict)  # goes into manifest["compile"]


def inference_drift(model: nn.Module, kept: nn.Module, reference_inputs: torch.Tensor, outputs: list[str]) -> float:
    """The largest difference, over ``outputs`` on held-out images, between the training network
    and what inference keeps of it (``model.inference_network()``), both in eval mode: how much
    cutting changed the answers (recorded in the manifest)."""
    model.eval()
    kept.eval()
    with torch.no_grad():
        full, small = model(reference_inputs), kept(reference_inputs)
    return max(float((full[name] - small[name]).abs().max()) for name in outputs)


@STRIPPERS.register("single")
@STRIPPERS.register("shared")
def keep_all(model: nn.Module, spec: ArchSpec, *, force: bool = False, **_: object) -> StripResult:
    return StripResult(model=model, outputs=spec.task_names, info={"stripped": []})
