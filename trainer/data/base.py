"""What every dataset exposes: items ``(image, targets)`` and a :class:`DatasetInfo`.

The item/batch contract the trainer relies on is in :mod:`taskfold.trainer.data.loader`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from taskfold.models.registry import Registry
from taskfold.trainer.config import ConfigError

DATASETS: Registry = Registry("dataset")


@dataclass
class DatasetInfo:
    """Facts a task or the compiler needs without touching the data.

    labels: one entry per label key the dataset provides, with what a task needs to size its
        head, e.g. ``{"segmentation": {"classes": 6, "ignore_index": 255}, "depth": {}}``.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: dict[str, dict] = field(default_factory=dict)


def create_dataset(name: str, split: str, *, size: int, num_samples: int | None, seed: int = 0,
                   cache_dir: str | None = None, root: str | None = None, **options):
    """Build a registered dataset; ``split`` is one of ``train``, ``val``, ``test``.

    On-disk datasets take ``root`` (their builder has a ``root`` parameter) and read at most
    ``num_samples`` items (None: all); generated datasets take no root and need ``num_samples``.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    builder = DATASETS.get(name)
    if "root" in inspect.signature(builder).parameters:
        return builder(split=split, size=size, num_samples=num_samples, seed=seed, cache_dir=cache_dir,
                       root=root, **options)
    if root is not None:
        raise ConfigError(f"data.root: dataset {name!r} is generated and reads no folder; remove data.root")
    if num_samples is None:
        raise ConfigError(f"data.{split}_size: dataset {name!r} is generated and needs a number of samples")
    return builder(split=split, size=size, num_samples=num_samples, seed=seed, cache_dir=cache_dir, **options)
