"""The on-disk loaders on tiny fixtures written in the papers' formats: decoded values (a known
pixel's depth in metres, ignore values, normals after a flip, an attribute row, a human-parts
mask, the edge map of a label map) and the one-line errors that name a path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_runner import assert_user_error, run_cli
from dataset_fixtures import (CELEBA_NAMES, PASCAL_IDS, TASKONOMY_BUILDINGS, celeba_row, pascal_label_map,
                              write_celeba, write_cityscapes, write_nyuv2, write_pascal, write_taskonomy)
from taskfold.trainer.config import ConfigError
from taskfold.trainer.data import create_dataset
from taskfold.trainer.data.dense import nearest_index
from taskfold.trainer.data.edges import label_edges, laplacian, thin
from taskfold.trainer.data.idx import DataFormatError, DatasetUnavailable
from taskfold.trainer.data.loader import SampleKey, load_batch
from taskfold.trainer.data.pascal_context import NORMAL_CLASSES

NO_AUGMENT = {"augment": {"enabled": False}}


def build(name, root, split="train", size=16, num_samples=None, **options):
    return create_dataset(name, split, size=size, num_samples=num_samples, root=str(root), **options)


def raw(image: torch.Tensor, info) -> torch.Tensor:
    return image * torch.tensor(info.std).view(3, 1, 1) + torch.tensor(info.mean).view(3, 1, 1)


def test_nyuv2_values(tmp_path):
    root = write_nyuv2(tmp_path)
    data = build("nyuv2", root, **NO_AUGMENT)
    assert len(data) == 4 and len(build("nyuv2", root, "test")) == 2  # test reads val/
    image, t = data[0]
    stored = np.load(root / "train" / "image" / "0.npy")
    torch.testing.assert_close(raw(image, data.info), torch.from_numpy(stored).permute(2, 0, 1), atol=1e-6, rtol=0)
    assert t["segmentation"].dtype == torch.int64 and t["segmentation"][0, 0] == -1
    assert data.info.labels["segmentation"] == {"classes": 13, "ignore_index": -1}
    assert t["depth"][0, 3, 4] == 2.5 and t["depth"][0, 5, 5] == 0
    assert torch.allclose(t["normals"][:, 3, 4], torch.tensor([0.6, 0.0, 0.8])) and not t["normals"][:, 5, 5].any()


def test_training_flip_mirrors_labels_and_negates_normal_x(tmp_path):
    root = write_nyuv2(tmp_path)
    plain = build("nyuv2", root, **NO_AUGMENT)[0][1]
    flipping = build("nyuv2", root, augment={"scales": [1.0], "flip": True})
    flips = 0
    for seed in range(12):
        _, t = flipping[SampleKey(0, seed)]
        if torch.equal(t["depth"], plain["depth"]):
            assert torch.equal(t["normals"], plain["normals"])
            continue
        flips += 1
        assert torch.equal(t["depth"], plain["depth"].flip(-1))
        assert torch.equal(t["segmentation"], plain["segmentation"].flip(-1))
        assert t["normals"][0, 3, 16 - 1 - 4] == -0.6 and torch.equal(t["normals"][1:], plain["normals"][1:].flip(-1))
    assert 0 < flips < 12
    assert torch.equal(flipping[SampleKey(0, 3)][0], flipping[SampleKey(0, 3)][0])  # a key's draw is fixed


def test_zoom_divides_depth_by_the_scale(tmp_path):
    root = write_nyuv2(tmp_path)
    zoomed = build("nyuv2", root, size=16, augment={"scales": [2.0], "flip": False})
    _, t = zoomed[SampleKey(0, 1)]
    depth = np.load(root / "train" / "depth" / "0.npy")[..., 0]
    # An 8x8 window, each pixel repeated 2x2 by nearest resampling, then / 2.
    windows = [depth[r:r + 8, c:c + 8] for r in range(9) for c in range(9)]
    got = t["depth"][0, ::2, ::2].numpy()
    assert any(np.array_equal(got, w / 2) for w in windows)


def test_picking_raw_pixels_equals_torch_nearest_resampling():
    """The pipeline crops and resamples stored planes by index; torch's nearest mode on the
    decoded map must pick the same pixels, whatever the ratio."""
    rng = np.random.default_rng(1)
    for height, width, size in ((512, 512, 256), (375, 500, 512), (288, 384, 288), (17, 23, 5), (8, 8, 16)):
        plane = rng.integers(0, 2 ** 16, (height, width)).astype(np.int64)
        picked = plane[nearest_index(height, size)[:, None], nearest_index(width, size)]
        resampled = F.interpolate(torch.from_numpy(plane)[None, None].float(), size=(size, size), mode="nearest")
        assert np.array_equal(picked, resampled[0, 0].long().numpy())


def test_cityscapes_label_folders_and_disparity(tmp_path):
    root = write_cityscapes(tmp_path / "a")
    data = build("cityscapes", root, **NO_AUGMENT)
    _, t = data[0]
    assert t["segmentation"][0, 0] == -1 and t["disparity"][0, 2, 3] == 0.25 and t["disparity"][0, 4, 4] == 0
    assert data.info.labels["segmentation"]["classes"] == 7
    plain = write_cityscapes(tmp_path / "b", label_folder="label", classes=19)
    assert build("cityscapes", plain, classes=19).info.labels["segmentation"]["classes"] == 19
    zoomed = build("cityscapes", root, augment={"scales": [2.0], "flip": False})[SampleKey(0, 0)][1]
    assert zoomed["disparity"].max() > 0.49  # disparity grows with the zoom (x2), depth would shrink


def test_celeba_attribute_rows_partition_and_centre_crop(tmp_path):
    root = write_celeba(tmp_path / "celeba")
    train, val = build("celeba", tmp_path), build("celeba", root, "val")  # root or the folder above
    assert (len(train), len(val), len(build("celeba", root, "test"))) == (3, 2, 1)
    image, t = val[1]  # 000005.jpg
    expected = (np.array(celeba_row(5)) + 1) // 2
    assert torch.equal(t["attributes"], torch.from_numpy(expected).float())
    assert int(t["Black_Hair"]) == expected[CELEBA_NAMES.index("Black_Hair")] and t["Black_Hair"].dtype == torch.int64
    assert train.info.labels["Wearing_Hat"]["classes"] == 2 and train.info.labels["attributes"]["attributes"] == 40
    assert raw(image, val.info).max() < 0.5  # the white top/bottom rows were cropped away (value 0 image)


def test_taskonomy_decoding_and_depth_mask(tmp_path):
    root = write_taskonomy(tmp_path)
    data = build("taskonomy", root, buildings={"train": "train_models.txt"}, **NO_AUGMENT)
    assert len(data) == 4 and data.files[0].parent.name == "allensville"
    _, t = data[0]
    assert t["depth"][0, 1, 2] == 2.0 and t["depth"][0, 3, 3] == 0  # 1024 / 512 m; 9000 >= 2^13 masked
    assert not t["normals"][:, 3, 3].any()  # normals are invalid where depth is
    torch.testing.assert_close(t["normals"][:, 1, 2], torch.tensor([1.0, 2 * 127 / 255 - 1, -1.0]))
    assert t["segmentation"][0, 0] == 255 and t["segmentation"][1, 1] == 4
    assert t["keypoints2d"][0, 2, 2] == 1.0 and t["edge_texture"][0, 2, 2] == 0.0
    listed = build("taskonomy", root, "val", buildings={"val": TASKONOMY_BUILDINGS["val"]})
    assert len(listed) == 2
    with pytest.raises(ConfigError, match="data.options.buildings.test"):
        build("taskonomy", root, "test", buildings={"train": "train_models.txt"})


def test_pascal_parts_normals_saliency_and_edges(tmp_path):
    root = write_pascal(tmp_path)
    data = build("pascal_context", root, **NO_AUGMENT)
    assert len(data) == 3 and len(build("pascal_context", root, "test")) == len(PASCAL_IDS["val"])
    _, t = data[0]
    parts = t["human_parts"]
    assert (parts[0:4, 0:4] == 1).all() and (parts[4:8, 0:4] == 2).all()  # head → 1, torso → 2
    assert (parts[8:, :] == 0).all() and parts[10, 10] == 0  # the dog's parts are not human parts
    assert (data[1][1]["human_parts"] == 255).all()  # no person: ignored for this task
    assert t["segmentation"][0, 0] == 255
    label_map = pascal_label_map()
    assert 284 in NORMAL_CLASSES and 360 not in NORMAL_CLASSES
    normals = t["normals"].numpy()
    assert not normals[:, :, 8:].any() and (np.abs(normals[:, 8:, :8]).sum(0) > 0).all()
    assert t["saliency"][0, 1, 1] == 1 and t["saliency"][0, 1, 2] == 0
    assert torch.equal(t["edges"][0], torch.from_numpy(label_edges(label_map).astype(np.float32)))


def test_edges_of_a_label_map_by_hand():
    label_map = np.zeros((6, 6), np.int64)
    label_map[:, 3:] = 2
    lap = laplacian(label_map)
    assert (lap[:, 2] == 2).all() and (lap[:, 3] == -2).all() and not lap[:, [0, 1, 4, 5]].any()
    edges = label_edges(label_map)
    assert edges[:, 4:].sum() == 0 and edges[:, :2].sum() == 0
    assert edges[1:-1, 2:4].sum(axis=1).tolist() == [1, 1, 1, 1]  # the 2-wide band is thinned to one line
    thick = np.zeros((7, 9), bool)
    thick[2:5, 1:8] = True
    skeleton = thin(thick)
    assert skeleton[3, 2:7].all() and skeleton.sum(axis=0).max() == 1  # a 3-wide bar → a 1-wide line


def _thin_by_hand(mask: np.ndarray) -> np.ndarray:
    """Guo & Hall's two subiterations pixel by pixel, straight from the paper's conditions."""
    image = np.pad(mask.astype(bool), 1)
    while True:
        changed = False
        for first in (True, False):
            delete = []
            for r, c in zip(*np.nonzero(image)):
                # x1..x8 counter-clockwise from east, x9 = x1
                x = [bool(image[r + dy, c + dx]) for dy, dx in
                     ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))]
                x.append(x[0])
                crossing = sum(not x[i] and (x[i + 1] or x[i + 2]) for i in (0, 2, 4, 6))
                n1 = sum(x[i] or x[i + 1] for i in (0, 2, 4, 6))
                n2 = sum(x[i + 1] or x[i + 2] for i in (0, 2, 4, 6))
                g3 = (x[1] or x[2] or not x[7]) and x[0] if first else (x[5] or x[6] or not x[3]) and x[4]
                if crossing == 1 and 2 <= min(n1, n2) <= 3 and not g3:
                    delete.append((r, c))
            for r, c in delete:  # parallel: every decision above saw the same image
                image[r, c] = False
            changed |= bool(delete)
        if not changed:
            return image[1:-1, 1:-1]


def test_thin_matches_the_paper_pixel_by_pixel():
    rng = np.random.default_rng(3)
    for _ in range(12):
        height, width = rng.integers(3, 14, 2)
        mask = rng.random((height, width)) < rng.uniform(0.2, 0.9)
        assert np.array_equal(thin(mask), _thin_by_hand(mask))
    label_map = np.kron(rng.integers(0, 459, (5, 5)), np.ones((6, 6), np.int64)).astype(np.uint16)
    assert laplacian(label_map).dtype == np.int32  # exact integers for 16-bit maps
    assert np.array_equal(laplacian(label_map), laplacian(label_map.astype(np.float64)))
    assert np.array_equal(label_edges(label_map), _thin_by_hand(laplacian(label_map) != 0).astype(np.uint8))


def test_workers_give_the_same_augmented_batches(tmp_path):
    from taskfold.trainer.data.loader import EpochBatches, SplitLoader

    data = build("nyuv2", write_nyuv2(tmp_path), augment={"scales": [1.0, 1.5], "flip": True})
    streams = []
    for workers in (0, 2):
        loader = SplitLoader(data, EpochBatches(len(data), 3, seed=5), workers=workers)
        streams.append([batch for e in range(2) for batch in loader.epoch(e)])
    assert len(streams[0]) == 4
    for (_, a, ta), (_, b, tb) in zip(*streams):
        assert torch.equal(a, b) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(streams[0][0][1][:1], streams[0][2][1][:1])  # epochs differ


def test_packed_batches_unpack_to_the_collated_ones(tmp_path):
    from taskfold.trainer.data.loader import collate, pack, unpack

    data = build("celeba", write_celeba(tmp_path / "celeba"))
    items = [data[i] for i in range(len(data))]
    for batch in (items, collate(items)):  # items from workers, or a batch __getitems__ made
        packed = pack(batch)
        assert len(packed.buffers) == 2  # images + attributes (float32), 40 labels (int64): 42 tensors in 2
        images, targets = unpack(packed)
        expected_images, expected = collate(items)
        assert torch.equal(images, expected_images) and list(targets) == list(expected)
        assert all(torch.equal(targets[k], expected[k]) and targets[k].dtype == expected[k].dtype for k in expected)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        create_dataset("nyuv2", "train", size=16, num_samples=None)
    with pytest.raises(DatasetUnavailable, match=str(tmp_path / "nowhere")):
        build("nyuv2", tmp_path / "nowhere")
    root = write_nyuv2(tmp_path / "nyu")
    (root / "train" / "depth" / "2.npy").unlink()
    with pytest.raises(DatasetUnavailable, match="holds 3 .npy files but"):
        build("nyuv2", root)
    (root / "train" / "depth" / "9.npy").write_bytes(b"")
    with pytest.raises(DatasetUnavailable, match=r"missing depth label for image 2 .*depth/2\.npy"):
        build("nyuv2", root)
    (root / "train" / "depth" / "9.npy").rename(root / "train" / "depth" / "2.npy")
    with pytest.raises(DataFormatError, match=r"cannot read .*depth/2\.npy"):
        build("nyuv2", root, **NO_AUGMENT)[2]
    pascal = write_pascal(tmp_path / "pascal")
    (pascal / "ImageSets" / "Context" / "val.txt").unlink()
    with pytest.raises(DatasetUnavailable, match=r"missing val split list .*val\.txt"):
        build("pascal_context", pascal, "val")
    (pascal / "sal_distill" / f"{PASCAL_IDS['train'][1]}.png").unlink()
    with pytest.raises(DatasetUnavailable, match=f"missing saliency file of image {PASCAL_IDS['train'][1]}"):
        build("pascal_context", pascal)
    celeba = write_celeba(tmp_path / "celeba")
    text = (celeba / "list_attr_celeba.txt").read_text().replace("6\n", "7\n", 1)
    (celeba / "list_attr_celeba.txt").write_text(text)
    with pytest.raises(DatasetUnavailable, match="announces 7 images but lists 6"):
        build("celeba", celeba)


def test_unreadable_file_in_a_worker_is_one_cli_line(tmp_path):
    root = write_nyuv2(tmp_path / "nyu")
    (root / "train" / "label" / "1.npy").write_bytes(b"not a numpy file")
    proc = run_cli("train", "configs/demo.yaml", "-o", str(tmp_path / "run"), "--quiet",
                   "--set", "data.dataset=nyuv2", "--set", f"data.root={root}", "--set", "data.size=16",
                   "--set", "data.train_size=null", "--set", "data.val_size=null", "--set", "data.test_size=null",
                   "--set", "data.workers=1", "--set", "train.progress=false", "--set", "train.batch_size=4")
    assert_user_error(proc, "label/1.npy")


def test_in_memory_batches_convert_compact_storage():
    data = create_dataset("synthscenes", "train", size=16, num_samples=6, seed=0)
    assert data.stored["image"].dtype == torch.uint8 and data.stored["segmentation"].dtype == torch.uint8
    images, targets = load_batch(data, [4, 1])
    image, target = data[1]
    assert torch.equal(images[1], image) and all(torch.equal(targets[k][1], target[k]) for k in target)
    assert targets["segmentation"].dtype == torch.int64 and targets["edges"].dtype == torch.float32
