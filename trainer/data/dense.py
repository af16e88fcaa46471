"""The item pipeline every on-disk dataset shares: decode → (train) random scale-crop and flip →
resize to ``data.size`` → normalise.

Training augmentation follows the MTAN/LibMTL ``RandomScaleCrop`` + flip: pick a scale ``s`` from
``scales``, cut a random window of ``1/s`` of the image and resize it back up, so the labels stay
aligned pixel for pixel. Zooming in by ``s`` brings the scene ``s`` times closer, so depth labels
are divided by ``s`` (as the reference code does) and disparity labels multiplied by ``s``. A
horizontal flip mirrors every dense label and negates the x component of surface normals. Dense
labels are resampled with nearest neighbour (no blending of class ids or of invalid zeros into
valid values); the image bilinearly, antialiased when it shrinks.

The networks take square inputs (``ArchSpec.image_size``), so every image is resized to
``data.size`` × ``data.size``; for non-square datasets (NYUv2 288×384, Cityscapes 128×256) that
changes the aspect ratio.

Every random choice comes from the sample's own generator (:func:`loader.sample_rng`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from taskfold.trainer.config import ConfigError
from taskfold.trainer.data.base import DatasetInfo, DatasetOptions
from taskfold.trainer.data.loader import SampleKey, as_key, sample_rng

# How a label is resampled and what zoom and flip do to it.
CLASSES = "classes"  # int map (H, W): class ids / ignore
DEPTH = "depth"  # (1, H, W), 0 = invalid; divided by the zoom
DISPARITY = "disparity"  # (1, H, W), 0 = invalid; multiplied by the zoom
NORMALS = "normals"  # (3, H, W) unit vectors, all-zero = invalid; a flip negates x
MAP = "map"  # any other dense (C, H, W) map: mirrored and resampled only
GLOBAL = "global"  # not an image (attributes): untouched
DENSE_KINDS = (CLASSES, DEPTH, DISPARITY, NORMALS, MAP)


@dataclass
class AugmentOptions:
    """``data.options.augment`` of the on-disk datasets (applied to the train split only)."""

    enabled: bool = True
    scales: list[float] = field(default_factory=lambda: [1.0, 1.2, 1.5])
    flip: bool = True

    def check(self) -> None:
        if not self.scales or any(s < 1.0 for s in self.scales):
            raise ConfigError(f"data.options.augment.scales: need one or more scales >= 1 "
                              f"(a window of 1/s of the image is zoomed in), got {self.scales}")


@dataclass
class AugmentedOptions(DatasetOptions):
    """``data.options`` of an on-disk dataset: its ``augment`` settings (a subclass may give them
    other defaults) and what the subclass adds."""

    augment: AugmentOptions = field(default_factory=AugmentOptions)

    def check(self, size: int | tuple[int, int]) -> None:
        self.augment.check()


def nearest_index(source: int, target: int) -> np.ndarray:
    """The source index of each of ``target`` outputs when ``source`` samples are resampled with
    nearest neighbour, taken from ``F.interpolate`` itself so it picks exactly torch's pixels."""
    grid = torch.arange(source, dtype=torch.float32).view(1, 1, source)
    return F.interpolate(grid, size=target, mode="nearest")[0, 0].numpy().astype(np.intp)


