"""Mixed precision: ``train.amp: none | bf16 | fp16`` through ``torch.autocast``.

What stays in float32, and why:

- every parameter (the weights, Aux-NAS's alpha, BMTAS's alpha, DMTG's group logits, a
  strategy's own weights): autocast casts *inputs of ops*, never parameters, so the optimisers
  always update float32 master values;
- the network's outputs: a forward hook casts them to float32, so task losses, the per-task
  gradients on them and the metric meters work in float32 whatever the network ran in;
- the per-task gradients a strategy compares (see ``weighting/grads.py``): flattened as float32.

fp16 needs loss scaling (its gradients underflow); bf16 does not (it has float32's range). The
GradScaler is used for fp16 only. A strategy that works on per-task gradients must see them
*unscaled* and finite: the loss scale travels in :class:`~taskfold.trainer.weighting.StepContext`
(``loss_scale``), the gradient plumbing divides it out before a strategy's rule sees a gradient,
skips the rule on a step whose gradients overflowed (the scaler then skips that step), and scales
the combined gradient back so that ``GradScaler.step`` unscales every ``.grad`` the same way.
Architecture steps (Aux-NAS, BMTAS) have an optimiser of their own and no scaler: under fp16 they
run in float32; under bf16 they run in autocast like the weight steps.

fp16 on the CPU is allowed: this PyTorch supports CPU autocast to float16 and a CPU GradScaler
(it is slower than float32 on most CPUs; bf16 is the CPU choice).
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from taskfold.trainer.config import AMP_CHOICES

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def float_outputs(outputs):
    """The network's outputs with every floating-point tensor in float32 (dicts/lists walked)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        result = copy.copy(outputs)  # a dict subclass keeps its attributes (GroupNet's SampledOutputs)
        result.update({k: float_outputs(v) for k, v in outputs.items()})
        return result
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(float_outputs(v) for v in outputs)
    return outputs


class MixedPrecision:
    """The autocast contexts and the (fp16-only) GradScaler of one run on one device."""

    def __init__(self, amp: str, device: torch.device) -> None:
        if amp not in AMP_CHOICES:
            raise ValueError(f"train.amp: expected one of {', '.join(AMP_CHOICES)}, got {amp!r}")
        self.amp = amp
        self.device = torch.device(device)
        self.dtype = _DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def attach(self, model: nn.Module) -> None:
        """Cast the model's outputs to float32 after every forward (a no-op without autocast)."""
        if self.enabled:
            model.register_forward_hook(lambda module, args, output: float_outputs(output))

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of a forward pass (and the losses computed from it)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def arch_autocast(self) -> contextlib.AbstractContextManager:
        """The context of an architecture step: autocast under bf16; float32 under fp16 (no scaler)."""
        return self.autocast() if self.amp == "bf16" else contextlib.nullcontext()

    def loss_scale(self) -> torch.Tensor | None:
        """The current fp16 loss scale as a 0-dim tensor on the device (no host sync); None otherwise."""
        if self.scaler is None:
            return None
        return self.scaler.scale(torch.ones((), device=self.device))

    def state_dict(self) -> dict:
        """What a resumed run restores: the fp16 scaler's scale and growth tracker (nothing otherwise)."""
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; under fp16 the scaler unscales, skips a step with inf/NaN gradients
        and adapts the scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
