"""Datasets, each registered by name in :data:`DATASETS`; build one with :func:`create_dataset`.

Generated in memory: ``synthscenes``, ``composites``. Read from ``data.root`` in the papers'
on-disk formats: ``nyuv2``, ``cityscapes``, ``celeba``, ``taskonomy``, ``pascal_context``. How
the trainer iterates any of them: :mod:`taskfold.trainer.data.loader`.
"""
from __future__ import annotations

from taskfold.trainer.data.base import DATASETS, DatasetInfo, create_dataset, dataset_options
from taskfold.trainer.data import (celeba, composites, mtan, pascal_context, synthscenes,  # noqa: F401  (register)
                                   taskonomy)

__all__ = ["DATASETS", "DatasetInfo", "create_dataset", "dataset_options"]
