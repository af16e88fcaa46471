"""Binary tasks on logits: edges and saliency (dense), binary attributes (global).

Positives are rare in edge and saliency maps, so both weight the positive term of the BCE; the
weight is the *share* of the loss given to positives (Maninis et al. 2019; Vandenhende et al.
2021), see :func:`weighted_bce`. A dense label may mark unlabelled pixels with the dataset's
``ignore_index`` (e.g. PASCAL-Context's 255); those pixels are skipped by losses and metrics.

Edge F-score is pixel-exact at one threshold, with TP/FP/FN pooled over the split ("ODS": one
threshold for the whole dataset). The BSDS protocol additionally matches predicted and true edge
pixels within a distance tolerance; that is not done here, so scores are lower than published ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from taskfold.trainer.tasks.base import (
    TASKS, SummedMeter, Task, check_shapes, label_count, option_error, weighted_bce,
)

_NAN = float("nan")


def _valid(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _f_score(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """F1 = 2TP / (2TP + FP + FN) (the harmonic mean of precision and recall); 0 when undefined."""
    denominator = 2 * tp + fp + fn
    return torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(denominator))


@TASKS.register("edges")
class EdgesTask(Task):
    """pred ``(B, 1, H, W)`` logits; label ``(B, 1, H, W)`` in {0, 1}.

    Loss: weighted BCE with ``pos_weight`` (default 0.95, the multi-task literature's value for
    PASCAL-Context edges) on positives and ``1 - pos_weight`` on negatives. Metric: F-score of
    ``sigmoid(pred) > threshold`` (default 0.5).
    """

    kind = "edges"

    @dataclass
    class Options:
        target: str | None = None
        pos_weight: float = 0.95
        threshold: float = 0.5

    def __init__(self, name: str, target: str, label_info: dict, options: Options) -> None:
        super().__init__(name, target, output="dense", out_channels=1,
                         metrics={"f_score": True}, main_metric="f_score")
        for field_name in ("pos_weight", "threshold"):
            if not 0.0 < getattr(options, field_name) < 1.0:
                raise option_error(name, field_name, f"must be in (0, 1), got {getattr(options, field_name)}")
        self.pos_weight = options.pos_weight
        self.threshold = options.threshold
        self.ignore_index = label_info.get("ignore_index")

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_shapes(self.name, pred, target)
        return weighted_bce(pred, target, _valid(target, self.ignore_index), self.pos_weight)

    def new_meter(self) -> EdgeMeter:
        return EdgeMeter([self.threshold], self.ignore_index)


@TASKS.register("saliency")
class SaliencyTask(Task):
    """pred ``(B, 1, H, W)`` logits; label ``(B, 1, H, W)`` in {0, 1}.

    Loss: balanced BCE — the positive share is the batch's fraction of negative pixels, so both
    classes contribute equally (Maninis et al. 2019). Metrics, over the ``thresholds`` on
    ``sigmoid(pred)`` (default 15 from 0.2 to 0.9, as in that paper's evaluation): ``max_f``, the
    best F-score, and ``iou``, the best IoU of the foreground; TP/FP/FN are pooled over the split
    (the reference evaluation averages per image instead).
    """

    kind = "saliency"

    @dataclass
    class Options:
        target: str | None = None
        thresholds: list[float] = field(
            default_factory=lambda: [round(0.2 + 0.05 * i, 2) for i in range(15)])

    def __init__(self, name: str, target: str, label_info: dict, options: Options) -> None:
        super().__init__(name, target, output="dense", out_channels=1,
                         metrics={"max_f": True, "iou": True}, main_metric="max_f")
        if not options.thresholds or not all(0.0 < t < 1.0 for t in options.thresholds):
            raise option_error(name, "thresholds", f"expected values in (0, 1), got {options.thresholds}")
        self.thresholds = list(options.thresholds)
        self.ignore_index = label_info.get("ignore_index")

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_shapes(self.name, pred, target)
        valid = _valid(target, self.ignore_index)
        negatives = ((target < 0.5) & valid).sum()
        pos_share = negatives.to(pred.dtype) / valid.sum().clamp(min=1)
        return weighted_bce(pred, target, valid, pos_share)

    def new_meter(self) -> SaliencyMeter:
        return SaliencyMeter(self.thresholds, self.ignore_index)


class ThresholdMeter(SummedMeter):
    """TP/FP/FN of ``sigmoid(pred) > t`` for each threshold t, pooled over the split."""

    sums = ("tp", "fp", "fn", "pixels")

    def __init__(self, thresholds: list[float], ignore_index: int | None) -> None:
        self.thresholds = torch.tensor(thresholds, dtype=torch.float64)
        self.ignore_index = ignore_index
        self.tp = torch.zeros(len(thresholds), dtype=torch.float64)
        self.fp = torch.zeros_like(self.tp)
        self.fn = torch.zeros_like(self.tp)
        self.pixels = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = _valid(target, self.ignore_index)
        prob = torch.sigmoid(pred.double())[valid]
        truth = target[valid] > 0.5
        guess = prob[None, :] > self.thresholds.to(prob.device)[:, None]
        self.tp += (guess & truth).sum(dim=1).cpu()
        self.fp += (guess & ~truth).sum(dim=1).cpu()
        self.fn += (~guess & truth).sum(dim=1).cpu()
        self.pixels += int(valid.sum())


class EdgeMeter(ThresholdMeter):
    """F-score at the task's one threshold."""

    def compute(self) -> dict[str, float]:
        if self.pixels == 0:
            return {"f_score": _NAN}
        return {"f_score": float(_f_score(self.tp, self.fp, self.fn)[0])}


class SaliencyMeter(ThresholdMeter):
    """The best F-score and the best foreground IoU over the thresholds."""

    def compute(self) -> dict[str, float]:
        if self.pixels == 0:
            return {"max_f": _NAN, "iou": _NAN}
        union = self.tp + self.fp + self.fn
        iou = torch.where(union > 0, self.tp / union.clamp(min=1), torch.zeros_like(union))
        return {"max_f": float(_f_score(self.tp, self.fp, self.fn).max()), "iou": float(iou.max())}


# ----------------------------------------------------------------------------------------------
# Binary attributes


@TASKS.register("attributes")
class AttributesTask(Task):
    """pred ``(B, A)`` logits; label ``(B, A_all)`` in {0, 1} (CelebA-style binary attributes).

    The dataset's label description gives ``attributes`` = A_all; ``select`` picks some columns
    (e.g. the 9 of CelebA's 40 that DMTG's CelebA-9 uses, or one column per task). Loss: BCE of
    each attribute, averaged over attributes and samples. Metric: ``error``, the fraction of
    wrong ``pred > 0`` decisions over all (sample, attribute) pairs.
    """

    kind = "attributes"

    @dataclass
    class Options:
        target: str | None = None
        select: list[int] | None = None

    def __init__(self, name: str, target: str, label_info: dict, options: Options) -> None:
        available = label_count(name, target, label_info, "attributes")
        select = options.select
        if select is not None and (not select or not all(0 <= i < available for i in select)):
            raise option_error(name, "select", f"expected column indices in 0..{available - 1}, got {select}")
        super().__init__(name, target, output="global",
                         out_channels=len(select) if select is not None else available,
                         metrics={"error": False}, main_metric="error")
        self.select = select

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _columns(target, self.select)
        check_shapes(self.name, pred, target)
        return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))

    def new_meter(self) -> AttributeErrorMeter:
        return AttributeErrorMeter(self.select)


def _columns(target: torch.Tensor, select: list[int] | None) -> torch.Tensor:
    return target if select is None else target[:, select]


class AttributeErrorMeter(SummedMeter):
    """Wrong decisions over all (sample, attribute) pairs seen."""

    sums = ("wrong", "count")

    def __init__(self, select: list[int] | None) -> None:
        self.select = select
        self.wrong = 0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        truth = _columns(target, self.select) > 0.5
        self.wrong += int(((pred > 0) != truth).sum())
        self.count += truth.numel()

    def compute(self) -> dict[str, float]:
        return {"error": self.wrong / self.count if self.count else _NAN}
