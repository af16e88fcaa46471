"""Image classification: cross-entropy (or L2 to soft labels); top-1 and top-5 accuracy.

Labels are class indices (int64 ``(B,)``) or, as Taskonomy's object/scene labels are, class
distributions (float ``(B, C)``); with distributions the accuracies compare against their argmax.
Top-5 is reported only when there are more than 5 classes: with 5 or fewer it is always 1.0 and
would inflate a multi-task summary without measuring anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from taskfold.trainer.tasks.base import TASKS, SummedMeter, Task, label_count


def _hard_labels(target: torch.Tensor) -> torch.Tensor:
    return target.argmax(dim=1) if target.is_floating_point() else target.long()


@TASKS.register("classification")
class ClassificationTask(Task):
    """pred ``(B, C)`` logits. ``loss: ce`` (default) or ``l2`` (squared distance between the
    softmax and the label distribution, summed over classes, averaged over samples)."""

    kind = "classification"

    @dataclass
    class Options:
        target: str | None = None
        loss: Literal["ce", "l2"] = "ce"

    def __init__(self, name: str, target: str, label_info: dict, options: Options) -> None:
        classes = label_count(name, target, label_info, "classes")
        metrics = {"top1": True, "top5": True} if classes > 5 else {"top1": True}
        super().__init__(name, target, output="global", out_channels=classes,
                         metrics=metrics, main_metric="top1")
        self.classes = classes
        self.loss_kind = options.loss

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._sample_losses(pred, target).mean()

    def copy_losses(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """All C copies' losses from one call on the ``(C·B, classes)`` stack."""
        copies, batch = preds.shape[:2]
        repeated = target.expand(copies, *target.shape).flatten(0, 1)
        return self._sample_losses(preds.flatten(0, 1), repeated).view(copies, batch).mean(dim=1)

    def _sample_losses(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``(B,)``."""
        if self.loss_kind == "ce":
            soft = target.is_floating_point()
            return F.cross_entropy(pred, target.to(pred.dtype) if soft else target.long(), reduction="none")
        dist = target.to(pred.dtype) if target.is_floating_point() else F.one_hot(
            target.long(), self.classes).to(pred.dtype)
        return ((pred.softmax(dim=1) - dist) ** 2).sum(dim=1)

    def new_meter(self) -> TopKMeter:
        return TopKMeter(self.classes)


class TopKMeter(SummedMeter):
    """Counts samples whose label is the best guess (top-1) or among the 5 best (top-5)."""

    sums = ("top1", "top5", "count")

    def __init__(self, classes: int) -> None:
        self.with_top5 = classes > 5
        self.top1 = 0
        self.top5 = 0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        labels = _hard_labels(target)
        ranked = pred.topk(min(5, pred.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(dim=1).sum())
        self.count += labels.numel()

    def compute(self) -> dict[str, float]:
        n = self.count
        result = {"top1": self.top1 / n if n else float("nan")}
        if self.with_top5:
            result["top5"] = self.top5 / n if n else float("nan")
        return result
