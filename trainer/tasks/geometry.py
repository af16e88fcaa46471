"""Geometric regression tasks: surface normals, depth and disparity.

Invalid pixels are marked in the label itself, as the datasets store them: a normal of length 0,
a depth or disparity of 0 (no measurement). Losses and metrics only look at valid pixels, and the
metrics pool every valid pixel of the split (not per-image averages), so they do not depend on
how the split is cut into batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from taskfold.trainer.tasks.base import TASKS, SummedMeter, Task, check_shapes, masked_mean

_NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Surface normals

_NORM_EPS = 1e-12  # F.normalize's default: a vector shorter than this is divided by it instead


def valid_normals(target: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` mask of labelled pixels: any non-zero component (same as length > 0)."""
    return target.ne(0).any(dim=1)


def normals_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cosine between ``(B, 3, H, W)`` fields; equals ``(F.normalize(p) * F.normalize(t)).sum(1)``.

    Written as ``p·t / (max(|p|, eps) · max(|t|, eps))`` with plain products and sums over the
    channel dim: on CPU, ``vector_norm``/``F.normalize`` over dim 1 of an NCHW tensor (a strided
    reduction, plus a broadcast divide of both full tensors) cost several times more, forward and
    backward, than these three channel sums (benchmarks/bench_normals_loss.py).
    """
    dot = (pred * target).sum(dim=1)
    pred_sq = (pred * pred).sum(dim=1).clamp(min=_NORM_EPS ** 2)
    target_sq = (target * target).sum(dim=1).clamp(min=_NORM_EPS ** 2)
    return dot * torch.rsqrt(pred_sq) * torch.rsqrt(target_sq)


@TASKS.register("normals")
class NormalsTask(Task):
    """pred ``(B, 3, H, W)`` (any length: normalised here); label unit vectors, all-zero = invalid.

    Loss: ``1 - cos`` between prediction and label, averaged over valid pixels.
    """

    kind = "normals"

    @dataclass
    class Options:
        target: str | None = None

    def __init__(self, name: str, target: str, label_info: dict, options: Options) -> None:
        super().__init__(name, target, output="dense", out_channels=3,
                         metrics={"mean": False, "median": False, "rmse": False,
                                  "within_11_25": True, "within_22_5": True, "within_30": True},
                         main_metric="mean")

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_shapes(self.name, pred, target)
        return masked_mean(1.0 - normals_cosine(pred, target), valid_normals(target))

    def new_meter(self) -> AngleMeter:
        return AngleMeter()


class AngleMeter(SummedMeter):
    """Keeps every valid pixel's angle error (float32, CPU) so the median is exact."""

    sums = ("angles",)

    def __init__(self) -> None:
        self.angles: list[np.ndarray] = []

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = valid_normals(target)
        cos = normals_cosine(pred.double(), target.double())
        degrees = torch.rad2deg(torch.acos(cos[valid].clamp(-1.0, 1.0)))
        self.angles.append(degrees.float().cpu().numpy())

    def compute(self) -> dict[str, float]:
        angles = np.concatenate(self.angles).astype(np.float64) if self.angles else np.zeros(0)
        if angles.size == 0:
            return {name: _NAN for name in
                    ("mean", "median", "rmse", "within_11_25", "within_22_5", "within_30")}
        return {
            "mean": float(angles.mean()),
            "median": float(np.median(angles)),
            "rmse": float(np.sqrt(np.mean(angles ** 2))),
            "within_11_25": float(np.mean(angles < 11.25)),
            "within_22_5": float(np.mean(angles < 22.5)),
            "within_30": float(np.mean(angles < 30.0)),
        }


# ----------------------------------------------------------------------------------------------
# Depth


