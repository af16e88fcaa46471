"""Task losses and metrics against values worked out by hand, and the multi-task summaries."""
from __future__ import annotations

import math

import pytest
import torch

from taskfold.models.registry import UnknownNameError
from taskfold.trainer.config import ConfigError
from taskfold.trainer.data import DatasetInfo
from taskfold.trainer.tasks import TASKS, create_task, delta_m, norm_gain

torch.set_num_threads(1)

INFO = DatasetInfo(
    image_size=(4, 5), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    labels={
        "segmentation": {"classes": 4, "ignore_index": 255}, "normals": {}, "depth": {},
        "disparity": {}, "edges": {}, "saliency": {}, "classification": {"classes": 7},
        "attributes": {"attributes": 3},
    },
)


def _compute(task, pred, target) -> dict[str, float]:
    meter = task.new_meter()
    meter.update(pred, target)
    return meter.compute()


# ------------------------------------------------------------------------------------------------
# Hand-worked metric examples


def test_segmentation_miou_and_pixel_accuracy_by_hand():
    task = create_task("seg", "segmentation", INFO)
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    guess = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    pred = torch.nn.functional.one_hot(guess, 4).permute(0, 3, 1, 2).float()
    # 5 labelled pixels (the ignored one's guess does not count). Class 0: TP 1, FN 1 -> 1/2.
    # Class 1: TP 2, FP 1 -> 2/3. Class 2: TP 1 -> 1. Class 3 never occurs: left out.
    out = _compute(task, pred, target)
    assert out["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert out["pixel_acc"] == pytest.approx(4 / 5)
    assert task.out_channels == 4 and task.main_metric == "miou"


def test_segmentation_loss_is_cross_entropy_over_labelled_pixels():
    task = create_task("seg", "segmentation", INFO)
    pred = torch.zeros(1, 4, 1, 2)
    pred[0, 2, 0, 0] = math.log(3.0)  # softmax over (1, 1, 3, 1): p(class 2) = 3/6
    target = torch.tensor([[[2, 255]]])
    assert task.loss(pred, target).item() == pytest.approx(math.log(2.0), rel=1e-6)
    all_ignored = torch.full((1, 1, 2), 255)
    assert task.loss(pred, all_ignored).item() == 0.0


def _normals_at(angles_deg: list[float]) -> torch.Tensor:
    rad = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.sin(rad), torch.zeros_like(rad), torch.cos(rad)])  # (3, N)


def test_normals_angle_metrics_by_hand():
    task = create_task("n", "normals", INFO)
    angles = [0.0, 10.0, 29.0, 60.0, 90.0]
    pred = 3.0 * _normals_at(angles + [45.0])  # lengths other than 1 are normalised away
    target = torch.zeros(3, 6, dtype=torch.float64)
    target[2, :5] = 1.0  # the 6th pixel is invalid (zero normal)
    out = _compute(task, pred.float().view(1, 3, 2, 3), target.float().view(1, 3, 2, 3))
    assert out["mean"] == pytest.approx(189 / 5, abs=1e-4)
    assert out["median"] == pytest.approx(29.0, abs=1e-4)
    assert out["rmse"] == pytest.approx(math.sqrt((100 + 841 + 3600 + 8100) / 5), abs=1e-4)
    assert (out["within_11_25"], out["within_22_5"], out["within_30"]) == pytest.approx((0.4, 0.4, 0.6))
    # Loss: mean of 1 - cos over the 5 valid pixels.
    expected = sum(1 - math.cos(math.radians(a)) for a in angles) / 5
    loss = task.loss(pred.float().view(1, 3, 2, 3), target.float().view(1, 3, 2, 3))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_normals_loss_and_gradient_match_the_normalize_formula():
    """The channel-sum cosine equals F.normalize's, value and gradient, incl. tiny and zero vectors."""
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    pred[0, :, 0, 0] = 0.0  # a zero prediction: both formulas clamp its length at eps
    pred[0, :, 0, 1] = 1e-14
    target = torch.nn.functional.normalize(torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64), dim=1)
    target[1, :, 2] = 0.0  # an unlabelled row
    target[1, 0, 3, 3], target[1, 1:, 3, 3] = 1e-30, 0.0  # tiny but labelled: still valid
    task = create_task("n", "normals", INFO)
    new_pred = pred.clone().requires_grad_()
    new_loss = task.loss(new_pred, target)
    new_loss.backward()
    old_pred = pred.clone().requires_grad_()
    valid = target.norm(dim=1) > 0
    cos = (torch.nn.functional.normalize(old_pred, dim=1) * torch.nn.functional.normalize(target, dim=1)).sum(1)
    old_loss = torch.where(valid, 1.0 - cos, torch.zeros_like(cos)).sum() / valid.sum()
    old_loss.backward()
    assert int(valid.sum()) == 2 * 5 * 7 - 7
    assert new_loss.item() == pytest.approx(old_loss.item(), rel=1e-12)
    torch.testing.assert_close(new_pred.grad, old_pred.grad, rtol=1e-9, atol=1e-12)
    # The meter keeps exactly the valid pixels' angles, as the old formula computes them.
    angles = torch.rad2deg(torch.acos(cos.detach()[valid].clamp(-1.0, 1.0)))
    out = _compute(task, pred.float(), target.float())
    assert out["mean"] == pytest.approx(angles.mean().item(), abs=1e-4)
    assert out["median"] == pytest.approx(angles.median().item(), abs=0.5)


