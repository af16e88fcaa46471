"""Semantic segmentation: per-pixel cross-entropy; mIoU and pixel accuracy over the whole split.

mIoU is computed from one confusion matrix accumulated over every evaluated pixel (as in the
NYUv2 / PASCAL-Context protocols), averaging IoU over the classes that occur in the labels or in
the predictions; a class absent from both says nothing about the model and is left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taskfold.trainer.tasks.base import TASKS, SummedMeter, Task, label_count


@TASKS.register("segmentation")
class SegmentationTask(Task):
    """pred ``(B, C, H, W)`` logits; label int64 ``(B, H, W)`` with ``ignore_index`` for unlabelled."""

    kind = "segmentation"

    @dataclass
    class Options:
        target: str | None = None

    def __init__(self, name: str, target: str, label_info: dict, options: Options) -> None:
        classes = label_count(name, target, label_info, "classes")
        super().__init__(name, target, output="dense", out_channels=classes,
                         metrics={"miou": True, "pixel_acc": True}, main_metric="miou")
        self.classes = classes
        self.ignore_index = int(label_info.get("ignore_index", 255))

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != self.ignore_index
        if not bool(valid.any()):  # cross_entropy would return NaN for an all-ignored batch
            return pred.sum() * 0.0
        return F.cross_entropy(pred, target.long(), ignore_index=self.ignore_index)

    def new_meter(self) -> ConfusionMeter:
        return ConfusionMeter(self.classes, self.ignore_index)


class ConfusionMeter(SummedMeter):
    """A ``classes × classes`` confusion matrix (rows: label, columns: prediction)."""

    sums = ("matrix",)

    def __init__(self, classes: int, ignore_index: int) -> None:
        self.classes = classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(classes, classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != self.ignore_index
        labels = target[valid].long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.classes):
            raise ValueError(f"segmentation label outside 0..{self.classes - 1} "
                             f"(and not ignore_index={self.ignore_index})")
        guesses = pred.argmax(dim=1)[valid]
        counts = torch.bincount(labels * self.classes + guesses, minlength=self.classes ** 2)
        self.matrix += counts.view(self.classes, self.classes).cpu()

    def compute(self) -> dict[str, float]:
        m = self.matrix.double()
        total = m.sum()
        if total == 0:
            return {"miou": float("nan"), "pixel_acc": float("nan")}
        hits = m.diagonal()
        union = m.sum(0) + m.sum(1) - hits
        present = union > 0
        iou = hits[present] / union[present]
        return {"miou": float(iou.mean()), "pixel_acc": float(hits.sum() / total)}
