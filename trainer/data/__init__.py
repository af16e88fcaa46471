"""Datasets, each registered by name in :data:`DATASETS`; build one with :func:`create_dataset`."""
from __future__ import annotations

from taskfold.trainer.data.base import DATASETS, DatasetInfo, create_dataset
from taskfold.trainer.data import synthscenes  # noqa: F401  (registers "synthscenes")

__all__ = ["DATASETS", "DatasetInfo", "create_dataset"]
from taskfold.trainer.data import composites as _composites  # noqa: E402,F401  (registers "composites")
