"""BatchNorm folding: folded models compute what the originals compute, and unfoldable BNs stay."""
from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn

from taskfold.compiler.fold import fold_batchnorm, remaining_batchnorms

torch.set_num_threads(1)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial affine parameters and running stats, then switch to eval."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=gen))
                m.bias.data.copy_(torch.randn(n, generator=gen))
    return model.eval()


def _assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor, rtol: float) -> None:
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    scale = ya.abs().max().item()
    assert (ya - yb).abs().max().item() <= rtol * scale, ((ya - yb).abs().max().item(), scale)


def test_sequential_conv_bn_relu_matches_and_removes_every_bn() -> None:
    model = _randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, groups=2, bias=True), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 14 * 14, 5), nn.BatchNorm1d(5),
    ))
    folded, count = fold_batchnorm(model)
    assert count == 3
    assert remaining_batchnorms(folded) == []
    assert [type(m) for m in folded if isinstance(m, nn.Identity)] == [nn.Identity] * 3
    _assert_same_outputs(model, folded, torch.randn(4, 3, 16, 16), rtol=1e-5)
    # The input model is untouched: still has its BNs and its conv has no bias.
    assert len(remaining_batchnorms(model)) == 3 and model[0].bias is None


def test_folded_weight_is_the_closed_form() -> None:
    """Check the arithmetic itself against w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    conv, bn = nn.Conv1d(2, 3, 1, bias=True), nn.BatchNorm1d(3, eps=1e-3)
    model = _randomise_bn(nn.Sequential(conv, bn))
    folded, count = fold_batchnorm(model)
    assert count == 1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded[0].weight, conv.weight * scale[:, None, None])
    torch.testing.assert_close(folded[0].bias, (conv.bias - bn.running_mean) * scale + bn.bias)


def _timm_with_trained_stats(name: str) -> nn.Module:
    """A timm model whose BN statistics come from real (train-mode) forwards, not defaults."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=7)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    return model.eval()


def test_timm_resnet18_folds_every_bn() -> None:
    model = _timm_with_trained_stats("resnet18")
    n_bn = len(remaining_batchnorms(model))
    folded, count = fold_batchnorm(model)
    assert count == n_bn == 20
    assert remaining_batchnorms(folded) == []
    _assert_same_outputs(model, folded, torch.randn(2, 3, 64, 64), rtol=1e-4)


def test_timm_mobilenetv2_keeps_the_activation_of_batchnormact() -> None:
    model = _timm_with_trained_stats("mobilenetv2_100")
    folded, count = fold_batchnorm(model)
    assert count == 52
    assert remaining_batchnorms(folded) == []
    # BatchNormAct2d(ReLU6) became the activation alone.
    assert isinstance(folded.bn1, nn.Sequential) and isinstance(folded.bn1[1], nn.ReLU6)
    _assert_same_outputs(model, folded, torch.randn(2, 3, 64, 64), rtol=1e-4)


def test_torchvision_mobilenet_v2_folds_every_bn() -> None:
    model = _randomise_bn(torchvision.models.mobilenet_v2(weights=None, num_classes=5))
    folded, count = fold_batchnorm(model)
    assert count == 52 and remaining_batchnorms(folded) == []
    _assert_same_outputs(model, folded, torch.randn(2, 3, 32, 32), rtol=1e-4)


class _BnAfterAdd(nn.Module):
    """Two convs summed, then BN: the BN's input is no single conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.a(x) + self.b(x))))


class _ConvWithTwoUsers(nn.Module):
    """The conv's output feeds the BN and a residual: folding would change the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _SharedConv(nn.Module):
    """One conv called twice, once before a BN: the second call must keep the raw weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


def test_bns_that_cannot_be_folded_stay_and_outputs_match() -> None:
    x = torch.randn(2, 3, 8, 8)
    for module, expect_folded, expect_left in [
        (_BnAfterAdd(), 1, ["bn"]),
        (_ConvWithTwoUsers(), 0, ["bn"]),
        (_SharedConv(), 0, ["bn"]),
    ]:
        model = _randomise_bn(module)
        folded, count = fold_batchnorm(model)
        assert count == expect_folded, type(module).__name__
        assert remaining_batchnorms(folded) == expect_left
        _assert_same_outputs(model, folded, x, rtol=1e-5)


class _Untraceable(nn.Module):
    """Data-dependent control flow at the top breaks fx tracing; the blocks inside are plain."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block1(x)
        return self.block2(y) if y.mean() > 0 else -self.block2(y)


def test_untraceable_model_is_folded_child_by_child() -> None:
    model = _randomise_bn(_Untraceable())
    folded, count = fold_batchnorm(model)
    assert count == 2 and remaining_batchnorms(folded) == []
    _assert_same_outputs(model, folded, torch.randn(2, 3, 12, 12), rtol=1e-5)
