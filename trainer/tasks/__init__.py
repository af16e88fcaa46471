"""Tasks (loss + metrics), one per kind in :data:`TASKS`; build one with :func:`create_task`.

Importing this package registers every kind: segmentation, normals, depth, disparity, edges,
saliency, classification, attributes, regression. :func:`delta_m` and :func:`norm_gain` summarise a
multi-task model's results in one number.
"""
from __future__ import annotations

from taskfold.trainer.tasks import binary, classification, geometry, regression, segmentation  # noqa: F401  (registers)
from taskfold.trainer.tasks.base import TASKS, Meter, Task, check_task_options, create_task
from taskfold.trainer.tasks.geometry import align_scale_shift
from taskfold.trainer.tasks.summaries import delta_m, norm_gain

__all__ = ["TASKS", "Meter", "Task", "align_scale_shift", "check_task_options", "create_task", "delta_m", "norm_gain"]
