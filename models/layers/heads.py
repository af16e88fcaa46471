"""Task heads: features of a backbone -> a task's prediction at the input resolution.

Every head takes the list of block outputs (``Backbone.forward_features``) and the backbone's
``feature_info``, so it works on any registered backbone; ``feature_indices`` says which block
outputs it reads (the shared representation a gradient-weighting strategy differentiates). Convolutions are always
``Conv(bias=False) -> BatchNorm -> ReLU`` with the conv feeding only its BN: the compiler's
BN-folding pass then finds clean Conv/BN pairs. Resizing uses bilinear interpolation
(``align_corners=False``), a plain ONNX ``Resize``.

The ASPP image-pooling branch normalises a 1x1 pooled map: in training its BatchNorm needs a
batch of at least two images (as in torchvision's DeepLabV3); in eval it is a plain affine map.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import FeatureInfo
from ..errors import ModelError
from ..registry import Registry

__all__ = ["DENSE_HEADS", "HEADS", "ASPPHead", "DPTHead", "LinearHead", "create_head", "default_head"]

HEADS: Registry[Callable[..., nn.Module]] = Registry("head")
_COMMON_ARGS = ("feature_info", "out_channels", "channels", "output_size")
DENSE_HEADS = ("aspp", "dpt")  # the heads that output a map (what ``model.dense_head`` may name)


def conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int = 1, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """``Conv(bias=False) -> BN -> ReLU``: the foldable unit every head is built from."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@HEADS.register("aspp")
class ASPPHead(nn.Module):
    """DeepLabV3 head on the last feature: 1x1 + dilated 3x3 branches + image pooling.

    ``rates`` default to (2, 4, 6) rather than DeepLab's (6, 12, 18): taskfold trains at small
    resolutions where the last map is a few pixels wide, and a rate larger than the map only
    ever reads padding.
    """

    def __init__(
        self,
        feature_info: Sequence[FeatureInfo],
        out_channels: int,
        *,
        channels: int = 64,
        output_size: Sequence[int] = (64, 64),
        rates: Sequence[int] = (2, 4, 6),
    ) -> None:
        super().__init__()
        in_chs = feature_info[-1].num_chs
        self.feature_indices = [len(feature_info) - 1]
        self.output_size = tuple(output_size)
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_chs, channels, 1)] + [conv_bn_relu(in_chs, channels, 3, dilation=r) for r in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_chs, channels, 1))
        self.project = conv_bn_relu(channels * (len(rates) + 2), channels, 1)
        self.refine = conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        pooled = self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1])
        x = torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1)
        return _resize(self.classifier(self.refine(self.project(x))), self.output_size)


