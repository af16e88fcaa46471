"""``pascal_context``: the PASCAL multi-task layout (``PASCAL_MT``) of ASTMT, BMTAS and MTI-Net
(brdav/bmtas ``src/dataset.py``, SimonVandenhende/Multi-Task-Learning-PyTorch
``data/pascal_context.py``).

    root/JPEGImages/<id>.jpg
    root/ImageSets/Context/{train,val}.txt          one id per line (4998 / 5105 images)
    root/semseg/pascal-context/<id>.png             21 classes, 255 = ignore  (semseg/VOC12/ is used first if there)
    root/human_parts/<id>.mat                       MATLAB struct ``anno`` (objects → class index, mask, parts)
    root/normals_distill/<id>.png                   RGB normals
    root/sal_distill/<id>.png                       saliency, 0-255
    root/pascal-context/trainval/<id>.mat           ``LabelMap`` of the PASCAL-Context classes

Label keys (the reference loaders' decoding; the papers test on ``val``, so ``test`` reads it):
``segmentation`` int64 (21 classes, 255 ignore); ``human_parts`` int64, 0 background + 6 parts
of people (class 15), all 255 on images without annotated people; ``normals`` 2·x/255 − 1, zeroed
(invalid) on pixels whose LabelMap class has no NYU counterpart (:data:`NORMAL_CLASSES`);
``saliency`` float (x/255 > 0.5); ``edges`` float, the thinned Laplacian of the LabelMap
(:func:`label_edges`). BMTAS normalises images to [-1, 1] (mean = std = 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from taskfold.trainer.data.base import DatasetInfo, check_known, register_dataset
from taskfold.trainer.data.dense import (CLASSES, MAP, NORMALS,
                                         AugmentedOptions, AugmentOptions, DenseFiles, chw)
from taskfold.trainer.data.edges import label_edges
from taskfold.trainer.data.files import (check_shape, dataset_root, limit, read_image, read_lines, read_mat,
                                         require_dir, require_file)
from taskfold.trainer.data.idx import DataFormatError

IGNORE_INDEX = 255
SEMSEG_CLASSES = 21
PERSON = 15
# part name -> label of the 6-part setting (the references' HUMAN_PART[6]).
HUMAN_PARTS_6 = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1, "rear": 1, "rebrow": 1,
    "reye": 1, "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3, "lhand": 4, "llarm": 4, "rhand": 4, "rlarm": 4,
    "luleg": 5, "ruleg": 5, "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6,
}
# PASCAL-Context class ids (LabelMap values) whose class name is also an NYUv2 class (except
# "unknown"), plus tvmonitor: where the distilled normals are kept. Derived from the reference
# loaders' db_info/{nyu,context}_classes.json.
NORMAL_CLASSES = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53,
    55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113,
    115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193,
    195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250,
    251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293,
    295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357,
    368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421,
    423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
))
NORMAL_CLASS_IDS = np.array(sorted(NORMAL_CLASSES))
TASK_LABELS = ("segmentation", "human_parts", "normals", "saliency", "edges")


@dataclass
class PascalOptions(AugmentedOptions):
    labels: list[str] = field(default_factory=lambda: list(TASK_LABELS))
    augment: AugmentOptions = field(default_factory=lambda: AugmentOptions(scales=[1.0, 1.25, 1.5, 1.75, 2.0]))

    def check(self, size: int | tuple[int, int]) -> None:
        super().check(size)
        check_known("labels", self.labels, TASK_LABELS)


def human_parts_map(anno: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """int64 (H, W) of part labels from a loaded ``anno`` struct; all 255 without annotated people.

    ``anno[0, 0][1][0]`` are the objects; an object's fields are (class, class_ind, mask, parts),
    a part's (part_name, mask).
    """
    target = np.zeros(shape, np.int64)
    for obj in anno[0, 0][1][0]:
        parts = obj[3]
        if int(np.asarray(obj[1]).ravel()[0]) != PERSON or parts.size == 0:
            continue
        for part in parts[0]:
            name = str(np.asarray(part[0]).ravel()[0])
            target[np.asarray(part[1]).astype(bool)] = HUMAN_PARTS_6[name]
    return target if target.any() else np.full(shape, IGNORE_INDEX, np.int64)


class PascalContext(DenseFiles):
    name = "pascal_context"

    def __init__(self, root: Path, split: str, wanted: list[str], *, size: int, num_samples: int | None,
                 augment: AugmentOptions | None) -> None:
        self.root, self.wanted = root, wanted
        require_dir(root / "JPEGImages", self.name, "image")
        ids = limit(read_lines(root / "ImageSets" / "Context" / f"{'train' if split == 'train' else 'val'}.txt",
                               self.name, f"{split} split list"), num_samples)
        self.files: list[dict[str, Path]] = []
        for image_id in ids:
            voc = root / "semseg" / "VOC12" / f"{image_id}.png"
            paths = {
                "image": root / "JPEGImages" / f"{image_id}.jpg",
                "segmentation": voc if voc.is_file() else root / "semseg" / "pascal-context" / f"{image_id}.png",
                "human_parts": root / "human_parts" / f"{image_id}.mat",
                "normals": root / "normals_distill" / f"{image_id}.png",
                "saliency": root / "sal_distill" / f"{image_id}.png",
                "label_map": root / "pascal-context" / "trainval" / f"{image_id}.mat",
            }
            needed = ["image", *(k for k in wanted if k != "edges")]
            if "edges" in wanted or "normals" in wanted:
                needed.append("label_map")
            for key in needed:
                require_file(paths[key], self.name, f"{key.replace('_', ' ')} file of image {image_id}")
            self.files.append(paths)
        every = {"segmentation": (CLASSES, {"classes": SEMSEG_CLASSES, "ignore_index": IGNORE_INDEX}),
                 "human_parts": (CLASSES, {"classes": 1 + max(HUMAN_PARTS_6.values()), "ignore_index": IGNORE_INDEX}),
                 "normals": (NORMALS, {}), "saliency": (MAP, {}), "edges": (MAP, {})}
        info = DatasetInfo(image_size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                           labels={key: every[key][1] for key in wanted})
        super().__init__(size=size, info=info, kinds={key: every[key][0] for key in wanted}, augment=augment)

    def __len__(self) -> int:
        return len(self.files)

    def _label_map(self, paths: dict[str, Path], shape: tuple[int, int]) -> np.ndarray:
        mat = read_mat(paths["label_map"], self.name)
        if "LabelMap" not in mat:
            raise DataFormatError(f"{self.name}: {paths['label_map']} has no LabelMap")
        return check_shape(mat["LabelMap"], shape, paths["label_map"], self.name)

    def decode(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The image and its planes as stored; the edge map is made here, from the full-resolution
        label map (the references' order), the rest is decoded pixel by pixel in :meth:`finish`."""
        paths = self.files[index]
        image = read_image(paths["image"], self.name, "RGB")
        shape = image.shape[:2]
        planes: dict[str, np.ndarray] = {}
        if {"edges", "normals"} & set(self.wanted):
            planes["label_map"] = self._label_map(paths, shape)
        if "segmentation" in self.wanted:
            planes["segmentation"] = check_shape(read_image(paths["segmentation"], self.name), shape,
                                                 paths["segmentation"], self.name)
        if "human_parts" in self.wanted:
            mat = read_mat(paths["human_parts"], self.name)
            try:
                planes["human_parts"] = human_parts_map(mat["anno"], shape)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise DataFormatError(f"{self.name}: {paths['human_parts']} is not a PASCAL-Part "
                                      f"annotation ({type(exc).__name__}: {exc})") from None
        if "normals" in self.wanted:
            planes["normals"] = check_shape(read_image(paths["normals"], self.name, "RGB"), (*shape, 3),
                                            paths["normals"], self.name)
        if "saliency" in self.wanted:
            planes["saliency"] = check_shape(read_image(paths["saliency"], self.name, "L"), shape,
                                             paths["saliency"], self.name)
        if "edges" in self.wanted:
            planes["edges"] = label_edges(planes["label_map"])
        return image, planes

    def finish(self, planes: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        labels: dict[str, torch.Tensor] = {}
        if "segmentation" in planes:
            labels["segmentation"] = torch.from_numpy(planes["segmentation"].astype(np.int64))
        if "human_parts" in planes:
            labels["human_parts"] = torch.from_numpy(planes["human_parts"])
        if "normals" in planes:
            normals = 2.0 * planes["normals"].astype(np.float32) / 255.0 - 1.0
            keep = np.isin(planes["label_map"], NORMAL_CLASS_IDS)
            labels["normals"] = chw(np.where(keep[..., None], normals, 0.0))
        if "saliency" in planes:
            labels["saliency"] = chw((planes["saliency"].astype(np.float32) / 255.0 > 0.5).astype(np.float32))
        if "edges" in planes:
            labels["edges"] = chw(planes["edges"])
        return labels


@register_dataset("pascal_context", PascalOptions)
def pascal_context(*, split: str, size: int, num_samples: int | None, seed: int, cache_dir: str | None,
                   root: str | None, options: PascalOptions) -> PascalContext:
    """PASCAL-Context images with the five multi-task labels (``labels`` picks a subset)."""
    return PascalContext(dataset_root(root, "pascal_context"), split, list(options.labels), size=size,
                         num_samples=num_samples, augment=options.augment if split == "train" else None)
