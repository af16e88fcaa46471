"""``nyuv2`` and ``cityscapes``: the ``.npy`` layout MTAN and LibMTL preprocess both datasets into.

    root/{train,val}/image/{i}.npy     (H, W, 3) float in [0, 1] (uint8 0-255 also accepted)
    root/{train,val}/label/{i}.npy     (H, W) class ids, -1 = ignore          (nyuv2: 13 classes)
    root/{train,val}/depth/{i}.npy     (H, W, 1): nyuv2 depth in metres, cityscapes disparity; 0 = invalid
    root/{train,val}/normal/{i}.npy    (H, W, 3) unit normals, all-zero = invalid (nyuv2 only)

``i`` runs over 0..N-1 with N counted from ``image/`` (NYUv2: 795 train, 654 val at 288×384;
Cityscapes: 2975 train, 500 val at 128×256). Cityscapes keeps one label folder per class count:
``label_7/``, ``label_19/``, ``label_2/`` (``data.options.classes`` picks one; a plain ``label/``
is used when that folder is absent). The papers report on ``val``, so ``test`` reads ``val/``
too. Sources: lorenmt/mtan ``create_dataset.py``, LibMTL ``examples/nyu/create_dataset.py``.

Label keys: ``segmentation`` (int64, ignore -1), ``depth`` (nyuv2) or ``disparity`` (cityscapes),
``normals`` (nyuv2), and with ``edges: true`` an ``edges`` map derived from the segmentation (the
boundary pixels of :func:`label_edges`; NYUv2 as MTAN ships it has no edge annotation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import numpy as np

from taskfold.trainer.data.base import DatasetInfo, register_dataset
from taskfold.trainer.data.dense import (CLASSES, DEPTH, DISPARITY, MAP, NORMALS,
                                         AugmentedOptions, AugmentOptions, DenseFiles)
from taskfold.trainer.data.edges import label_edges
from taskfold.trainer.data.files import (check_shape, dataset_root, limit, read_npy, require_dir,
                                         require_file)
from taskfold.trainer.data.idx import DatasetUnavailable

# ImageNet statistics: the recipes start from ImageNet-pretrained backbones (the MTAN loaders
# feed [0, 1] images unnormalised to networks trained from scratch).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = -1
FOLDER_OF_SPLIT = {"train": "train", "val": "val", "test": "val"}


@dataclass
class NyuOptions(AugmentedOptions):
    edges: bool = False


@dataclass
class CityscapesOptions(AugmentedOptions):
    classes: Literal[2, 7, 19] = 7
    edges: bool = False


class NpyDense(DenseFiles):
    """One split of an MTAN-layout folder; ``folders`` maps label key → (folder, kind)."""

    def __init__(self, name: str, split_dir: Path, folders: dict[str, tuple[str, str]], *, classes: int,
                 edges: bool, size: int, num_samples: int | None, augment: AugmentOptions | None) -> None:
        self.name, self.split_dir, self.folders, self.edges = name, split_dir, folders, edges
        image_dir = require_dir(split_dir / "image", name, "image")
        count = len(list(image_dir.glob("*.npy")))
        if count == 0:
            raise DatasetUnavailable(f"{name}: no .npy images in {image_dir}")
        for key, (folder, _) in folders.items():
            label_dir = require_dir(split_dir / folder, name, f"{key} label")
            found = len(list(label_dir.glob("*.npy")))
            if found != count:
                raise DatasetUnavailable(f"{name}: {label_dir} holds {found} .npy files but {image_dir} holds {count}")
        self.indices = limit(list(range(count)), num_samples)
        for i in self.indices:
            require_file(image_dir / f"{i}.npy", name, "image")
            for key, (folder, _) in folders.items():
                require_file(split_dir / folder / f"{i}.npy", name, f"{key} label for image {i}")
        kinds = {key: kind for key, (_, kind) in folders.items()}
        labels = {key: {} for key in folders}
        labels["segmentation"] = {"classes": classes, "ignore_index": IGNORE_INDEX}
        if edges:
            kinds["edges"], labels["edges"] = MAP, {}
        info = DatasetInfo(image_size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=labels)
        super().__init__(size=size, info=info, kinds=kinds, augment=augment)

    def __len__(self) -> int:
        return len(self.indices)

    def decode(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        i = self.indices[index]
        path = self.split_dir / "image" / f"{i}.npy"
        image = check_shape(read_npy(path, self.name), (None, None, 3), path, self.name)
        height, width = image.shape[:2]
        planes = {}
        for key, (folder, kind) in self.folders.items():
            path = self.split_dir / folder / f"{i}.npy"
            array = read_npy(path, self.name)
            if kind == CLASSES:
                planes[key] = np.rint(check_shape(array, (height, width), path, self.name)).astype(np.int64)
            else:
                planes[key] = check_shape(array, (height, width, 3 if kind == NORMALS else 1), path, self.name)
        if self.edges:
            planes["edges"] = label_edges(planes["segmentation"])
        return image, planes


def _split_dir(root: str | None, name: str, split: str) -> Path:
    return require_dir(dataset_root(root, name) / FOLDER_OF_SPLIT[split], name, f"{split} split")


@register_dataset("nyuv2", NyuOptions)
def nyuv2(*, split: str, size: int, num_samples: int | None, seed: int, cache_dir: str | None,
          root: str | None, options: NyuOptions) -> NpyDense:
    """NYUv2 (13-class segmentation, depth in metres, surface normals) from MTAN's ``.npy`` files."""
    folders = {"segmentation": ("label", CLASSES), "depth": ("depth", DEPTH), "normals": ("normal", NORMALS)}
    return NpyDense("nyuv2", _split_dir(root, "nyuv2", split), folders, classes=13, edges=options.edges, size=size,
                    num_samples=num_samples, augment=options.augment if split == "train" else None)


@register_dataset("cityscapes", CityscapesOptions)
def cityscapes(*, split: str, size: int, num_samples: int | None, seed: int, cache_dir: str | None,
               root: str | None, options: CityscapesOptions) -> NpyDense:
    """Cityscapes (2/7/19-class segmentation, disparity) from MTAN's ``.npy`` files."""
    split_dir = _split_dir(root, "cityscapes", split)
    label = f"label_{options.classes}"
    if not (split_dir / label).is_dir() and (split_dir / "label").is_dir():
        label = "label"
    folders = {"segmentation": (label, CLASSES), "disparity": ("depth", DISPARITY)}
    return NpyDense("cityscapes", split_dir, folders, classes=options.classes, edges=options.edges, size=size,
                    num_samples=num_samples, augment=options.augment if split == "train" else None)