def transform(image: np.ndarray, planes: dict[str, np.ndarray | torch.Tensor], kinds: dict[str, str],
              finish: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]], *, size: int,
              mean: torch.Tensor, std: torch.Tensor, augment: AugmentOptions | None,
              rng: np.random.Generator | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``image`` (H, W, 3) uint8 or float in [0, 1], ``planes`` as :meth:`DenseFiles.decode`
    gives them → the training item.

    Nearest resampling only picks pixels, so the dense planes are cropped, resampled and
    mirrored as they were stored (raw 16-bit PNG values, class ids) and ``finish`` decodes the
    picked pixels afterwards: the same labels as decoding first, for a fraction of the work when
    the image shrinks. Tensors in ``planes`` (global labels) pass through ``finish`` untouched.
    """
    height, width = image.shape[:2]
    top, left, crop_h, crop_w, scale, flip = 0, 0, height, width, 1.0, False
    if augment is not None and augment.enabled:
        scale = float(augment.scales[int(rng.integers(len(augment.scales)))])
        crop_h, crop_w = int(height / scale), int(width / scale)
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        flip = augment.flip and bool(rng.random() < 0.5)
    shrink = crop_h > size or crop_w > size
    # (H, W, 3) seen as (3, H, W) is channels-last: torch's bilinear upsampling is 2-3x faster on
    # it (same values), its antialiased downsampling faster on contiguous planes.
    crop = torch.from_numpy(np.array(image[top:top + crop_h, left:left + crop_w], order="C")).permute(2, 0, 1)
    crop = crop.contiguous() if shrink else crop
    crop = crop.float() / 255.0 if image.dtype == np.uint8 else crop.float()
    out_image = crop
    if (crop_h, crop_w) != (size, size):  # bilinear at scale 1 would return the same values
        out_image = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=shrink)[0]
    rows = top + nearest_index(crop_h, size)
    cols = left + nearest_index(crop_w, size)
    if flip:
        out_image, cols = out_image.flip(-1), cols[::-1]
    picked = {key: value if isinstance(value, torch.Tensor) else value.take(rows, axis=0).take(cols, axis=1)
              for key, value in planes.items()}
    out = finish(picked)
    for key, value in out.items():
        kind = kinds[key]
        if kind == DEPTH:
            out[key] = value / scale
        elif kind == DISPARITY:
            out[key] = value * scale
        elif kind == NORMALS and flip:
            value[0] = -value[0]
    return ((out_image - mean) / std).contiguous(), out


class DenseFiles(Dataset):
    """Base of the on-disk datasets: subclasses list their records and decode one.

    A subclass sets ``name``, ``info``, ``kinds`` (label key → one of the kinds above), and
    implements ``__len__``, ``decode(index)`` → ``(image (H, W, 3) uint8 or float in [0, 1],
    planes)`` and, unless its planes already are the labels, ``finish(planes)`` → labels.
    ``planes`` are numpy arrays (H, W) or (H, W, C) at the image's size, keyed as the subclass
    likes, or tensors for global labels; ``finish`` must work pixel by pixel (it sees the planes
    after cropping, resampling and mirroring), returning int64 (H, W) class maps and float32
    (C, H, W) dense labels under the label keys.
    """

    name = ""

    def __init__(self, *, size: int, info: DatasetInfo, kinds: dict[str, str],
                 augment: AugmentOptions | None) -> None:
        self.size, self.info, self.kinds, self.augment = size, info, kinds, augment
        self._mean = torch.tensor(info.mean).view(3, 1, 1)
        self._std = torch.tensor(info.std).view(3, 1, 1)

    def decode(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray | torch.Tensor]]:
        raise NotImplementedError

    def finish(self, planes: dict[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        """Planes that already hold the labels' values → tensors (class maps int64, others float32)."""
        return {key: value if isinstance(value, torch.Tensor) else
                torch.from_numpy(value.astype(np.int64)) if self.kinds[key] == CLASSES else chw(value)
                for key, value in planes.items()}

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key = as_key(key)
        if not 0 <= key.index < len(self):
            raise IndexError(f"{self.name}: index {key.index} out of range 0..{len(self) - 1}")
        image, planes = self.decode(key.index)
        rng = sample_rng(key) if self.augment is not None else None
        return transform(image, planes, self.kinds, self.finish, size=self.size, mean=self._mean, std=self._std,
                         augment=self.augment, rng=rng)


def chw(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) numpy → float32 (C, H, W) tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor.permute(2, 0, 1).contiguous() if tensor.dim() == 3 else tensor[None]
