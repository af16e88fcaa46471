"""The Aux-NAS fusion op: ``out = ReLU(BN(x + Conv1x1(concat_j(alpha_j * resize(y_j)))))``.

``x`` is the branch's own feature, ``y_j`` features of another branch, resized bilinearly to
``x``'s size. The 1×1 convolution starts at zero, so training starts from the unfused
networks. All the work that depends on other branches sits inside the convolution; when every
``alpha_j`` is zero the convolution's input is zero and only BN+ReLU remain, which is what
:meth:`FusionOp.without_inputs` keeps for inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusionNorm(nn.Module):
    """The part of a fusion op that survives stripping: ReLU(BN(x))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


class FusionOp(nn.Module):
    """Fuse weighted features of other branches into this branch's feature."""

    def __init__(self, channels: int, input_channels: list[int]) -> None:
        super().__init__()
        self.input_channels = list(input_channels)
        self.conv = nn.Conv2d(sum(input_channels), channels, kernel_size=1, bias=False)
        nn.init.zeros_(self.conv.weight)
        self.norm = FusionNorm(channels)

    def forward(self, x: torch.Tensor, inputs: list[torch.Tensor], alphas: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        resized = [
            alphas[j] * (y if y.shape[-2:] == size else F.interpolate(y, size=size, mode="bilinear", align_corners=False))
            for j, y in enumerate(inputs)
        ]
        return self.norm(x + self.conv(torch.cat(resized, dim=1)))

    def without_inputs(self) -> FusionNorm:
        """The op with every input weight at zero: the convolution contributes exactly nothing."""
        return self.norm
