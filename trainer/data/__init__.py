"""Datasets, each registered by name in :data:`DATASETS`; build one with :func:`create_dataset`."""
from __future__ import annotations

from taskfold.trainer.data.base import DATASETS, DatasetInfo, create_dataset

__all__ = ["DATASETS", "DatasetInfo", "create_dataset"]
