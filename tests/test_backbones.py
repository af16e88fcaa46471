"""Backbone adapter: every registered backbone gets the same block/feature/stage checks (timm style)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from conftest import cached_backbones
from safetensors.torch import save_file

from taskfold.models.backbones import BACKBONES, create_backbone
from taskfold.models.errors import ModelError
from taskfold.models.registry import UnknownNameError

torch.set_num_threads(1)

IMG = 64
SMALL = ["resnet10", "mobilenetv2_100", "vit_tiny_patch16_224"]
_backbone = cached_backbones(IMG)


def _image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", BACKBONES.names())
def test_features_match_feature_info_and_blocks_compose(name: str) -> None:
    backbone = _backbone(name)
    x = _image(1)
    with torch.no_grad():
        features = backbone.forward_features(x)
        assert len(features) == len(backbone.blocks) == len(backbone.feature_info)
        for feature, info in zip(features, backbone.feature_info):
            assert feature.shape == (1, info.num_chs, IMG // info.reduction, IMG // info.reduction)
        # the searchable networks run blocks one at a time: that must equal the whole backbone
        y = backbone.stem(x)
        for block, feature in zip(backbone.blocks, features):
            y = block(y)
            torch.testing.assert_close(y, feature, rtol=0, atol=0)
        torch.testing.assert_close(backbone(x), features[-1], rtol=0, atol=0)
    assert backbone.name == name
    assert backbone.num_features == backbone.feature_info[-1].num_chs


@pytest.mark.parametrize("name", BACKBONES.names())
def test_stages_partition_blocks_where_stride_changes(name: str) -> None:
    backbone = _backbone(name)
    info = backbone.feature_info
    assert [i for stage in backbone.stages for i in stage] == list(range(len(backbone.blocks)))
    assert all(stage for stage in backbone.stages)
    for s, stage in enumerate(backbone.stages):
        assert {info[i].stage for i in stage} == {s}
        assert len({info[i].reduction for i in stage}) == 1, "a stage never changes stride"
    reductions = [info[stage[0]].reduction for stage in backbone.stages]
    if len(set(reductions)) == 1:  # ViT: no stride change, groups of three blocks
        assert [len(stage) for stage in backbone.stages] == [3] * (len(backbone.blocks) // 3)
    else:
        assert reductions == sorted(set(reductions)), "each stage ends where the stride changes"


def test_known_layouts() -> None:
    assert [len(s) for s in _backbone("resnet18").stages] == [2, 2, 2, 2]
    assert [len(s) for s in _backbone("resnet50").stages] == [3, 4, 6, 3]
    vgg = _backbone("vgg16_bn")
    assert [len(s) for s in vgg.stages] == [2, 2, 3, 3, 3]
    assert vgg.feature_info[2].module == "features.9" and "pool" in dict(vgg.blocks[2].named_children())
    mbv2 = _backbone("mobilenetv2_100")
    assert len(mbv2.blocks) == 17 and mbv2.num_features == 320  # conv_head dropped
    assert _backbone("resnet10").feature_info[-1].reduction == 32


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100"])
def test_output_stride_dilates_without_moving_stages(name: str) -> None:
    native = _backbone(name)
    dilated = create_backbone(name, img_size=IMG, output_stride=8)
    assert dilated.feature_info[-1].reduction == 8
    assert dilated.stages == native.stages
    assert [f.num_chs for f in dilated.feature_info] == [f.num_chs for f in native.feature_info]


@pytest.mark.parametrize("name", SMALL)
def test_deepcopy_gives_identical_outputs(name: str) -> None:
    backbone = _backbone(name)
    clone = copy.deepcopy(backbone)
    block_clone = copy.deepcopy(backbone.blocks[-1])
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), backbone(x), rtol=0, atol=0)
        features = backbone.forward_features(x)
        torch.testing.assert_close(block_clone(features[-2]), features[-1], rtol=0, atol=0)
    assert all(a is not b for a, b in zip(clone.parameters(), backbone.parameters()))


@pytest.mark.parametrize("name", SMALL)
def test_weights_round_trip_through_safetensors(name: str, tmp_path: Path) -> None:
    source = _backbone(name)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(123)  # a different random init, so equality proves the load
    loaded = create_backbone(name, img_size=IMG, weights=path).eval()
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_timm_keyed_state_dict_loads_and_classifier_keys_are_ignored(tmp_path: Path) -> None:
    torch.manual_seed(7)
    model = timm.create_model("resnet18", pretrained=False, layers=(1, 1, 1, 1), num_classes=10).eval()
    path = tmp_path / "timm.pt"
    torch.save(model.state_dict(), path)  # includes fc.weight / fc.bias
    backbone = create_backbone("resnet10", img_size=IMG, weights=path).eval()
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model.forward_features(x), rtol=0, atol=0)


def test_vit_checkpoint_with_class_token_at_224_is_resampled(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), path)
    backbone = create_backbone("vit_tiny_patch16_224", img_size=IMG, weights=path)
    assert backbone.stem.pos_embed.shape == (1, 16, 192)
    torch.testing.assert_close(backbone.blocks[0].block.attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(backbone.blocks[-1].norm.weight, model.norm.weight)


def test_vit_timm_keys_match_timm_forward(tmp_path: Path) -> None:
    kwargs = dict(img_size=IMG, class_token=False, global_pool="avg", fc_norm=False, num_classes=0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = create_backbone("vit_tiny_patch16_224", img_size=IMG, weights=path).eval()
    x = _image()
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(backbone(x).flatten(2).transpose(1, 2), tokens, rtol=1e-5, atol=1e-5)


def test_bad_weights_files_raise_one_line_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        create_backbone("resnet10", weights=tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot be read"):
        create_backbone("resnet10", weights=garbage)
    state = {k: v.contiguous() for k, v in _backbone("resnet10").state_dict().items()}
    del state["blocks.0.conv1.weight"]
    state["blocks.1.bn1.weight"] = torch.zeros(3)
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ModelError) as info:
        create_backbone("resnet10", weights=bad)
    message = str(info.value)
    assert "\n" not in message
    assert "1 missing keys, e.g. blocks.0.conv1.weight" in message
    assert "1 unexpected keys, e.g. extra.weight" in message
    assert "blocks.1.bn1.weight (3,) vs (128,)" in message


def test_bad_names_and_options() -> None:
    with pytest.raises(UnknownNameError, match="resnet18"):
        create_backbone("resnet19")
    with pytest.raises(ModelError, match="'drop_rate'"):
        create_backbone("resnet10", drop_rate=0.1)
    with pytest.raises(ModelError, match="output_stride"):
        create_backbone("resnet10", output_stride=4)
    with pytest.raises(ModelError, match="output_stride=8 is not supported"):
        create_backbone("vit_tiny_patch16_224", output_stride=8)
    assert create_backbone("vit_tiny_patch16_224", output_stride=16).feature_info[-1].reduction == 16
