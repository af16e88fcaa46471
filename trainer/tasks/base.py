"""What every task is: a loss, a metric accumulator, and the metric directions.

A task is the only place that knows how a head's raw output relates to a dataset label. The
training loop calls ``task.loss(pred, target)``; evaluation creates ``task.new_meter()``, feeds it
every batch and reads ``compute()`` once, so set-level metrics (mIoU from a confusion matrix
accumulated over the whole split, the median angle error of every valid pixel) are exact rather
than averages of per-batch values. ``metrics`` maps each metric name to "higher is better", which
is what the multi-task summaries (:mod:`taskfold.trainer.tasks.summaries`) need to sign a change.

Ratios (mIoU, accuracies, F-scores, "% within") are reported as fractions in [0, 1]; angles in
degrees; depth/disparity errors in the label's unit.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from taskfold.models.registry import Registry
from taskfold.trainer.config import ConfigError, build_options
from taskfold.trainer.data.base import DatasetInfo

TASKS: Registry[type[Task]] = Registry("task kind")


class Meter(Protocol):
    """Accumulates a split's statistics batch by batch; ``compute`` gives the set-level metrics."""

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: the head's raw output and the dataset label, both batched."""

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen so far (NaN where nothing valid was seen)."""

    def merge(self, other: "Meter") -> None:
        """Add what ``other`` (the same kind of meter, on another share of the split) has seen:
        how a DDP evaluation combines its ranks (see :class:`SummedMeter`)."""


class SummedMeter:
    """A meter whose state is the attributes named in ``sums`` (numbers, tensors, arrays or
    lists), each the sum (lists: the concatenation) of what every batch added, so two meters
    merge by adding those attributes."""

    sums: tuple[str, ...] = ()

    def merge(self, other: "SummedMeter") -> None:
        for name in self.sums:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Task(ABC):
    """One task of a multi-task network, built by :func:`create_task` from a config entry.

    Subclasses (one per kind, registered in :data:`TASKS`) declare a nested ``Options``
    dataclass with a ``target`` field, and take ``(name, target, label_info, options)``.
    """

    kind: str = ""
    weight: float = 1.0      # the recipe's fixed loss weight (``tasks[].weight``), set by create_task

    def __init__(self, name: str, target: str, *, output: str, out_channels: int,
                 metrics: dict[str, bool], main_metric: str) -> None:
        self.name = name
        self.target = target
        self.output = output
        self.out_channels = out_channels
        self.metrics = metrics
        self.main_metric = main_metric

    @abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A scalar loss from the head's raw output and the batched label."""

    def copy_losses(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The losses of several heads' outputs against one label: ``preds`` ``(C, B, ...)`` → ``(C,)``.

        DMTG scores K copies of every task's head each step; kinds whose loss is a mean over
        samples override this with one batched call instead of C calls of :meth:`loss`.
        """
        return torch.stack([self.loss(pred, target) for pred in preds])

    @abstractmethod
    def new_meter(self) -> Meter:
        """A fresh accumulator for this task's metrics."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, target={self.target!r}, "
                f"out_channels={self.out_channels})")


def check_task_options(name: str, kind: str, options: dict) -> Any:
    """Task ``name``'s options validated against its kind's ``Options`` (needs no dataset: the
    recipe check before any data is read calls this); an unknown kind raises ``UnknownNameError``."""
    return build_options(TASKS.get(kind).Options, options, f"tasks.{name}")


def create_task(name: str, kind: str, dataset_info: DatasetInfo, *, weight: float = 1.0, **options) -> Task:
    """Build the task ``name`` of ``kind`` for a dataset; options are validated here.

    ``weight`` is the recipe's fixed factor on this task's loss: weighting strategies apply it to
    the weight steps (``scale_losses``) and search methods to the architecture steps
    (``weighted_total``), so both optimise the same objective.

    ``target`` (the dataset's label key) defaults to the kind, so ``{name: seg, kind:
    segmentation}`` reads the ``segmentation`` label. Bad options and labels the dataset does not
    provide raise :class:`ConfigError`; an unknown kind raises ``UnknownNameError``.
    """
    cls = TASKS.get(kind)
    opts = check_task_options(name, kind, options)
    target = opts.target or kind
    if target not in dataset_info.labels:
        have = ", ".join(sorted(dataset_info.labels)) or "none"
        raise ConfigError(f"task {name!r}: dataset has no label {target!r} (it has: {have})")
    task = cls(name, target, dataset_info.labels[target], opts)
    task.weight = weight
    return task


# ----------------------------------------------------------------------------------------------
# Helpers shared by the task modules.


def option_error(task: str, field: str, message: str) -> ConfigError:
    """A ConfigError in the same ``tasks.<name>.<field>`` form as build_options' messages."""
    return ConfigError(f"tasks.{task}.{field}: {message}")


def label_count(task: str, label: str, label_info: dict, key: str) -> int:
    """The size a head needs (``classes``, ``attributes``) from the dataset's label description."""
    value = label_info.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"task {task!r}: dataset label {label!r} does not say how many {key} "
                          f"it has (expected labels[{label!r}][{key!r}] = a positive integer)")
    return value


def check_shapes(task: str, pred: torch.Tensor, target: torch.Tensor) -> None:
    """Dense tasks compare prediction and label pixel by pixel; a mismatch is a wiring bug."""
    if pred.shape != target.shape:
        raise ValueError(f"task {task!r}: prediction shape {tuple(pred.shape)} does not match "
                         f"label shape {tuple(target.shape)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; exactly 0 (still in the graph) when nothing is valid.

    A batch whose labels are all invalid must not put NaN into the weights.
    """
    count = mask.sum()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / count.clamp(min=1)


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                 pos_weight: float | torch.Tensor) -> torch.Tensor:
    """``-(w·y·log p + (1-w)·(1-y)·log(1-p))`` averaged over valid pixels.

    ``w`` is the *share* of the loss given to positives (the convention of Maninis et al. 2019 and
    Vandenhende et al. 2021, where edges use w = 0.95), not torch's ``pos_weight`` multiplier.
    """
    weight = torch.where(target > 0.5, pos_weight, 1.0 - pos_weight).to(logits.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return masked_mean(per_pixel * weight, valid)

