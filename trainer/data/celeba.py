"""``celeba``: the aligned CelebA release, as torchvision's ``datasets/celeba.py`` reads it.

    root/img_align_celeba/000001.jpg ...     178 x 218 aligned faces
    root/list_attr_celeba.txt                line 1: image count; line 2: the 40 attribute names;
                                             then "000001.jpg -1 1 ..." (±1 per attribute)
    root/list_eval_partition.txt             "000001.jpg 0|1|2" = train / val / test

(``root`` may also be the folder above, holding ``celeba/``.) Every attribute is its own label
key, int64 0/1 with ``classes: 2`` (DMTG's setting: each attribute a classification task), and
``attributes`` holds all 40 as float 0/1 (for the ``attributes`` task kind). The image is
centre-cropped to a square and resized to ``data.size`` (DMTG trains at 64 × 64). Attributes
are global labels, so training augmentation is off by default (``augment: {enabled: true}``
mirrors faces at random).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from taskfold.trainer.data.base import DatasetInfo, register_dataset
from taskfold.trainer.data.dense import GLOBAL, AugmentedOptions, AugmentOptions, DenseFiles
from taskfold.trainer.data.files import dataset_root, limit, read_image, read_lines, require_dir, require_file
from taskfold.trainer.data.idx import DataFormatError, DatasetUnavailable
from taskfold.trainer.data.mtan import IMAGENET_MEAN, IMAGENET_STD

PARTITION = {"train": 0, "val": 1, "test": 2}


@dataclass
class CelebAOptions(AugmentedOptions):
    augment: AugmentOptions = field(default_factory=lambda: AugmentOptions(enabled=False, scales=[1.0]))


def read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(attribute names, file name → int64 0/1 row) of ``list_attr_celeba.txt``."""
    lines = read_lines(path, "celeba", "attribute list")
    if len(lines) < 2 or not lines[0].isdigit():
        raise DataFormatError(f"celeba: {path} must start with the image count and the attribute names")
    names = lines[1].split()
    rows: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise DataFormatError(f"celeba: {path} line {number}: expected a file name and {len(names)} values of ±1")
        rows[parts[0]] = (np.array(parts[1:], dtype=np.int64) + 1) // 2
    if int(lines[0]) != len(rows):
        raise DatasetUnavailable(f"celeba: {path} announces {lines[0]} images but lists {len(rows)}")
    return names, rows


class CelebA(DenseFiles):
    name = "celeba"

    def __init__(self, root: Path, split: str, *, size: int, num_samples: int | None,
                 augment: AugmentOptions | None) -> None:
        self.image_dir = require_dir(root / "img_align_celeba", self.name, "image")
        names, rows = read_attributes(root / "list_attr_celeba.txt")
        partition_path = root / "list_eval_partition.txt"
        files = []
        for number, line in enumerate(read_lines(partition_path, self.name, "partition list"), start=1):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DataFormatError(f"celeba: {partition_path} line {number}: expected a file name and 0, 1 or 2")
            if int(parts[1]) == PARTITION[split]:
                files.append(parts[0])
        if len(files) == 0:
            raise DatasetUnavailable(f"celeba: {partition_path} lists no {split} images")
        self.files = limit(files, num_samples)
        for file in self.files:
            if file not in rows:
                raise DatasetUnavailable(f"celeba: {file} of {partition_path} has no row in list_attr_celeba.txt")
            require_file(self.image_dir / file, self.name, "image")
        self.names = names
        self.rows = np.stack([rows[file] for file in self.files])
        labels = {name: {"classes": 2, "class_names": ["no", "yes"]} for name in names}
        labels["attributes"] = {"attributes": len(names), "names": names}
        info = DatasetInfo(image_size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=labels)
        super().__init__(size=size, info=info, kinds={key: GLOBAL for key in labels}, augment=augment)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        image = read_image(self.image_dir / self.files[index], self.name, "RGB")
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        row = torch.from_numpy(self.rows[index])
        labels = {name: row[i] for i, name in enumerate(self.names)}
        labels["attributes"] = row.float()
        return image[top:top + side, left:left + side], labels


@register_dataset("celeba", CelebAOptions)
def celeba(*, split: str, size: int, num_samples: int | None, seed: int, cache_dir: str | None,
           root: str | None, options: CelebAOptions) -> CelebA:
    """CelebA's 40 binary attributes from the aligned images and the two list files."""
    base = dataset_root(root, "celeba")
    if not (base / "list_attr_celeba.txt").exists() and (base / "celeba").is_dir():
        base = base / "celeba"
    return CelebA(base, split, size=size, num_samples=num_samples,
                  augment=options.augment if split == "train" else None)
