"""Tiny copies of the papers' datasets, written in exactly their on-disk formats (see
trainer/data/{mtan,celeba,taskonomy,pascal_context}.py and ../shared/DATASETS.md), with a few
known values the tests check after decoding. Images are 16 x 16 (CelebA 22 x 18) so that a
``data.size`` of 16 leaves every pixel where it was; ``side``/``shape`` write them at another size
(benchmarks/bench_loaders.py: the recipes' resolutions)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 16


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_nyuv2(root: Path, counts=(("train", 4), ("val", 2)), side: int = SIDE) -> Path:
    """Sample 0 of train: label -1 at (0, 0), depth 2.5 m at (3, 4), 0 (invalid) at (5, 5),
    normal (0.6, 0, 0.8) at (3, 4), zero at (5, 5)."""
    for split, n in counts:
        for i in range(n):
            rng = _rng(i + (100 if split == "val" else 0))
            image = rng.random((side, side, 3)).astype(np.float32)
            label = rng.integers(0, 13, (side, side)).astype(np.float32)
            depth = rng.uniform(0.5, 9.0, (side, side, 1)).astype(np.float32)
            normal = rng.normal(size=(side, side, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            label[0, 0] = -1
            depth[3, 4, 0], depth[5, 5, 0] = 2.5, 0.0
            normal[3, 4], normal[5, 5] = (0.6, 0.0, 0.8), 0.0
            for folder, array in (("image", image), ("label", label), ("depth", depth), ("normal", normal)):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", array)
    return root


def write_cityscapes(root: Path, label_folder: str = "label_7", classes: int = 7, side: int = SIDE) -> Path:
    """Sample 0 of train: label -1 at (0, 0); disparity 0.25 at (2, 3), 0 (invalid) at (4, 4)."""
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            rng = _rng(i + 7)
            label = rng.integers(0, classes, (side, side)).astype(np.float32)
            disparity = rng.uniform(0.01, 0.49, (side, side, 1)).astype(np.float32)
            label[0, 0], disparity[2, 3, 0], disparity[4, 4, 0] = -1, 0.25, 0.0
            for folder, array in (("image", rng.random((side, side, 3)).astype(np.float32)),
                                  (label_folder, label), ("depth", disparity)):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", array)
    return root


CELEBA_NAMES = [f"Attr_{k}" for k in range(38)] + ["Black_Hair", "Wearing_Hat"]


def celeba_row(i: int) -> list[int]:
    """Image i's ±1 attributes."""
    return [1 if (i + k) % 3 == 0 else -1 for k in range(len(CELEBA_NAMES))]


