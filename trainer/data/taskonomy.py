"""``taskonomy``: the Taskonomy release layout (StanfordVL/taskonomy ``data/README.md``), as
tstandley/taskgrouping's ``taskonomy_loader.py`` reads it.

    root/rgb/<building>/point_<P>_view_<V>_domain_rgb.png
    root/<domain>/<building>/point_<P>_view_<V>_domain_<domain>.png

The rgb file's name with ``domain_rgb`` replaced by ``domain_<domain>`` is the label file (the
reference loader replaces ``rgb`` in the whole path). ``data.options.buildings`` names the
buildings of each split, as a list or as a text file (one building per line, relative to root:
e.g. taskgrouping's ``train_models.txt``); the tiny split has 25 / 5 / 5 buildings.
``data.options.domains`` picks the labels to read (default DMTG's Taskonomy-5). Decoding
(taskgrouping's normalisations, except that depth stays in metres for the depth task):

| domain | label key | value |
|---|---|---|
| segment_semantic | segmentation | uint8 ids; 0 = uncertain → ignore 255, else id − 1 (17 classes, 0 = background) |
| depth_zbuffer | depth | uint16 / 512 → metres; 0 (invalid) where raw ≥ ``max_depth_raw`` (2^13) |
| normal | normals | RGB → 2·x/255 − 1, zeroed (invalid) where the depth is |
| edge_texture | edge_texture | uint16 → (e − 718) / 1070 |
| edge_occlusion | edge_occlusion | uint16 → (e − 56.0248) / 239.1265 |
| keypoints2d | keypoints2d | uint16 → (k − 50) / 100 |
| reshading | reshading | channel mean / 255 → (r − 0.4962) / 0.2846 |
| principal_curvature | principal_curvature | first two channels / 255, minus (0.5175, 0.4987), over (0.1373, 0.0359) |

DMTG resizes every image bilinearly to 256 × 256 (``data.size: 256``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from taskfold.trainer.config import ConfigError
from taskfold.trainer.data.base import DatasetInfo, check_known, register_dataset
from taskfold.trainer.data.dense import (CLASSES, DEPTH, MAP, NORMALS,
                                         AugmentedOptions, AugmentOptions, DenseFiles, chw)
from taskfold.trainer.data.files import dataset_root, limit, read_image, read_lines, require_dir, require_file
from taskfold.trainer.data.idx import DatasetUnavailable
from taskfold.trainer.data.mtan import IMAGENET_MEAN, IMAGENET_STD

DEPTH_UNITS_PER_METRE = 512.0
IGNORE_INDEX = 255
SEGMENT_CLASSES = 17
# domain -> (label key, kind, shift, scale): value = (raw - shift) / scale for the plain maps.
DOMAINS: dict[str, tuple[str, str, tuple[float, ...], tuple[float, ...]]] = {
    "segment_semantic": ("segmentation", CLASSES, (), ()),
    "depth_zbuffer": ("depth", DEPTH, (), ()),
    "normal": ("normals", NORMALS, (), ()),
    "edge_texture": ("edge_texture", MAP, (718.0,), (1070.0,)),
    "edge_occlusion": ("edge_occlusion", MAP, (56.0248,), (239.1265,)),
    "keypoints2d": ("keypoints2d", MAP, (50.0,), (100.0,)),
    "reshading": ("reshading", MAP, (0.4962,), (0.2846,)),
    "principal_curvature": ("principal_curvature", MAP, (0.5175, 0.4987), (0.1373, 0.0359)),
}
TASKONOMY5 = ["segment_semantic", "depth_zbuffer", "normal", "keypoints2d", "edge_texture"]


@dataclass
class TaskonomyOptions(AugmentedOptions):
    buildings: dict = field(default_factory=dict)  # split -> list of names, or a text file under root
    domains: list[str] = field(default_factory=lambda: list(TASKONOMY5))
    max_depth_raw: int = 2 ** 13

    def check(self, size: int | tuple[int, int]) -> None:
        super().check(size)
        check_known("domains", self.domains, DOMAINS)


def label_path(root: Path, rgb: Path, domain: str) -> Path:
    return root / domain / rgb.parent.name / rgb.name.replace("domain_rgb", f"domain_{domain}")


def _buildings(root: Path, opts: TaskonomyOptions, split: str) -> list[str]:
    value = opts.buildings.get(split)
    if isinstance(value, str):
        return read_lines(root / value, "taskonomy", f"{split} building list")
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise ConfigError(f"data.options.buildings.{split}: the {split} buildings, as a list of names or a text "
                      "file under data.root with one name per line (the tiny split: 25 / 5 / 5 buildings)")


class Taskonomy(DenseFiles):
    name = "taskonomy"

    def __init__(self, root: Path, buildings: list[str], opts: TaskonomyOptions, *, size: int,
                 num_samples: int | None, augment: AugmentOptions | None) -> None:
        self.root, self.max_depth_raw = root, opts.max_depth_raw
        self.domains = list(opts.domains)
        # Normals are masked where depth is invalid, as the reference loader does without mask files.
        self.read = self.domains + (["depth_zbuffer"] if "normal" in self.domains and
                                    "depth_zbuffer" not in self.domains else [])
        files: list[Path] = []
        for building in buildings:
            folder = require_dir(root / "rgb" / building, self.name, f"rgb building {building!r}")
            files += sorted(folder.glob("*_domain_rgb.png"))
        if not files:
            raise DatasetUnavailable(f"{self.name}: no *_domain_rgb.png images under {root / 'rgb'} "
                                     f"for buildings {', '.join(buildings)}")
        self.files = limit(files, num_samples)
        for rgb in self.files:
            for domain in self.read:
                require_file(label_path(root, rgb, domain), self.name, f"{domain} label for {rgb.name}")
        labels: dict[str, dict] = {}
        kinds: dict[str, str] = {}
        for domain in self.domains:
            key, kind, _, _ = DOMAINS[domain]
            kinds[key] = kind
            labels[key] = ({"classes": SEGMENT_CLASSES, "ignore_index": IGNORE_INDEX} if kind == CLASSES
                           else {"channels": len(DOMAINS[domain][2])} if kind == MAP else {})
        info = DatasetInfo(image_size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=labels)
        super().__init__(size=size, info=info, kinds=kinds, augment=augment)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The rgb image and each read domain's file as stored (decoded in :meth:`finish`)."""
        rgb = self.files[index]
        image = read_image(rgb, self.name, "RGB")
        return image, {domain: read_image(label_path(self.root, rgb, domain), self.name) for domain in self.read}

    def finish(self, planes: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        valid = planes["depth_zbuffer"] < self.max_depth_raw if "depth_zbuffer" in planes else None
        labels = {}
        for domain in self.domains:
            key, kind, shift, scale = DOMAINS[domain]
            value = planes[domain]
            if kind == CLASSES:
                ids = (value[..., 0] if value.ndim == 3 else value).astype(np.int64)
                labels[key] = torch.from_numpy(np.where(ids == 0, IGNORE_INDEX, ids - 1))
            elif kind == DEPTH:
                labels[key] = chw(np.where(valid, value / DEPTH_UNITS_PER_METRE, 0.0))
            elif kind == NORMALS:
                normals = 2.0 * value[..., :3].astype(np.float32) / 255.0 - 1.0
                labels[key] = chw(np.where(valid[..., None], normals, 0.0))
            else:
                maps = value.astype(np.float32)
                if domain == "reshading":
                    maps = maps[..., :3].mean(axis=-1) / 255.0
                elif domain == "principal_curvature":
                    maps = maps[..., :2] / 255.0
                labels[key] = chw((maps - np.array(shift, np.float32)) / np.array(scale, np.float32))
        return labels


@register_dataset("taskonomy", TaskonomyOptions)
def taskonomy(*, split: str, size: int, num_samples: int | None, seed: int, cache_dir: str | None,
              root: str | None, options: TaskonomyOptions) -> Taskonomy:
    """Taskonomy images of the split's buildings with the chosen domains' labels."""
    base = dataset_root(root, "taskonomy")
    return Taskonomy(base, _buildings(base, options, split), options, size=size, num_samples=num_samples,
                     augment=options.augment if split == "train" else None)
