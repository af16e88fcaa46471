"""synthscenes: procedurally rendered rooms with exact dense labels, so recipes need no downloads.

Each scene is a room (floor, back wall, two side walls) holding ``min_objects``..``max_objects``
boxes, spheres and vertical cylinders at random positions, sizes, turns and colours, with texture
noise, a checkered floor, a random camera pose and a random directional light
(:mod:`taskfold.trainer.data.render` draws them). The renderer knows the geometry, so every
label is exact:

- ``segmentation``: class per pixel, 0 floor, 1 wall, 2 box, 3 sphere, 4 cylinder
  (255 is declared as the ignore index but never produced);
- ``depth``: z-distance along the camera axis, in room units (every pixel hits a surface, so
  none carries the invalid value 0);
- ``normals``: unit surface normals in the camera frame (x right, y down, z forward);
- ``edges``: 1 where a pixel differs from a 4-neighbour in class, in normal direction by more
  than 30 degrees, or in surface with a relative depth jump over 5%;
- ``classification``: the *dominant primitive* of the scene, i.e. which of box (0),
  sphere (1), cylinder (2) covers the most pixels (ties go to the lower id). It is readable
  from the image alone, and object sizes are drawn so that the three classes come out about
  equally often.

Scene ``i`` of a split is drawn from its own seed ``(seed, split, i)``: the same index in two
splits is two different scenes, and the first ``n`` scenes do not depend on ``num_samples``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from taskfold.trainer.config import ConfigError
from taskfold.trainer.data.base import DatasetInfo, DatasetOptions, register_dataset
from taskfold.trainer.data.loader import as_key
from taskfold.trainer.data.render import BOX, CLASS_NAMES, CYLINDER, EMPTY_SLOT, SPHERE, Scenes, render

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
IGNORE_INDEX = 255
SCENE_CLASS_NAMES = ("box", "sphere", "cylinder")
OBJECT_KINDS = (BOX, SPHERE, CYLINDER)


@dataclass
class SynthScenesOptions(DatasetOptions):
    """``data.options`` of synthscenes."""

    min_objects: int = 2
    max_objects: int = 5
    image_noise: float = 0.02  # standard deviation of the sensor noise added to the [0, 1] image

    def check(self, size: int | tuple[int, int]) -> None:
        _image_shape(size)
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError("synthscenes: need 1 <= min_objects <= max_objects, "
                              f"got {self.min_objects} and {self.max_objects}")


# Per-channel mean/std of the uint8 images / 255, measured once on the 2,000 train images at
# 64x64 with seed 0 and default options; fixed so that every split and size normalises alike.
MEAN = (0.3252, 0.3254, 0.3263)
STD = (0.1440, 0.1430, 0.1447)
# Bump when the renderer or the scene distribution changes, so that old cache files are not reused.
CACHE_FORMAT = 1
_ARRAY_KEYS = ("image", "segmentation", "depth", "normals", "edges", "classification")
log = logging.getLogger(__name__)


def _object_half_size(kind: int, rng: np.random.Generator) -> np.ndarray:
    """Half extents of a new object; the ranges balance how often each kind dominates a scene."""
    if kind == BOX:
        return rng.uniform(0.22, 0.55, size=3)
    if kind == SPHERE:
        return np.full(3, rng.uniform(0.35, 0.72))
    radius = rng.uniform(0.22, 0.45)
    return np.array([radius, rng.uniform(0.35, 0.9), radius])


def _sample_scene(rng: np.random.Generator, scenes: Scenes, row: int, num_objects: int) -> None:
    """Draw scene ``row`` of ``scenes`` in place; objects are spread over the visible floor."""
    scenes.camera_height[row] = rng.uniform(1.2, 2.0)
    scenes.pitch[row] = np.radians(rng.uniform(15.0, 30.0))
    scenes.yaw[row] = np.radians(rng.uniform(-6.0, 6.0))
    scenes.room_half_width[row] = half_width = rng.uniform(2.5, 4.0)
    scenes.room_depth[row] = depth = rng.uniform(6.5, 9.0)
    elevation, azimuth = np.radians(rng.uniform(25.0, 75.0)), rng.uniform(0.0, 2 * np.pi)
    horizontal = np.cos(elevation)
    scenes.light_dir[row] = [horizontal * np.sin(azimuth), np.sin(elevation), -horizontal * np.cos(azimuth)]
    scenes.ambient[row] = rng.uniform(0.3, 0.5)
    scenes.floor_color[row] = rng.uniform(0.25, 0.85, size=3)
    scenes.wall_color[row] = rng.uniform(0.3, 0.9, size=3)
    scenes.floor_tile[row] = rng.uniform(0.4, 1.0)
    scenes.noise_seed[row] = rng.integers(0, 2**62)
    footprints: list[tuple[float, float, float]] = []
    for slot in range(num_objects):
        kind = OBJECT_KINDS[rng.integers(len(OBJECT_KINDS))]
        half = _object_half_size(kind, rng)
        reach = float(np.hypot(half[0], half[2]))
        # Rejection sampling keeps objects apart; after 30 misses the last draw is kept (the
        # renderer handles interpenetrating objects exactly, it is just a less tidy scene).
        for _ in range(30):
            z = rng.uniform(2.2, depth - 1.2)
            # Within 0.3 z of the axis the object's centre stays in view for every camera pose.
            x = rng.uniform(-1.0, 1.0) * min(0.3 * z, half_width - reach - 0.05)
            if all(np.hypot(x - ox, z - oz) > reach + r + 0.05 for ox, oz, r in footprints):
                break
        footprints.append((x, z, reach))
        scenes.kind[row, slot] = kind
        scenes.position[row, slot] = (x, z)
        scenes.half_size[row, slot] = half
        scenes.angle[row, slot] = rng.uniform(0.0, np.pi / 2) if kind == BOX else 0.0
        scenes.color[row, slot] = rng.uniform(0.15, 0.95, size=3)


def sample_scenes(seeds: list[np.random.SeedSequence], *, min_objects: int, max_objects: int) -> Scenes:
    """One scene per seed; the object count of each is uniform in ``[min_objects, max_objects]``."""
    n, slots = len(seeds), max_objects
    scenes = Scenes(
        camera_height=np.zeros(n), pitch=np.zeros(n), yaw=np.zeros(n), room_half_width=np.zeros(n),
        room_depth=np.zeros(n), light_dir=np.zeros((n, 3)), ambient=np.zeros(n), floor_color=np.zeros((n, 3)),
        wall_color=np.zeros((n, 3)), floor_tile=np.zeros(n), noise_seed=np.zeros(n, dtype=np.int64),
        kind=np.full((n, slots), EMPTY_SLOT), position=np.zeros((n, slots, 2)), half_size=np.ones((n, slots, 3)),
        angle=np.zeros((n, slots)), color=np.zeros((n, slots, 3)),
    )
    for row, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        _sample_scene(rng, scenes, row, int(rng.integers(min_objects, max_objects + 1)))
    return scenes


def dominant_primitive(segmentation: np.ndarray) -> np.ndarray:
    """Scene class per image ``(B,)``: index into SCENE_CLASS_NAMES of the kind with most pixels."""
    flat = segmentation.reshape(len(segmentation), -1)
    counts = np.stack([(flat == kind).sum(axis=1) for kind in OBJECT_KINDS], axis=1)
    return counts.argmax(axis=1).astype(np.int64)


def render_split(split: str, height: int, width: int, num_samples: int, seed: int, *, min_objects: int,
                 max_objects: int, image_noise: float) -> dict[str, np.ndarray]:
    """Render a whole split as numpy arrays (image uint8 NHWC, labels as in :func:`render`)."""
    seeds = [np.random.SeedSequence([seed, SPLIT_CODES[split], index]) for index in range(num_samples)]
    scenes = sample_scenes(seeds, min_objects=min_objects, max_objects=max_objects)
    arrays = render(scenes, height, width, image_noise=image_noise)
    arrays["classification"] = dominant_primitive(arrays["segmentation"])
    return {key: arrays[key] for key in _ARRAY_KEYS}


def _cache_path(cache_dir: str | os.PathLike, params: dict) -> Path:
    """``synthscenes-<split>-<hash>.npz``; the hash covers every parameter that changes the data."""
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **params}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"synthscenes-{params['split']}-{key[:20]}.npz"


def _load_or_render(cache_dir: str | os.PathLike | None, params: dict) -> dict[str, np.ndarray]:
    """Render, or reload a previous rendering from ``cache_dir``, written atomically on a miss."""
    if cache_dir is None:
        return render_split(**params)
    path = _cache_path(cache_dir, params)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {key: stored[key] for key in _ARRAY_KEYS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("taskfold: warning: cache file %s is unreadable (%s); rendering it again",
                        path, type(exc).__name__)
    arrays = render_split(**params)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file in the same folder, then rename: readers never see half a file.
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
    return arrays


class SynthScenes(Dataset):
    """A rendered split held in memory in compact dtypes, converted batch by batch.

    Stored (zero-copy views of the rendered arrays): image uint8 ``(N, H, W, 3)``, segmentation
    and edges uint8 ``(N, H, W)``, depth float32 ``(N, H, W)``, normals float32 ``(N, H, W, 3)``,
    classification int64 ``(N,)`` — about half the bytes of the float32/int64 tensors a batch
    holds (2,000 images at 128 px: 0.7 GB instead of 1.4 GB). A batch (see
    :mod:`taskfold.trainer.data.loader`) is ``images`` float32 ``(B, 3, H, W)``, normalised with
    ``info.mean`` / ``info.std``, and ``targets``: ``segmentation`` int64 ``(B, H, W)``, ``depth``
    float32 ``(B, 1, H, W)``, ``normals`` float32 ``(B, 3, H, W)``, ``edges`` float32
    ``(B, 1, H, W)``, ``classification`` int64 ``(B,)``. Conversion is elementwise, so a batch
    holds exactly the values a whole-split conversion would.
    """

    in_memory = True

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.stored = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}
        self._mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(STD).view(1, 3, 1, 1)
        self.info = DatasetInfo(
            image_size=tuple(self.stored["image"].shape[1:3]),
            mean=MEAN,
            std=STD,
            labels={
                "segmentation": {"classes": len(CLASS_NAMES), "ignore_index": IGNORE_INDEX,
                                 "class_names": list(CLASS_NAMES)},
                "depth": {},
                "normals": {},
                "edges": {},
                "classification": {"classes": len(SCENE_CLASS_NAMES), "class_names": list(SCENE_CLASS_NAMES)},
            },
        )

    def __len__(self) -> int:
        return len(self.stored["image"])

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.tensor([as_key(k).index for k in keys], dtype=torch.int64)
        s = {key: value[idx] for key, value in self.stored.items()}
        image = s["image"].permute(0, 3, 1, 2).float().div_(255.0)
        targets = {
            "segmentation": s["segmentation"].long(),
            "depth": s["depth"].unsqueeze(1),
            "normals": s["normals"].permute(0, 3, 1, 2).contiguous(),
            "edges": s["edges"].float().unsqueeze(1),
            "classification": s["classification"].long(),
        }
        return ((image - self._mean) / self._std).contiguous(), targets

    def __getitem__(self, key) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, targets = self.__getitems__([key])
        return images[0], {name: value[0] for name, value in targets.items()}


def _image_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if min(height, width) < 8:
        raise ConfigError(f"synthscenes: size must be at least 8 pixels, got {size!r}")
    return int(height), int(width)


@register_dataset("synthscenes", SynthScenesOptions)
def build_synthscenes(*, split: str, size: int | tuple[int, int], num_samples: int, seed: int,
                      cache_dir: str | os.PathLike | None, options: SynthScenesOptions) -> SynthScenes:
    """Render (or reload from ``cache_dir``) one split of synthscenes; ``size`` is the side of a
    square image or ``(height, width)``."""
    if split not in SPLIT_CODES:
        raise ConfigError(f"synthscenes: unknown split {split!r}; expected one of {', '.join(SPLIT_CODES)}")
    if num_samples < 1 or seed < 0:
        raise ConfigError(f"synthscenes: need num_samples >= 1 and seed >= 0, got {num_samples} and {seed}")
    height, width = _image_shape(size)
    params = {"split": split, "height": height, "width": width, "num_samples": int(num_samples),
              "seed": int(seed), "min_objects": options.min_objects, "max_objects": options.max_objects,
              "image_noise": float(options.image_noise)}
    return SynthScenes(_load_or_render(cache_dir, params))
