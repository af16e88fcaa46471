"""Strip an Aux-G / Aux-NAS network down to its primary branch, and prove it safe.

What goes: every auxiliary branch (backbone and head), every link out of it and every fusion
1×1 convolution of the primary branch (all its inputs come from auxiliary branches). What stays:
the primary backbone and head plus one BN+ReLU per fused primary block. Safety: the largest
alpha^P (auxiliary → primary weight) must be at most the recipe's ``strip_threshold`` unless
forced, and the drift between the stripped network and the full training network (with its
actual alpha^P) is measured on held-out images and recorded.
"""
from __future__ import annotations

import torch
from torch import nn

from taskfold.compiler.errors import CompileError
from taskfold.compiler.strip import STRIPPERS, StripResult, inference_drift
from taskfold.models.arch import ArchSpec
from taskfold.models.nets.aux import AUX_METHODS, PRIMARY, AuxNet, AuxNetOptions
from taskfold.models.nets.registry import network_options


def strip_aux(model: nn.Module, spec: ArchSpec, *, force: bool = False, reference_inputs: torch.Tensor
              ) -> StripResult:
    if spec.method not in AUX_METHODS or not isinstance(model, AuxNet):
        raise CompileError(f"the auxiliary-branch stripper needs a run of {', '.join(AUX_METHODS)}; "
                           f"this run was trained with method {spec.method!r}")
    threshold = network_options(AuxNetOptions, spec.options).strip_threshold
    with torch.no_grad():
        alpha_p = model.alpha_values("P")
    max_alpha_p = float(alpha_p.max()) if alpha_p.numel() else 0.0
    if max_alpha_p > threshold and not force:
        raise CompileError(f"max alpha^P = {max_alpha_p:.3g} exceeds strip_threshold {threshold:g}: the primary "
                           "task still uses auxiliary features (train longer or raise lambda_max, or pass --force)")
    stripped = model.inference_network()
    primary = model.task_order[PRIMARY]
    drift = inference_drift(model, stripped, reference_inputs, [primary])
    primary_convs = sum(1 for key in model.fusions if key.startswith(f"b{PRIMARY}_"))
    aux_fusions = len(model.fusions) - primary_convs
    removed = [f"auxiliary branch {name} (backbone + head)" for name in model.task_order[1:]]
    removed += [f"{aux_fusions} auxiliary fusion ops", f"{primary_convs} primary fusion 1x1 convs"]
    return StripResult(model=stripped, outputs=[primary], info={
        "stripped": removed,
        "max_alpha_aux_to_primary": max_alpha_p,
        "strip_threshold": threshold,
        "strip_forced": bool(force and max_alpha_p > threshold),
        "strip_drift_max_abs": drift,
    })


for _method in AUX_METHODS:
    STRIPPERS.register(_method)(strip_aux)
