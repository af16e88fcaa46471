"""Datasets, each registered by name in :data:`DATASETS`; build one with :func:`create_dataset`."""
from __future__ import annotations

from taskfold.trainer.data.base import DATASETS, DatasetInfo, create_dataset
from taskfold.trainer.data import composites, synthscenes  # noqa: F401  (register the datasets)

__all__ = ["DATASETS", "DatasetInfo", "create_dataset"]