def _resample(channels: int, src: int, dst: int) -> nn.Module:
    """Bring a map from stride ``src`` to stride ``dst``: bilinear up, identity, or strided conv."""
    if dst > src:
        return conv_bn_relu(channels, channels, 3, stride=dst // src)
    if dst < src:
        return nn.Upsample(scale_factor=src // dst, mode="bilinear", align_corners=False)
    return nn.Identity()


@HEADS.register("dpt")
class DPTHead(nn.Module):
    """A light DPT head: reassemble 4 evenly spaced block outputs into a pyramid, fuse top-down.

    For ViT all block outputs share one stride R; they are resampled to R/4, R/2, R and 2R as in
    DPT. For a backbone whose chosen features already differ in stride, they keep their own.
    Each level is projected to ``channels`` by a 1x1 conv; the deepest level is upsampled and
    added to the next, then refined by a 3x3 conv, down to the finest level.
    """

    def __init__(
        self,
        feature_info: Sequence[FeatureInfo],
        out_channels: int,
        *,
        channels: int = 64,
        output_size: Sequence[int] = (64, 64),
    ) -> None:
        super().__init__()
        n = len(feature_info)
        if n < 4:
            raise ModelError(f"head 'dpt' needs at least 4 backbone blocks, got {n}")
        self.feature_indices = [(k + 1) * n // 4 - 1 for k in range(4)]
        picked = [feature_info[i] for i in self.feature_indices]
        strides = [info.reduction for info in picked]
        if len(set(strides)) == 1:
            base = strides[0]
            targets = [max(1, base // 4), max(1, base // 2), base, base * 2]
        else:
            targets = strides
        self.output_size = tuple(output_size)
        self.project = nn.ModuleList([conv_bn_relu(info.num_chs, channels, 1) for info in picked])
        self.resample = nn.ModuleList([_resample(channels, s, t) for s, t in zip(strides, targets)])
        self.fuse = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in range(3)])
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        levels = [
            resample(project(features[i]))
            for i, project, resample in zip(self.feature_indices, self.project, self.resample)
        ]
        x = levels[3]
        for level, fuse in zip(reversed(levels[:3]), self.fuse):
            x = fuse(_resize(x, level.shape[-2:]) + level)
        return _resize(self.classifier(x), self.output_size)


@HEADS.register("linear")
class LinearHead(nn.Module):
    """Global average pool of the last feature, then a linear layer (or an MLP if ``hidden``).

    ``channels`` and ``output_size`` are accepted for a uniform ``create_head`` call and unused.
    """

    def __init__(
        self,
        feature_info: Sequence[FeatureInfo],
        out_channels: int,
        *,
        channels: int = 64,
        output_size: Sequence[int] = (64, 64),
        hidden: int = 0,
    ) -> None:
        super().__init__()
        in_chs = feature_info[-1].num_chs
        self.feature_indices = [len(feature_info) - 1]
        if hidden > 0:
            self.mlp = nn.Sequential(
                nn.Linear(in_chs, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)
            )
            in_chs = hidden
        else:
            self.mlp = nn.Identity()
        self.fc = nn.Linear(in_chs, out_channels)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.fc(self.mlp(features[-1].mean(dim=(2, 3))))


def create_head(
    kind: str,
    feature_info: Sequence[FeatureInfo],
    out_channels: int,
    *,
    channels: int = 64,
    output_size: Sequence[int] = (64, 64),
    **options: Any,
) -> nn.Module:
    """Build head ``kind``; extra options: ``rates`` (aspp), ``hidden`` (linear)."""
    head_cls = HEADS.get(kind)
    known = [name for name in inspect.signature(head_cls).parameters if name not in _COMMON_ARGS]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ModelError(f"head {kind!r}: unknown option {unknown[0]!r} (known: {', '.join(known) or 'none'})")
    return head_cls(feature_info, out_channels, channels=channels, output_size=output_size, **options)


def default_head(feature_info: Sequence[FeatureInfo], output: str, dense_head: str | None = None) -> str:
    """The head kind for a task's ``output``: "global" -> linear; "dense" -> ``dense_head`` if given,
    else dpt or aspp.

    Chosen from what the backbone's blocks output, not its name: an isotropic backbone (every
    block at one stride, as a ViT's token blocks) has no coarse-to-fine pyramid for ASPP's last
    map, so DPT reassembles several of its blocks at different scales; a backbone whose stride
    grows (a CNN, dilated or not) gets ASPP on its last, most semantic map. A recipe overrides
    that with ``dense_head``: "dpt" on a CNN fuses its stride-4..32 pyramid top-down, which is
    what a small image needs when the last map is only a few pixels wide.
    """
    if output == "global":
        return "linear"
    if output == "dense":
        if dense_head is not None:
            if dense_head not in DENSE_HEADS:
                raise ModelError(f"dense head must be one of {', '.join(DENSE_HEADS)}, got {dense_head!r}")
            return dense_head
        isotropic = len({f.reduction for f in feature_info}) == 1
        return "dpt" if isotropic else "aspp"
    raise ModelError(f"unknown task output {output!r} (expected 'dense' or 'global')")