DEPTH_TARGET = torch.tensor([1.0, 2.0, 4.0, 5.0, 0.0]).view(1, 1, 1, 5)
DEPTH_PRED = torch.tensor([1.1, 2.4, 3.0, 5.0, 9.0]).view(1, 1, 1, 5)


def test_depth_metrics_and_l1_loss_by_hand():
    task = create_task("d", "depth", INFO)
    out = _compute(task, DEPTH_PRED, DEPTH_TARGET)
    # errors on the 4 valid pixels: 0.1, 0.4, -1.0, 0.0; the depth-0 pixel is ignored.
    assert out["rmse"] == pytest.approx(math.sqrt((0.01 + 0.16 + 1.0) / 4), rel=1e-6)
    assert out["abs_rel"] == pytest.approx((0.1 / 1 + 0.4 / 2 + 1.0 / 4) / 4, rel=1e-6)
    assert out["delta1"] == pytest.approx(3 / 4)  # ratios 1.1, 1.2, 1.33, 1.0
    assert task.loss(DEPTH_PRED, DEPTH_TARGET).item() == pytest.approx(1.5 / 4, rel=1e-6)


def test_ssi_loss_vanishes_for_a_scaled_and_shifted_depth():
    task = create_task("d", "depth", INFO, loss="ssi")
    pred = 0.5 * DEPTH_TARGET - 2.0
    pred[..., 4] = 123.0  # invalid pixel: must not affect the alignment
    pred = pred.clone().requires_grad_(True)
    loss = task.loss(pred, DEPTH_TARGET)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    out = _compute(task, pred.detach(), DEPTH_TARGET)  # scored after the same alignment
    assert out["rmse"] == pytest.approx(0.0, abs=1e-9) and out["delta1"] == 1.0


def test_ssi_loss_by_hand_for_a_non_affine_prediction():
    # Least-squares fit of the label (1, 2, 2) by s * (0, 1, 2) + t: s = cov/var = 1/2, t = 5/3 - 1/2
    # = 7/6; aligned (7/6, 5/3, 13/6), residuals (1/6, -1/3, 1/6): sum of squares 1/6; loss = (1/6)/(2*3).
    task = create_task("d", "depth", INFO, loss="ssi")
    pred = torch.tensor([0.0, 1.0, 2.0]).view(1, 1, 1, 3)
    target = torch.tensor([1.0, 2.0, 2.0]).view(1, 1, 1, 3)
    assert task.loss(pred, target).item() == pytest.approx(1 / 36, rel=1e-5)
    constant = torch.full((1, 1, 1, 3), 7.0, requires_grad=True)
    loss = task.loss(constant, target)  # no scale can be fitted: s = 0, t = mean label
    loss.backward()
    assert loss.item() == pytest.approx(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 6, rel=1e-5)
    assert torch.isfinite(constant.grad).all()


def test_disparity_mse_and_abs_error_by_hand():
    task = create_task("disp", "disparity", INFO)
    pred = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 1, 3)
    target = torch.tensor([1.5, 2.0, 0.0]).view(1, 1, 1, 3)
    assert task.loss(pred, target).item() == pytest.approx(0.25 / 2)
    assert _compute(task, pred, target)["abs_err"] == pytest.approx(0.25)


