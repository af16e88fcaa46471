"""What every dataset exposes: items ``(image, targets)`` and a :class:`DatasetInfo`.

The item/batch contract the trainer relies on is in :mod:`taskfold.trainer.data.loader`.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from taskfold.models.registry import Registry
from taskfold.trainer.config import ConfigError, build_options

DATASETS: Registry = Registry("dataset")

# What one pixel of one sample costs in memory once a split is loaded: the float32 image and
# every label as tensors, plus the arrays they were made from (synthscenes holds 61 bytes, and
# peaks near 88 while rendering). A rough figure, good enough to refuse sizes that cannot fit.
BYTES_PER_PIXEL = 64


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


class DatasetOptions:
    """Base of every dataset's ``data.options`` dataclass. The fields' types are checked by the
    config converter; :meth:`check` holds the rules a type cannot state (ranges, known names)."""

    def check(self, size: int | tuple[int, int]) -> None:
        """Raise one ConfigError naming what cannot work (``size``: ``data.size``)."""


def check_known(field: str, names: list[str], known) -> None:
    """``data.options.<field>``: a non-empty list of names from ``known``, else one ConfigError."""
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ConfigError(f"data.options.{field}: unknown {unknown or 'empty list'}; known: {', '.join(known)}")


def register_dataset(name: str, options: type[DatasetOptions]) -> Callable:
    """Register a builder ``(*, split, size, num_samples, seed, cache_dir, [root,] options)`` in
    DATASETS with the dataclass of its ``data.options`` (``builder.Options``), so a recipe's
    dataset options are validated with everything else before any data is read."""

    def decorate(builder: Callable) -> Callable:
        builder.Options = options
        return DATASETS.register(name)(builder)

    return decorate


def dataset_options(name: str, options: dict, size: int | tuple[int, int]) -> DatasetOptions:
    """``data.options`` of dataset ``name``, validated (one ConfigError naming every problem)."""
    opts = build_options(DATASETS.get(name).Options, options, "data.options")
    opts.check(size)
    return opts


def create_dataset(name: str, split: str, *, size: int, num_samples: int | None, seed: int = 0,
                   cache_dir: str | None = None, root: str | None = None, **options):
    """Build a registered dataset; ``split`` is one of ``train``, ``val``, ``test``.

    On-disk datasets take ``root`` (their builder has a ``root`` parameter) and read at most
    ``num_samples`` items (None: all); generated datasets take no root and need ``num_samples``.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; expected train, val or test")
    builder = DATASETS.get(name)
    opts = dataset_options(name, options, size)
    if "root" in inspect.signature(builder).parameters:
        return builder(split=split, size=size, num_samples=num_samples, seed=seed, cache_dir=cache_dir,
                       root=root, options=opts)
    if root is not None:
        raise ConfigError(f"data.root: dataset {name!r} is generated and reads no folder; remove data.root")
    if num_samples is None:
        raise ConfigError(f"data.{split}_size: dataset {name!r} is generated and needs a number of samples")
    check_fits_in_memory(split, size, num_samples)
    return builder(split=split, size=size, num_samples=num_samples, seed=seed, cache_dir=cache_dir, options=opts)


def physical_memory() -> int | None:
    """Bytes of RAM on this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes < 2**50 else f"{nbytes / 2**50:,.3g} PiB"


def check_fits_in_memory(split: str, size: int | tuple[int, int], num_samples: int) -> None:
    """Refuse a split that could never be held in memory here, before rendering any of it."""
    height, width = (size, size) if isinstance(size, int) else size
    need = num_samples * height * width * BYTES_PER_PIXEL
    have = physical_memory()
    if have is not None and need > have:
        raise ConfigError(f"data: the {split} split ({num_samples} images of {height}x{width} pixels) needs about "
                          f"{_gib(need)} of memory and this machine has {_gib(have)}; "
                          "lower data.size or the split sizes")
