"""What every dataset exposes: items ``(image, targets)`` and a :class:`DatasetInfo`."""
from __future__ import annotations

from dataclasses import dataclass, field

from taskfold.models.registry import Registry

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


def create_dataset(name: str, split: str, *, size: int, num_samples: int, seed: int = 0,
                   cache_dir: str | None = None, **options):
    """Build a registered dataset; ``split`` is one of ``train``, ``val``, ``test``."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    builder = DATASETS.get(name)
    return builder(split=split, size=size, num_samples=num_samples, seed=seed, cache_dir=cache_dir, **options)
