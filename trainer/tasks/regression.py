"""Dense regression of any map (Taskonomy's keypoints2d, edge_texture, reshading, ...): L1.

Standley et al. (2020) and DMTG train every Taskonomy task but segmentation with an L1 loss on
the normalised label; ``abs_err`` is that mean absolute error over every pixel of the split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taskfold.trainer.tasks.base import TASKS, SummedMeter, Task, check_shapes


@TASKS.register("regression")
class RegressionTask(Task):
    """pred ``(B, C, H, W)``; label ``(B, C, H, W)``; ``channels`` is C (default 1)."""

    kind = "regression"

    @dataclass
    class Options:
        target: str | None = None
        channels: int = 1

    def __init__(self, name: str, target: str, label_info: dict, options: Options) -> None:
        super().__init__(name, target, output="dense", out_channels=int(label_info.get("channels", options.channels)),
                         metrics={"abs_err": False}, main_metric="abs_err")

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_shapes(self.name, pred, target)
        return (pred - target).abs().mean()

    def new_meter(self) -> L1Meter:
        return L1Meter()


class L1Meter(SummedMeter):
    """Mean absolute error over every label value seen."""

    sums = ("total", "count")

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.total += float((pred.double() - target.double()).abs().sum())
        self.count += target.numel()

    def compute(self) -> dict[str, float]:
        return {"abs_err": self.total / self.count if self.count else float("nan")}
