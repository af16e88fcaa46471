"""BatchNorm whose batch statistics span every rank of a DDP run, on any backend (gloo included).

``torch.nn.SyncBatchNorm`` runs on CUDA only, and timm's ``BatchNormAct2d`` (BN + activation in
one module) needs its own converted class. Here one function computes the global mean and
variance with two differentiable all-reduces (:class:`_AllReduceSum`: its backward all-reduces
the gradient, so each rank's input gradient sees every rank's loss), and
:func:`convert_sync_batchnorm` swaps the class of every BatchNorm in place (parameters, buffers
and state-dict keys unchanged, so checkpoints load into the plain network). Outside a
multi-process run, and in eval mode, the layers behave exactly as before.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sync_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn`` in training mode with statistics over the whole global batch (two-pass variance,
    unbiased running variance as in ``F.batch_norm``)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    rows = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
    summed = _AllReduceSum.apply(torch.cat([x.sum(dims), rows]))
    count = summed[-1]
    mean = summed[:-1] / count
    centred = x - mean.view(shape)
    var = _AllReduceSum.apply((centred * centred).sum(dims)) / count
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            unbiased = var.detach() * (count / (count - 1).clamp(min=1))
            bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    return y


class _SyncedBatchNorm:
    """Mixed in front of a BatchNorm class: training-mode statistics over all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        y = sync_batch_norm(self, x)
        if hasattr(self, "act"):  # timm's BatchNormAct2d: normalisation, then dropout and activation
            y = self.act(self.drop(y))
        return y


_SYNCED: dict[type, type] = {}


def convert_sync_batchnorm(module: nn.Module) -> int:
    """Make every BatchNorm under ``module`` synchronise its statistics; returns how many."""
    count = 0
    for m in module.modules():
        cls = type(m)
        if isinstance(m, _BatchNorm) and not isinstance(m, _SyncedBatchNorm):
            if cls not in _SYNCED:
                _SYNCED[cls] = type(f"Synced{cls.__name__}", (_SyncedBatchNorm, cls), {})
            m.__class__ = _SYNCED[cls]
            count += 1
    return count
