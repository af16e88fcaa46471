"""Prune a DMTG network: one head per task (its argmax group), only the branches tasks chose.

Of the K·N heads, the K·N − N that no task selected are dropped, and so is every branch that
received no task; what remains is one graph with N outputs.
"""
from __future__ import annotations

import torch
from torch import nn

from taskfold.compiler.errors import CompileError
from taskfold.compiler.strip import STRIPPERS, StripResult, inference_drift
from taskfold.models.arch import ArchSpec
from taskfold.models.nets.group import GroupNet


@STRIPPERS.register("dmtg")
def strip_group(model: nn.Module, spec: ArchSpec, *, force: bool = False, reference_inputs: torch.Tensor
                ) -> StripResult:
    if not isinstance(model, GroupNet):
        raise CompileError(f"the group pruner needs a dmtg run; this run was trained with method {spec.method!r}")
    pruned = model.inference_network()
    drift = inference_drift(model, pruned, reference_inputs, spec.task_names)
    kept = sorted(set(pruned.assignment.values()))
    n, k = len(spec.tasks), model.num_groups
    return StripResult(model=pruned, outputs=spec.task_names, info={
        "stripped": [f"{k * n - n} unselected heads", f"{k - len(kept)} empty group branches"],
        "groups": {str(g): [t for t, a in pruned.assignment.items() if a == g] for g in kept},
        "prune_drift_max_abs": drift,
    })