def test_edge_f_score_from_known_counts():
    task = create_task("e", "edges", INFO)
    target = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 3)
    pred = torch.tensor([2.0, -1.0, 3.0, 1.0, -2.0, -3.0]).view(1, 1, 2, 3)
    # sigmoid > 0.5 where the logit > 0: TP 2 (pixels 0, 2), FN 1 (pixel 1), FP 1 (pixel 3).
    assert _compute(task, pred, target)["f_score"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_edge_loss_weights_positives_by_pos_weight():
    task = create_task("e", "edges", INFO, pos_weight=0.8)
    pred = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)  # p = 1/2, 3/4
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    expected = (0.8 * -math.log(0.5) + 0.2 * -math.log(1 - 0.75)) / 2
    assert task.loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_saliency_max_f_iou_and_balanced_loss_by_hand():
    task = create_task("s", "saliency", INFO, thresholds=[0.25, 0.5, 0.75])
    probs = torch.tensor([0.9, 0.6, 0.3, 0.7, 0.1])
    pred = torch.logit(probs).view(1, 1, 1, 5)
    target = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 5)
    # t=.25: TP3 FP1 FN0 -> F 6/7, IoU 3/4; t=.5: TP2 FP1 FN1 -> F 2/3, IoU 1/2; t=.75: F 1/2, IoU 1/3
    out = _compute(task, pred, target)
    assert out["max_f"] == pytest.approx(6 / 7) and out["iou"] == pytest.approx(3 / 4)
    # Balanced BCE: 3 of 4 pixels negative -> positives weigh 3/4, negatives 1/4.
    logits = torch.zeros(1, 1, 1, 4)
    balanced = task.loss(logits, torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4))
    assert balanced.item() == pytest.approx((0.75 + 3 * 0.25) * math.log(2) / 4, rel=1e-6)


def test_classification_top1_top5_by_hand():
    task = create_task("cls", "classification", INFO)
    pred = torch.tensor([
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 0 is the best guess: top-1 and top-5
        [1.0, 9.0, 8.0, 3.0, 4.0, 5.0, 6.0],  # label 2 ranks 2nd: top-5 only
        [0.0, 9.0, 8.0, 3.0, 4.0, 5.0, 6.0],  # label 0 ranks last: neither
    ])
    out = _compute(task, pred, torch.tensor([0, 2, 0]))
    assert out == pytest.approx({"top1": 1 / 3, "top5": 2 / 3})
    assert task.loss(torch.zeros(2, 7), torch.tensor([3, 4])).item() == pytest.approx(math.log(7))


def test_top5_is_omitted_with_five_or_fewer_classes():
    info = DatasetInfo((4, 4), (0, 0, 0), (1, 1, 1), {"classification": {"classes": 5}})
    task = create_task("cls", "classification", info)
    assert task.metrics == {"top1": True}
    assert set(_compute(task, torch.randn(3, 5), torch.tensor([0, 1, 2]))) == {"top1"}


def test_classification_l2_to_soft_labels():
    task = create_task("cls", "classification", INFO, loss="l2")
    soft = torch.tensor([[0.5, 0.5, 0, 0, 0, 0, 0]])
    # uniform softmax (1/7 each): (1/2 - 1/7)^2 * 2 + (1/7)^2 * 5
    expected = 2 * (0.5 - 1 / 7) ** 2 + 5 * (1 / 7) ** 2
    assert task.loss(torch.zeros(1, 7), soft).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss, soft", [("ce", False), ("ce", True), ("l2", False), ("l2", True)])
def test_classification_copy_losses_equal_one_loss_call_per_copy(loss, soft):
    """DMTG's batched scoring of K head copies against one label is K separate losses."""
    torch.manual_seed(0)
    task = create_task("cls", "classification", INFO, loss=loss)
    preds = torch.randn(3, 5, 7)
    target = torch.softmax(torch.randn(5, 7), dim=1) if soft else torch.randint(0, 7, (5,))
    expected = torch.stack([task.loss(p, target) for p in preds])
    assert torch.allclose(task.copy_losses(preds, target), expected, atol=1e-6)


