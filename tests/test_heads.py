"""Task heads: output shapes on CNN and ViT features, foldable Conv/BN pairs, ONNX export."""
from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import cached_backbones
from torch import nn

from taskfold.models.backbones import Backbone, create_backbone
from taskfold.models.errors import ModelError
from taskfold.models.layers.heads import DENSE_HEADS, HEADS, create_head, default_head
from taskfold.models.registry import UnknownNameError
from taskfold.trainer.config import ModelConfig

torch.set_num_threads(1)

IMG = 64
_backbone = cached_backbones(IMG)


def _features(name: str, batch: int = 2) -> list[torch.Tensor]:
    x = torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return _backbone(name).forward_features(x)


@pytest.mark.parametrize("backbone", ["resnet10", "resnet18", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("kind", HEADS.names())
def test_head_output_shapes_and_gradients(kind: str, backbone: str) -> None:
    info = _backbone(backbone).feature_info
    head = create_head(kind, info, 5, channels=16, output_size=(IMG, 48))
    features = [f.requires_grad_() for f in _features(backbone)]
    out = head(features)
    expected = (2, 5) if kind == "linear" else (2, 5, IMG, 48)
    assert out.shape == expected
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert features[-1].grad is not None and features[-1].grad.abs().sum() > 0


def test_dpt_reassembles_vit_features_into_a_pyramid() -> None:
    head = create_head("dpt", _backbone("vit_tiny_patch16_224").feature_info, 3, channels=8)
    assert head.feature_indices == [2, 5, 8, 11]  # blocks 3, 6, 9, 12 as in DPT
    levels = [
        resample(project(f))
        for f, project, resample in zip(
            [_features("vit_tiny_patch16_224")[i] for i in head.feature_indices], head.project, head.resample
        )
    ]
    assert [level.shape[-1] for level in levels] == [IMG // 4, IMG // 8, IMG // 16, IMG // 32]


def test_every_batchnorm_follows_a_bias_free_conv_or_linear() -> None:
    """The compiler folds BN into the preceding layer: each BN must have a clean, single producer."""
    info = _backbone("resnet10").feature_info
    heads = [create_head(kind, info, 4) for kind in HEADS.names()] + [create_head("linear", info, 4, hidden=32)]
    pairs = 0
    for head in heads:
        for seq in head.modules():
            if not isinstance(seq, nn.Sequential):
                continue
            layers = list(seq)
            for prev, layer in zip(layers, layers[1:]):
                if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    assert isinstance(prev, (nn.Conv2d, nn.Linear)) and prev.bias is None
                    pairs += 1
    total = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for h in heads for m in h.modules())
    assert pairs == total > 0


def test_aspp_in_eval_is_per_sample_even_for_a_batch_of_one() -> None:
    """The image-pooling branch normalises a 1x1 map: in eval each image's output is its own."""
    info = _backbone("resnet18").feature_info
    head = create_head("aspp", info, 2, channels=8)
    head(_features("resnet18", batch=4))  # one training step's worth of running statistics
    head.eval()
    features = _features("resnet18", batch=2)
    with torch.no_grad():
        both = head(features)
        first = head([f[:1] for f in features])
    torch.testing.assert_close(first, both[:1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_head_options_and_defaults() -> None:
    info = _backbone("resnet10").feature_info
    aspp = create_head("aspp", info, 3, rates=(1, 3))
    assert len(aspp.branches) == 3 and aspp.branches[2][0].dilation == (3, 3)
    with pytest.raises(ModelError, match="unknown option 'depth'.*rates"):
        create_head("aspp", info, 3, depth=2)
    with pytest.raises(UnknownNameError, match="aspp"):
        create_head("apsp", info, 3)
    with pytest.raises(ModelError, match="at least 4"):
        create_head("dpt", info[:3], 3)
    with pytest.raises(ModelError, match="'pixel'"):
        default_head(info, "pixel")


def test_default_head_follows_feature_layout_not_name() -> None:
    # DeiT is a ViT that timm does not name vit*: its blocks all sit at stride 16, so it gets DPT
    from taskfold.models.backbones import _VIT, _create
    deit = _create("deit_tiny_patch16_224", _VIT, img_size=32)
    assert {f.reduction for f in deit.feature_info} == {16}
    assert default_head(deit.feature_info, "dense") == "dpt"
    assert default_head(deit.feature_info, "global") == "linear"
    for cnn in (_backbone("resnet10"), create_backbone("resnet10", img_size=32, output_stride=8)):
        assert default_head(cnn.feature_info, "dense") == "aspp"   # stride grows: ASPP on the last map


def test_a_recipe_may_put_dpt_on_a_cnn_to_read_its_fine_features() -> None:
    info = _backbone("resnet10").feature_info
    assert default_head(info, "dense", "dpt") == "dpt"
    assert default_head(info, "global", "dpt") == "linear"   # the choice is for dense tasks only
    head = create_head("dpt", info, 3, channels=8)
    # one block per ResNet-10 stage: the head fuses the stride-4, 8, 16 and 32 maps, not the last only
    assert [info[i].reduction for i in head.feature_indices] == [4, 8, 16, 32]
    with pytest.raises(ModelError, match="dense head must be one of aspp, dpt, got 'linear'"):
        default_head(info, "dense", "linear")
    # the recipe field offers exactly the heads that output a map
    literal, _none = typing.get_args(typing.get_type_hints(ModelConfig)["dense_head"])
    assert set(typing.get_args(literal)) == set(DENSE_HEADS) == {k for k in HEADS.names() if k != "linear"}


class _Net(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))


@pytest.mark.parametrize(("backbone", "kind"), [
    pytest.param("resnet10", "aspp", marks=pytest.mark.slow), ("resnet10", "dpt"), pytest.param("vit_tiny_patch16_224", "dpt", marks=pytest.mark.slow)])
def test_onnx_export_matches_torch(backbone: str, kind: str, tmp_path: Path) -> None:
    model = _backbone(backbone)
    net = _Net(model, create_head(kind, model.feature_info, 3, channels=16, output_size=(IMG, IMG))).eval()
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        net, (x,), str(path), input_names=["image"], output_names=["out"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        (got,) = session.run(None, {"image": x[:batch].numpy()})
        with torch.no_grad():
            want = net(x[:batch]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