def write_celeba(root: Path, n: int = 6, shape: tuple[int, int] = (22, 18)) -> Path:
    """Images 000001..n; partition: 1-3 train, 4-5 val, 6.. test. Images are 18 wide, 22 high."""
    (root / "img_align_celeba").mkdir(parents=True)
    attr = [str(n), " ".join(CELEBA_NAMES)]
    partition = []
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        pixels = np.full((*shape, 3), 40 * (i % 5), np.uint8)
        pixels[:2], pixels[-2:] = 255, 255  # rows the centre crop removes
        Image.fromarray(pixels).save(root / "img_align_celeba" / name, quality=95)
        attr.append(name + "  " + " ".join(f"{v:2d}" for v in celeba_row(i)))
        partition.append(f"{name} {0 if i <= 3 else 1 if i <= 5 else 2}")
    (root / "list_attr_celeba.txt").write_text("\n".join(attr) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return root


TASKONOMY_BUILDINGS = {"train": ["allensville", "beechwood"], "val": ["collierville"], "test": ["darden"]}


def write_taskonomy(root: Path, per_building: int = 2, side: int = SIDE) -> Path:
    """First train image (allensville, point_0): depth raw 1024 (2 m) at (1, 2), raw 9000 (masked) at
    (3, 3); segment_semantic 0 at (0, 0) and 5 at (1, 1); keypoints2d 150 at (2, 2);
    edge_texture 718 at (2, 2); normal RGB (255, 127, 0) at (1, 2)."""
    for split, buildings in TASKONOMY_BUILDINGS.items():
        (root / f"{split}_models.txt").write_text("\n".join(buildings) + "\n")
        for b, building in enumerate(buildings):
            for p in range(per_building):
                rng = _rng(10 * b + p)
                stem = f"point_{p}_view_0_domain_"
                depth = rng.integers(300, 6000, (side, side)).astype(np.uint16)
                depth[1, 2], depth[3, 3] = 1024, 9000
                seg = rng.integers(1, 18, (side, side)).astype(np.uint8)
                seg[0, 0], seg[1, 1] = 0, 5
                keypoints = rng.integers(0, 400, (side, side)).astype(np.uint16)
                edges = rng.integers(0, 3000, (side, side)).astype(np.uint16)
                keypoints[2, 2], edges[2, 2] = 150, 718
                normal = rng.integers(0, 256, (side, side, 3)).astype(np.uint8)
                normal[1, 2] = (255, 127, 0)
                images = {"rgb": rng.integers(0, 256, (side, side, 3)).astype(np.uint8), "depth_zbuffer": depth,
                          "segment_semantic": seg, "keypoints2d": keypoints, "edge_texture": edges, "normal": normal}
                for domain, array in images.items():
                    folder = root / domain / building
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(array).save(folder / f"{stem}{domain}.png")
    return root


PASCAL_IDS = {"train": ["2008_000002", "2008_000003", "2008_000007"], "val": ["2008_000009", "2008_000016"]}


def _anno(objects: list[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> np.ndarray:
    """A PASCAL-Part ``anno`` struct: (imname, objects(class, class_ind, mask, parts(part_name, mask)))."""
    part_type = [("part_name", object), ("mask", object)]
    object_type = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
    objs = np.zeros((1, len(objects)), dtype=object_type)
    for k, (class_ind, mask, parts) in enumerate(objects):
        part_array = np.zeros((1, len(parts)), dtype=part_type)
        for j, (name, part_mask) in enumerate(parts):
            part_array[0, j] = (name, part_mask.astype(np.uint8))
        objs[0, k] = ("person" if class_ind == 15 else "dog", np.array([[class_ind]], np.uint8),
                      mask.astype(np.uint8), part_array if parts else np.zeros((0, 0)))
    anno = np.zeros((1, 1), dtype=[("imname", object), ("objects", object)])
    anno[0, 0] = ("x", objs)
    return anno


def pascal_label_map(side: int = SIDE) -> np.ndarray:
    """Left half class 284 (person: has normals), right half 360 (sky: none), a 4x4 block of 397
    (table) at rows/cols 2..5."""
    label_map = np.full((side, side), 284, np.uint16)
    label_map[:, side // 2:] = 360
    label_map[2:6, 2:6] = 397
    return label_map


def write_pascal(root: Path, side: int = SIDE) -> Path:
    """Image 0 of train has a person with head (rows 0-3, cols 0-3) and torso (rows 4-7, cols 0-3)
    and a dog with parts; the others have no person. Semseg 255 at (0, 0); saliency 200 at
    (1, 1), 100 at (1, 2)."""
    from scipy.io import savemat

    for folder in ("JPEGImages", "ImageSets/Context", "semseg/pascal-context", "human_parts", "normals_distill",
                   "sal_distill", "pascal-context/trainval"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, ids in PASCAL_IDS.items():
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for n, image_id in enumerate(ids):
            rng = _rng(n + 50)
            Image.fromarray(rng.integers(0, 256, (side, side, 3)).astype(np.uint8)).save(
                root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            seg = rng.integers(0, 21, (side, side)).astype(np.uint8)
            seg[0, 0] = 255
            Image.fromarray(seg, mode="L").convert("P").save(root / "semseg" / "pascal-context" / f"{image_id}.png")
            Image.fromarray(rng.integers(0, 256, (side, side, 3)).astype(np.uint8)).save(
                root / "normals_distill" / f"{image_id}.png")
            sal = rng.integers(0, 256, (side, side)).astype(np.uint8)
            sal[1, 1], sal[1, 2] = 200, 100
            Image.fromarray(sal).save(root / "sal_distill" / f"{image_id}.png")
            savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat", {"LabelMap": pascal_label_map(side)})
            head, torso, paw = (np.zeros((side, side), bool) for _ in range(3))
            head[0:4, 0:4], torso[4:8, 0:4], paw[10:12, 10:12] = True, True, True
            dog = (12, paw, [("lfleg", paw)])
            objects = [(15, head | torso, [("head", head), ("torso", torso)]), dog] if (split, n) == ("train", 0) \
                else [dog]
            savemat(root / "human_parts" / f"{image_id}.mat", {"anno": _anno(objects)})
    return root