def align_scale_shift(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``s·pred + t`` with the least-squares scale and shift of each image on its valid pixels.

    The closed form of Ranftl et al. (2020, eq. 4), written centred (covariance over variance)
    so that float32 does not cancel; a constant prediction gets s = 0, t = mean label.
    Differentiable: the scale-and-shift-invariant loss back-propagates through the alignment.
    """
    batch = pred.shape[0]
    p = pred.reshape(batch, -1)
    d = target.reshape(batch, -1).to(p.dtype)
    m = valid.reshape(batch, -1).to(p.dtype)
    count = m.sum(dim=1, keepdim=True).clamp(min=1)
    p_mean = (m * p).sum(dim=1, keepdim=True) / count
    d_mean = (m * d).sum(dim=1, keepdim=True) / count
    pc = (p - p_mean) * m
    scale = (pc * (d - d_mean)).sum(dim=1, keepdim=True) / (pc * pc).sum(dim=1, keepdim=True).clamp(min=1e-12)
    shift = d_mean - scale * p_mean
    return (scale * p + shift).reshape(pred.shape)


@TASKS.register("depth")
class DepthTask(Task):
    """pred ``(B, 1, H, W)``; label depth ``(B, 1, H, W)``, 0 = no measurement.

    ``loss: l1`` — mean absolute error on valid pixels. ``loss: ssi`` — the scale-and-shift-
    invariant loss of Ranftl et al. (MiDaS, TPAMI 2020): each image's prediction is first aligned to
    the label by least squares, then ``sum (aligned - label)^2 / (2·M)`` over the batch's M valid
    pixels (the gradient-matching regulariser of that paper is not included). An SSI-trained
    model predicts depth only up to scale and shift, so its metrics are computed after the same
    per-image alignment (as MiDaS evaluates); with ``l1`` the raw prediction is scored.
    """

    kind = "depth"

    @dataclass
    class Options:
        target: str | None = None
        loss: Literal["l1", "ssi"] = "l1"

    def __init__(self, name: str, target: str, label_info: dict, options: Options) -> None:
        super().__init__(name, target, output="dense", out_channels=1,
                         metrics={"rmse": False, "abs_rel": False, "delta1": True}, main_metric="rmse")
        self.loss_kind = options.loss

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_shapes(self.name, pred, target)
        valid = target > 0
        if self.loss_kind == "l1":
            return masked_mean((pred - target).abs(), valid)
        aligned = align_scale_shift(pred, target, valid)
        return masked_mean((aligned - target) ** 2, valid) / 2.0

    def new_meter(self) -> DepthMeter:
        return DepthMeter(align=self.loss_kind == "ssi")


class DepthMeter(SummedMeter):
    """Sums of squared error, relative error and δ<1.25 hits over every valid pixel."""

    sums = ("squared", "relative", "delta_hits", "count")

    def __init__(self, align: bool) -> None:
        self.align = align
        self.squared = 0.0
        self.relative = 0.0
        self.delta_hits = 0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.double(), target.double()
        valid = target > 0
        if self.align:
            pred = align_scale_shift(pred, target, valid)
        p, d = pred[valid], target[valid]
        ratio = torch.where(p > 0, torch.maximum(p / d, d / p.clamp(min=1e-12)), math.inf)
        self.squared += float(((p - d) ** 2).sum())
        self.relative += float(((p - d).abs() / d).sum())
        self.delta_hits += int((ratio < 1.25).sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {"rmse": _NAN, "abs_rel": _NAN, "delta1": _NAN}
        return {"rmse": math.sqrt(self.squared / self.count), "abs_rel": self.relative / self.count,
                "delta1": self.delta_hits / self.count}


# ----------------------------------------------------------------------------------------------
# Disparity


@TASKS.register("disparity")
class DisparityTask(Task):
    """pred ``(B, 1, H, W)``; label disparity ``(B, 1, H, W)``, 0 = invalid. MSE; abs error."""

    kind = "disparity"

    @dataclass
    class Options:
        target: str | None = None

    def __init__(self, name: str, target: str, label_info: dict, options: Options) -> None:
        super().__init__(name, target, output="dense", out_channels=1,
                         metrics={"abs_err": False}, main_metric="abs_err")

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_shapes(self.name, pred, target)
        return masked_mean((pred - target) ** 2, target > 0)

    def new_meter(self) -> AbsErrorMeter:
        return AbsErrorMeter()


class AbsErrorMeter(SummedMeter):
    """Mean absolute error over every valid (label > 0) pixel of the split."""

    sums = ("total", "count")

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = target > 0
        self.total += float((pred.double() - target.double()).abs()[valid].sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        return {"abs_err": self.total / self.count if self.count else _NAN}