def test_attributes_error_and_column_selection():
    task = create_task("attr", "attributes", INFO, select=[0, 2])
    assert task.out_channels == 2 and task.output == "global"
    target = torch.tensor([[1, 0, 1], [0, 1, 1]])
    pred = torch.tensor([[2.0, 1.0], [1.0, 3.0]])  # columns 0 and 2 are [[1, 1], [0, 1]]: wrong at (1, 0)
    assert _compute(task, pred, target)["error"] == pytest.approx(1 / 4)
    zero = task.loss(torch.zeros(2, 2), target)
    assert zero.item() == pytest.approx(math.log(2))


# ------------------------------------------------------------------------------------------------
# Every registered kind: batch-invariant meters, finite gradients, declared metrics


def _random_batch(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = 4, 5
    if kind == "segmentation":
        target = torch.randint(0, 4, (n, h, w), generator=gen)
        target[:, 0, 0] = 255
        return torch.randn(n, 4, h, w, generator=gen), target
    if kind == "normals":
        target = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=gen), dim=1)
        target[:, :, 0, :] = 0.0
        return torch.randn(n, 3, h, w, generator=gen), target
    if kind in ("depth", "disparity"):
        target = torch.rand(n, 1, h, w, generator=gen) * 5
        target[:, :, 0, 0] = 0.0
        return torch.rand(n, 1, h, w, generator=gen) * 5 + 0.1, target
    if kind in ("edges", "saliency"):
        return torch.randn(n, 1, h, w, generator=gen), (torch.rand(n, 1, h, w, generator=gen) > 0.7).float()
    if kind == "classification":
        return torch.randn(n, 7, generator=gen), torch.randint(0, 7, (n,), generator=gen)
    if kind == "attributes":
        return torch.randn(n, 3, generator=gen), torch.randint(0, 2, (n, 3), generator=gen)
    if kind == "regression":  # reads the 1-channel depth label (OPTIONS)
        return torch.randn(n, 1, h, w, generator=gen), torch.randn(n, 1, h, w, generator=gen)
    raise AssertionError(f"no test data for task kind {kind!r}: add it here")


OPTIONS = {"depth": [{}, {"loss": "ssi"}], "classification": [{}, {"loss": "l2"}],
           "regression": [{"target": "depth"}]}
CASES = [(kind, opts) for kind in TASKS.names() for opts in OPTIONS.get(kind, [{}])]


@pytest.mark.parametrize(("kind", "options"), CASES)
def test_meter_over_batches_equals_one_big_batch(kind, options):
    task = create_task("t", kind, INFO, **options)
    gen = torch.Generator().manual_seed(0)
    pred, target = _random_batch(kind, 6, gen)
    split = task.new_meter()
    for part in (slice(0, 2), slice(2, 3), slice(3, 6)):
        split.update(pred[part], target[part])
    whole = _compute(task, pred, target)
    assert set(whole) == set(task.metrics) and task.main_metric in task.metrics
    assert split.compute() == pytest.approx(whole, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("kind", "options"), CASES)
def test_loss_is_a_scalar_with_finite_gradients(kind, options):
    task = create_task("t", kind, INFO, **options)
    pred, target = _random_batch(kind, 3, torch.Generator().manual_seed(1))
    pred.requires_grad_(True)
    loss = task.loss(pred, target)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    expected_channels = pred.shape[1]
    assert task.out_channels == expected_channels
    assert task.output == ("dense" if pred.ndim == 4 else "global")


def test_an_empty_meter_reports_nan_not_a_crash():
    out = create_task("d", "depth", INFO).new_meter().compute()
    assert all(math.isnan(v) for v in out.values()) and set(out) == {"rmse", "abs_rel", "delta1"}


# ------------------------------------------------------------------------------------------------
# Option validation


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match=r"tasks\.seg\.foo"):
        create_task("seg", "segmentation", INFO, foo=1)


def test_missing_label_lists_what_the_dataset_has():
    info = DatasetInfo((4, 4), (0, 0, 0), (1, 1, 1), {"depth": {}, "edges": {}})
    message = r"task 'seg': dataset has no label 'segmentation' \(it has: depth, edges\)"
    with pytest.raises(ConfigError, match=message):
        create_task("seg", "segmentation", info)


def test_target_option_reads_another_label_key():
    info = DatasetInfo((4, 4), (0, 0, 0), (1, 1, 1), {"parts": {"classes": 7, "ignore_index": 255}})
    task = create_task("parts", "segmentation", info, target="parts")
    assert task.target == "parts" and task.out_channels == 7


