"""synthscenes: the renderer's labels against geometry worked by hand or by brute-force ray marching."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taskfold.trainer.config import ConfigError
from taskfold.trainer.data import DATASETS, create_dataset
from taskfold.trainer.data.loader import load_batch
from taskfold.trainer.data.render import (BOX, CYLINDER, EMPTY_SLOT, FLOOR, SPHERE, WALL, Scenes,
                                          camera_rays, camera_to_world, chunk_scenes, render)
from taskfold.trainer.data.synthscenes import MEAN, STD, SynthScenes, render_split, sample_scenes

torch.set_num_threads(1)
OPTIONS = {"min_objects": 2, "max_objects": 5, "image_noise": 0.02}


def one_scene(objects=(), *, camera_height=1.5, pitch=0.0, yaw=0.0, half_width=3.0, depth=8.0) -> Scenes:
    """A single hand-placed scene; ``objects`` are ``(kind, x, z, half_size, angle)``."""
    slots = max(len(objects), 1)
    scene = Scenes(
        camera_height=np.array([camera_height]), pitch=np.array([pitch]), yaw=np.array([yaw]),
        room_half_width=np.array([half_width]), room_depth=np.array([depth]), light_dir=np.array([[0.0, 1.0, 0.0]]),
        ambient=np.array([0.3]), floor_color=np.full((1, 3), 0.5), wall_color=np.full((1, 3), 0.6),
        floor_tile=np.array([0.5]), noise_seed=np.array([7]), kind=np.full((1, slots), EMPTY_SLOT),
        position=np.zeros((1, slots, 2)), half_size=np.ones((1, slots, 3)), angle=np.zeros((1, slots)),
        color=np.full((1, slots, 3), 0.7),
    )
    for slot, (kind, x, z, half, angle) in enumerate(objects):
        scene.kind[0, slot] = kind
        scene.position[0, slot] = (x, z)
        scene.half_size[0, slot] = half
        scene.angle[0, slot] = angle
    return scene


def focal(width: int) -> float:
    return (width / 2) / math.tan(math.radians(30.0))


# --- exact geometry of hand-built scenes -------------------------------------------------------

def test_sphere_on_the_optical_axis_has_the_analytic_depth_and_faces_the_camera():
    height, radius, distance = 1.5, 0.5, 4.0
    pitch = math.atan((height - radius) / distance)  # aim the optical axis at the sphere's centre
    out = render(one_scene([(SPHERE, 0.0, distance, (radius,) * 3, 0.0)], camera_height=height, pitch=pitch), 33, 33)
    centre = (0, 16, 16)
    assert out["segmentation"][centre] == SPHERE
    assert out["depth"][centre] == pytest.approx(math.hypot(height - radius, distance) - radius, abs=1e-5)
    np.testing.assert_allclose(out["normals"][centre], [0.0, 0.0, -1.0], atol=1e-6)


def test_box_face_and_cylinder_side_seen_head_on():
    box = render(one_scene([(BOX, 0.0, 4.0, (0.5, 1.0, 0.4), 0.0)], camera_height=1.0), 33, 33)
    assert box["segmentation"][0, 16, 16] == BOX
    assert box["depth"][0, 16, 16] == pytest.approx(4.0 - 0.4, abs=1e-5)
    np.testing.assert_allclose(box["normals"][0, 16, 16], [0.0, 0.0, -1.0], atol=1e-6)
    cylinder = render(one_scene([(CYLINDER, 0.0, 3.0, (0.5, 0.8, 0.5), 0.0)], camera_height=0.8), 33, 33)
    assert cylinder["segmentation"][0, 16, 16] == CYLINDER
    assert cylinder["depth"][0, 16, 16] == pytest.approx(3.0 - 0.5, abs=1e-5)
    np.testing.assert_allclose(cylinder["normals"][0, 16, 16], [0.0, 0.0, -1.0], atol=1e-6)


def test_cylinder_cap_seen_from_above_points_up_in_the_camera_frame():
    # Camera 3 up, looking 45 degrees down at the centre of a cap 1 up and 2 ahead.
    out = render(one_scene([(CYLINDER, 0.0, 2.0, (0.4, 0.5, 0.4), 0.0)], camera_height=3.0, pitch=math.pi / 4), 33, 33)
    assert out["segmentation"][0, 16, 16] == CYLINDER
    assert out["depth"][0, 16, 16] == pytest.approx(math.hypot(2.0, 2.0), abs=1e-5)
    # World up is (0, -cos 45, -sin 45) in a camera frame with y down and z forward.
    np.testing.assert_allclose(out["normals"][0, 16, 16], [0.0, -math.sqrt(0.5), -math.sqrt(0.5)], atol=1e-6)


def test_empty_room_back_wall_and_floor_depths():
    size, height, depth = 33, 1.5, 8.0
    out = render(one_scene(camera_height=height, depth=depth), size, size)
    assert out["segmentation"][0, 16, 16] == WALL
    assert out["depth"][0, 16, 16] == pytest.approx(depth, abs=1e-5)
    # Bottom row, centre column: the ray (0, v, 1) with y down meets the floor at t = height / v.
    v = (size - 0.5 - size / 2) / focal(size)
    assert out["segmentation"][0, -1, 16] == FLOOR
    assert out["depth"][0, -1, 16] == pytest.approx(height / v, rel=1e-5)
    np.testing.assert_allclose(out["normals"][0, -1, 16], [0.0, -1.0, 0.0], atol=1e-6)


def test_turning_the_camera_right_moves_objects_left_in_the_image():
    scene = [(SPHERE, 0.0, 4.0, (0.4,) * 3, 0.0)]
    ahead = render(one_scene(scene), 32, 32)["segmentation"][0] == SPHERE
    turned = render(one_scene(scene, yaw=math.radians(15.0)), 32, 32)["segmentation"][0] == SPHERE
    columns = np.arange(32)
    assert abs(columns[ahead.any(axis=0)].mean() - 15.5) < 0.5
    assert columns[turned.any(axis=0)].mean() < 15.5 - 0.5 * focal(32) * math.tan(math.radians(15.0))


def test_shading_is_albedo_times_texture_times_lambert_plus_ambient():
    # Light from straight above (see one_scene): the floor gets full light, the walls only the
    # ambient share 0.3. Texture darkens by up to 25%, odd floor tiles by another 20%.
    out = render(one_scene(), 32, 32, image_noise=0.0)
    image, seg = out["image"][0].astype(float) / 255.0, out["segmentation"][0]
    wall, floor = image[seg == WALL], image[seg == FLOOR]
    lit_wall = 0.6 * 0.3
    assert wall.min() >= lit_wall * 0.75 - 1 / 255 and wall.max() <= lit_wall + 1 / 255
    assert floor.min() >= 0.5 * 0.75 * 0.8 - 1 / 255 and floor.max() <= 0.5 + 1 / 255
    assert wall.std() > 0.005 and floor.std() > 0.01  # the texture noise is there
    noisy = render(one_scene(), 32, 32, image_noise=0.05)["image"][0].astype(float) / 255.0
    assert (noisy - image).std() == pytest.approx(0.05, rel=0.1)


def _brute_force_first_hit(scene: Scenes, size: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """March every ray in steps of ``step``; return the first sample inside something and its class."""
    dirs = camera_rays(size, size) @ camera_to_world(scene.pitch, scene.yaw)[0].T
    ts = np.arange(step, 15.0, step)
    points = dirs[:, None, :] * ts[None, :, None]
    points[..., 1] += scene.camera_height[0]
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    label = np.full(x.shape, -1)
    label[(np.abs(x) >= scene.room_half_width[0]) | (z >= scene.room_depth[0])] = WALL
    label[y <= 0] = FLOOR
    for kind, (cx, cz), half, angle in zip(scene.kind[0], scene.position[0], scene.half_size[0], scene.angle[0]):
        dx, dy, dz = x - cx, y - half[1], z - cz
        if kind == SPHERE:
            inside = dx**2 + dy**2 + dz**2 <= half[0] ** 2
        elif kind == CYLINDER:
            inside = (dx**2 + dz**2 <= half[0] ** 2) & (np.abs(dy) <= half[1])
        elif kind == BOX:
            local_x = math.cos(angle) * dx - math.sin(angle) * dz
            local_z = math.sin(angle) * dx + math.cos(angle) * dz
            inside = (np.abs(local_x) <= half[0]) & (np.abs(dy) <= half[1]) & (np.abs(local_z) <= half[2])
        else:
            continue
        label[inside & (label == -1)] = kind
    first = np.argmax(label >= 0, axis=1)
    return ts[first], label[np.arange(len(first)), first]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_random_scenes_match_brute_force_ray_marching(index):
    scene = sample_scenes([np.random.SeedSequence([11, index])], min_objects=4, max_objects=5)
    size, step = 24, 0.004
    out = render(scene, size, size)
    t_first, label = _brute_force_first_hit(scene, size, step)
    depth, seg = out["depth"][0].ravel(), out["segmentation"][0].ravel()
    # The true first hit lies in (t_first - step, t_first]; a ray can only disagree where it grazes
    # an object for less than one step, or at a corner where two surfaces meet within a step.
    agree = (seg == label) & (depth > t_first - step - 1e-6) & (depth <= t_first + 1e-6)
    assert agree.mean() >= 0.99
    assert (seg >= BOX).sum() > 20  # the scene really contains objects


# --- labels of generated splits -----------------------------------------------------------------

@pytest.fixture(scope="module")
def small_split() -> dict[str, np.ndarray]:
    return render_split("train", 32, 32, 40, 0, **OPTIONS)


def test_label_ranges_and_unit_normals(small_split):
    assert set(np.unique(small_split["segmentation"])) <= {FLOOR, WALL, BOX, SPHERE, CYLINDER}
    assert set(np.unique(small_split["classification"])) <= {0, 1, 2}
    assert set(np.unique(small_split["edges"])) == {0, 1}
    assert np.all(small_split["depth"] > 0) and np.all(np.isfinite(small_split["depth"]))
    np.testing.assert_allclose(np.linalg.norm(small_split["normals"], axis=-1), 1.0, atol=1e-5)
    # Every visible surface faces the camera: its normal opposes the viewing ray.
    rays = camera_rays(32, 32).reshape(32, 32, 3)
    assert np.all(np.einsum("bhwk,hwk->bhw", small_split["normals"], rays) < 0)


def test_edges_cover_every_class_boundary_and_skip_flat_interiors(small_split):
    seg, edges = small_split["segmentation"], small_split["edges"].astype(bool)
    across = seg[:, :, 1:] != seg[:, :, :-1]
    down = seg[:, 1:, :] != seg[:, :-1, :]
    assert np.all(edges[:, :, 1:][across]) and np.all(edges[:, :, :-1][across])
    assert np.all(edges[:, 1:, :][down]) and np.all(edges[:, :-1, :][down])
    # A pixel whose four neighbours all lie on the floor with it is no edge: the floor is one plane.
    floor = seg == FLOOR
    interior = (floor[:, 1:-1, 1:-1] & floor[:, :-2, 1:-1] & floor[:, 2:, 1:-1]
                & floor[:, 1:-1, :-2] & floor[:, 1:-1, 2:])
    assert interior.sum() > 1000 and not np.any(edges[:, 1:-1, 1:-1][interior])


def test_occlusion_with_same_class_and_same_normal_is_an_edge_by_depth_alone():
    # A small box in front of a big one, both seen face-on: class and normal agree across the
    # outline of the small box, only the depth jumps (2.7 vs 5.7).
    scene = one_scene([(BOX, 0.0, 6.0, (1.5, 1.5, 0.3), 0.0), (BOX, 0.0, 3.0, (0.3, 0.3, 0.3), 0.0)],
                      camera_height=0.45)
    out = render(scene, 32, 32)
    instance, edges = out["instance"][0], out["edges"][0]  # surface ids: 4 + object slot
    contacts = 0
    for first, second in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                          ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
        a, b = instance[first], instance[second]
        meet = ((a == 4) & (b == 5)) | ((a == 5) & (b == 4))
        contacts += meet.sum()
        normals_first, normals_second = out["normals"][0][first][meet], out["normals"][0][second][meet]
        np.testing.assert_allclose(normals_first, normals_second, atol=1e-6)
        assert np.all(edges[first][meet]) and np.all(edges[second][meet])
    assert contacts >= 8
    assert np.any(edges[instance == 4] == 0)  # the big box's face is not all edge


def test_wall_corner_is_an_edge_by_normal_alone_and_a_flush_seam_is_none():
    # Two boxes side by side with coplanar front faces: across the seam nothing changes but
    # the surface id, which by itself is not an edge.
    scene = one_scene([(BOX, -0.5, 4.0, (0.5, 1.0, 0.3), 0.0), (BOX, 0.5, 4.0, (0.5, 1.0, 0.3), 0.0)],
                      camera_height=1.0)
    out = render(scene, 32, 32)
    instance, edges, row = out["instance"][0], out["edges"][0], 16
    seam = np.flatnonzero((instance[row, :-1] == 4) & (instance[row, 1:] == 5))
    assert len(seam) == 1 and edges[row, seam[0]] == 0 and edges[row, seam[0] + 1] == 0
    # The back wall meets the right wall at the same depth and class: the normals turn 90 degrees.
    row = 3  # above the boxes
    corner = np.flatnonzero((instance[row, :-1] == 1) & (instance[row, 1:] == 3))
    assert len(corner) == 1 and edges[row, corner[0]] == 1 and edges[row, corner[0] + 1] == 1
    assert not edges[row, corner[0] - 3:corner[0] - 1].any() and not edges[row, corner[0] + 2:].any()


def test_scene_class_is_the_primitive_with_most_pixels_and_classes_are_balanced():
    split = render_split("val", 64, 64, 500, 3, **OPTIONS)
    seg = torch.from_numpy(split["segmentation"]).long().flatten(1)
    counts = torch.stack([(seg == kind).sum(1) for kind in (BOX, SPHERE, CYLINDER)], dim=1)
    assert torch.all(counts.sum(1) > 0)  # every scene shows at least one object
    expected = [max(range(3), key=lambda k, c=row: (c[k], -k)) for row in counts.tolist()]
    assert split["classification"].tolist() == expected
    share = np.bincount(split["classification"], minlength=3) / 500
    assert np.all(share > 0.22) and np.all(share < 0.45), share


# --- seeds, splits, cache, API -------------------------------------------------------------------

def test_same_seed_same_data_other_split_or_seed_other_scenes():
    first = render_split("train", 24, 24, 6, 5, **OPTIONS)
    again = render_split("train", 24, 24, 6, 5, **OPTIONS)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    for other in (render_split("val", 24, 24, 6, 5, **OPTIONS), render_split("train", 24, 24, 6, 6, **OPTIONS)):
        differs = [not np.array_equal(first["depth"][i], other["depth"][i]) for i in range(6)]
        assert all(differs)
    # Scene i does not depend on how many scenes the split holds.
    longer = render_split("train", 24, 24, 9, 5, **OPTIONS)
    np.testing.assert_array_equal(longer["image"][:6], first["image"])


def test_a_split_rendered_in_chunks_equals_its_scenes_rendered_one_by_one():
    """render() fills the split chunk by chunk (edges included); every scene must come out as if
    rendered alone, also across a chunk boundary."""
    step = chunk_scenes(12, 16)
    n = step + 3
    seeds = [np.random.SeedSequence([5, 0, i]) for i in range(n)]
    scenes = sample_scenes(seeds, min_objects=2, max_objects=5)
    whole = render(scenes, 12, 16)
    for i in (0, step - 1, step, n - 1):
        alone = render(scenes.subset(slice(i, i + 1)), 12, 16)
        for key, value in alone.items():
            np.testing.assert_array_equal(whole[key][i], value[0], err_msg=f"{key} of scene {i}")


def test_cache_round_trip_gives_identical_arrays(tmp_path):
    fresh = create_dataset("synthscenes", "test", size=24, num_samples=5, seed=2, cache_dir=str(tmp_path))
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz" and files[0].name.startswith("synthscenes-test-")
    fresh_images, fresh_targets = load_batch(fresh, range(5))
    with np.load(files[0]) as stored:
        np.testing.assert_array_equal(stored["segmentation"], fresh_targets["segmentation"].numpy())
    reloaded = create_dataset("synthscenes", "test", size=24, num_samples=5, seed=2, cache_dir=str(tmp_path))
    images, targets = load_batch(reloaded, range(5))
    assert torch.equal(fresh_images, images)
    for key, value in fresh_targets.items():
        assert torch.equal(value, targets[key]), key
    create_dataset("synthscenes", "test", size=24, num_samples=5, seed=2, cache_dir=str(tmp_path), max_objects=3)
    assert len(list(tmp_path.iterdir())) == 2  # other options, other key; no temporary files left


def test_items_info_and_normalisation():
    assert "synthscenes" in DATASETS
    data = create_dataset("synthscenes", "val", size=(20, 28), num_samples=4, seed=0)
    assert isinstance(data, SynthScenes) and len(data) == 4
    image, targets = data[2]
    assert image.shape == (3, 20, 28) and image.dtype == torch.float32
    shapes = {key: (tuple(value.shape), value.dtype) for key, value in targets.items()}
    assert shapes == {"segmentation": ((20, 28), torch.int64), "depth": ((1, 20, 28), torch.float32),
                      "normals": ((3, 20, 28), torch.float32), "edges": ((1, 20, 28), torch.float32),
                      "classification": ((), torch.int64)}
    images, batch = load_batch(data, [1, 2])
    assert torch.equal(images[1], image) and torch.equal(batch["depth"][1], targets["depth"])
    raw = render_split("val", 20, 28, 4, 0, **OPTIONS)["image"][2]
    restored = image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    np.testing.assert_allclose(restored.permute(1, 2, 0).numpy() * 255.0, raw, atol=1e-3)
    info = data.info
    assert info.image_size == (20, 28) and info.mean == MEAN and info.std == STD
    assert info.labels["segmentation"] == {"classes": 5, "ignore_index": 255,
                                           "class_names": ["floor", "wall", "box", "sphere", "cylinder"]}
    assert info.labels["classification"] == {"classes": 3, "class_names": ["box", "sphere", "cylinder"]}
    assert set(info.labels) == {"segmentation", "depth", "normals", "edges", "classification"}


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="max_object"):
        create_dataset("synthscenes", "train", size=16, num_samples=2, max_object=3)
    with pytest.raises(ConfigError, match="min_objects"):
        create_dataset("synthscenes", "train", size=16, num_samples=2, min_objects=4, max_objects=2)