@pytest.mark.parametrize(("kind", "options", "pattern"), [
    ("depth", {"loss": "l3"}, r"tasks\.t\.loss: expected one of l1, ssi"),
    ("edges", {"pos_weight": 1.5}, r"tasks\.t\.pos_weight: must be in \(0, 1\)"),
    ("edges", {"pos_weight": "lots"}, r"tasks\.t\.pos_weight: expected a number"),
    ("attributes", {"select": [3]}, r"tasks\.t\.select: expected column indices in 0\.\.2"),
    ("saliency", {"thresholds": []}, r"tasks\.t\.thresholds"),
])
def test_bad_option_values_are_config_errors(kind, options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        create_task("t", kind, INFO, **options)


def test_label_without_class_count_and_unknown_kind():
    info = DatasetInfo((4, 4), (0, 0, 0), (1, 1, 1), {"segmentation": {}})
    with pytest.raises(ConfigError, match=r"labels\['segmentation'\]\['classes'\]"):
        create_task("seg", "segmentation", info)
    with pytest.raises(UnknownNameError, match="did you mean 'segmentation'"):
        create_task("seg", "segmentaton", INFO)


# ------------------------------------------------------------------------------------------------
# Multi-task summaries


def test_delta_m_by_hand_signs_each_metric_by_direction():
    results = {"seg": {"miou": 0.44}, "depth": {"rmse": 0.45}}
    baselines = {"seg": {"miou": 0.40}, "depth": {"rmse": 0.50}}
    directions = {"seg": {"miou": True}, "depth": {"rmse": False}}
    # seg +10 % (higher is better), depth rmse -10 % -> +10 % improvement; mean +10 %.
    assert delta_m(results, baselines, directions) == pytest.approx(10.0)
    worse = {"seg": {"miou": 0.38}, "depth": {"rmse": 0.60}}  # -5 % and -20 %
    assert delta_m(worse, baselines, directions) == pytest.approx(-12.5)


def test_delta_m_reproduces_a_published_value():
    # IAL paper, Table III (PASCAL-Context), "Uniform" against "Single task": ΔMTL = -3.26 %.
    single = {"seg": 66.2, "parts": 59.4, "normals": 13.9, "sal": 66.3, "edge": 68.8}
    uniform = {"seg": 64.0, "parts": 58.5, "normals": 15.0, "sal": 64.8, "edge": 67.9}
    higher = {"seg": True, "parts": True, "normals": False, "sal": True, "edge": True}
    value = delta_m({t: {"m": v} for t, v in uniform.items()}, {t: {"m": v} for t, v in single.items()},
                    {t: {"m": h} for t, h in higher.items()})
    assert value == pytest.approx(-3.26, abs=0.005)


def test_norm_gain_by_hand_and_against_the_dmtg_paper():
    assert norm_gain({"a": 0.5, "b": 3.0}, {"a": 1.0, "b": 2.0}) == pytest.approx((50.0 - 50.0) / 2)
    assert norm_gain({"a": 0.5}, {"a": 2.0}) == pytest.approx(75.0)
    # DMTG Table 2 (Taskonomy-5 losses), STL against naive MTL: NormGain_L = +57.35 % (the paper
    # averaged unrounded losses, so the rounded table values land within 0.05).
    naive = {"depth": 8.67e-3, "normal": 1.07e-1, "seg": 8.28e-2, "keypoint": 1.19e-2, "edge": 1.31e-2}
    stl = {"depth": 1.60e-5, "normal": 1.07e-1, "seg": 9.16e-2, "keypoint": 1.30e-4, "edge": 1.56e-4}
    assert norm_gain(stl, naive) == pytest.approx(57.35, abs=0.05)


def test_summaries_refuse_missing_or_zero_references():
    with pytest.raises(ValueError, match="no baseline"):
        delta_m({"seg": {"miou": 0.5}}, {}, {"seg": {"miou": True}})
    with pytest.raises(ValueError, match="non-zero"):
        norm_gain({"a": 1.0}, {"a": 0.0})
    with pytest.raises(ValueError, match="naive-MTL value for task 'b'"):
        norm_gain({"b": 1.0}, {"a": 1.0})
