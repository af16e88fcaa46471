"""A vectorised numpy ray caster for the synthscenes dataset.

Every pixel of a batch of scenes is one camera ray; each ray is intersected analytically with the
room (floor, back wall, two side walls) and with every object (boxes rotated about the vertical
axis, spheres, vertical capped cylinders), and the nearest hit gives the exact labels: class,
depth, surface normal and which surface was hit. Working on whole ``(scenes, pixels)`` arrays at
once is what makes thousands of images render in seconds without a compiled extension.

Frames. World: x right, y up, z forward, floor at ``y = 0``, camera at ``(0, camera_height, 0)``.
Camera (the frame of the ``normals`` label): x right, y down, z forward, so a surface facing the
camera has a negative z component. Rays are ``(u, v, 1)`` in the camera frame, hence the ray
parameter of a hit *is* its depth (z-distance along the optical axis).

The room's walls are infinitely tall and every ray points forward (``yaw`` + half the field of
view < 90 degrees), so every ray hits the back wall plane or something nearer: no pixel is empty.
Lighting is Lambertian plus ambient from one directional light; there are no cast shadows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOOR, WALL, BOX, SPHERE, CYLINDER = 0, 1, 2, 3, 4
CLASS_NAMES = ("floor", "wall", "box", "sphere", "cylinder")
EMPTY_SLOT = -1
HORIZONTAL_FOV_DEG = 60.0
TEXTURE_CELLS_PER_UNIT = 5.0
TEXTURE_CONTRAST = 0.25
FLOOR_TILE_CONTRAST = 0.2
# Instance ids: the four room planes, then 4 + object slot.
_FLOOR_ID, _BACK_WALL_ID, _LEFT_WALL_ID, _RIGHT_WALL_ID = 0, 1, 2, 3
_FIRST_OBJECT_ID = 4
_MIN_T = 1e-6
CHUNK_PIXELS = 64 * 64 * 64  # pixels per vectorised pass (64 scenes at 64 px): bounds the float64 working arrays


def chunk_scenes(height: int, width: int) -> int:
    """Scenes per vectorised pass at this image size (at least one)."""
    return max(1, CHUNK_PIXELS // (height * width))


@dataclass
class Scenes:
    """A batch of B scenes; object arrays are padded to M slots (``kind == EMPTY_SLOT`` = none).

    Every object rests on the floor. ``half_size`` is the half extent of its bounding box in its
    own frame: ``(r, r, r)`` for a sphere, ``(r, h/2, r)`` for a cylinder of height ``h``,
    ``(a, b, c)`` for a box; ``angle`` (radians) turns a box about the vertical axis.
    """

    camera_height: np.ndarray  # (B,)
    pitch: np.ndarray  # (B,) radians, positive looks down
    yaw: np.ndarray  # (B,) radians, positive turns right
    room_half_width: np.ndarray  # (B,) side walls at x = -w and x = +w
    room_depth: np.ndarray  # (B,) back wall at z = room_depth
    light_dir: np.ndarray  # (B, 3) unit vector pointing towards the light (world frame)
    ambient: np.ndarray  # (B,) share of the light that reaches every surface
    floor_color: np.ndarray  # (B, 3) RGB in [0, 1]
    wall_color: np.ndarray  # (B, 3)
    floor_tile: np.ndarray  # (B,) edge length of the floor's checker tiles
    noise_seed: np.ndarray  # (B,) int64 seed of the texture and sensor noise
    kind: np.ndarray  # (B, M) int: BOX, SPHERE, CYLINDER or EMPTY_SLOT
    position: np.ndarray  # (B, M, 2) x and z of the object's footprint centre
    half_size: np.ndarray  # (B, M, 3)
    angle: np.ndarray  # (B, M)
    color: np.ndarray  # (B, M, 3)

    def __len__(self) -> int:
        return len(self.camera_height)

    def subset(self, rows: slice) -> Scenes:
        """The scenes ``rows`` (a slice), as views of the same arrays."""
        return Scenes(**{name: value[rows] for name, value in vars(self).items()})


def camera_to_world(pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Rotations ``(B, 3, 3)`` taking camera-frame vectors (y down) to the world frame (y up)."""
    cp, sp, cy, sy = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    zero = np.zeros_like(pitch)
    # Ry(yaw) @ Rx(pitch) @ diag(1, -1, 1), multiplied out.
    rows = [
        [cy, -sy * sp, sy * cp],
        [zero, -cp, -sp],
        [-sy, -cy * sp, cy * cp],
    ]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def camera_rays(height: int, width: int) -> np.ndarray:
    """Camera-frame ray directions ``(H*W, 3)`` through pixel centres, with z = 1."""
    focal = (width / 2) / np.tan(np.radians(HORIZONTAL_FOV_DEG) / 2)
    v, u = np.meshgrid(np.arange(height) + 0.5 - height / 2, np.arange(width) + 0.5 - width / 2, indexing="ij")
    return np.stack([u.ravel() / focal, v.ravel() / focal, np.ones(height * width)], axis=-1)


class _NearestHit:
    """Per-pixel record of the nearest surface found so far, updated one surface at a time.

    Vectors are stored component-first, ``(3, B, P)``, so that every operation of the ray caster
    is an elementwise one on contiguous arrays. Only depth, normal and surface id are tracked;
    class and colour are looked up from the surface id afterwards.
    """

    def __init__(self, num_scenes: int, num_pixels: int) -> None:
        self.t = np.full((num_scenes, num_pixels), np.inf)
        self.normal = np.zeros((3, num_scenes, num_pixels))
        self.instance = np.zeros((num_scenes, num_pixels), dtype=np.int16)

    def offer(self, rows: np.ndarray, t: np.ndarray, normal: np.ndarray, instance: int) -> None:
        """Keep surface ``instance`` at pixels of scenes ``rows`` where it is nearer than the kept one."""
        best_t, best_normal, best_instance = self.t[rows], self.normal[:, rows], self.instance[rows]
        nearer = t < best_t
        np.copyto(best_t, t, where=nearer)
        np.copyto(best_normal, normal, where=nearer)
        best_instance[nearer] = instance
        self.t[rows], self.normal[:, rows], self.instance[rows] = best_t, best_normal, best_instance


def _valid(t: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Ray parameters of real hits in front of the camera; everything else becomes a miss (inf)."""
    return np.where(hit & (t > _MIN_T), t, np.inf)


def _intersect_plane(origin, dirs, axis: int, offset, facing: float):
    """Hits of the plane ``p[axis] = offset`` (per scene) whose normal is ``facing`` times axis."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (offset[:, None] - origin[axis]) / dirs[axis]
    normal = np.zeros((3, 1, 1))
    normal[axis] = facing
    return _valid(t, facing * dirs[axis] < 0), normal


def _intersect_sphere(origin, dirs, centre, radius):
    """Nearest hits of spheres (one per scene row) seen from outside; normals ``(p - c) / r``."""
    oc = origin - centre
    a = dirs[0] * dirs[0] + dirs[1] * dirs[1] + dirs[2] * dirs[2]
    b = dirs[0] * oc[0] + dirs[1] * oc[1] + dirs[2] * oc[2]
    c = oc[0] * oc[0] + oc[1] * oc[1] + oc[2] * oc[2] - radius**2
    disc = b * b - a * c
    t = _valid((-b - np.sqrt(np.maximum(disc, 0.0))) / a, disc >= 0)
    t_finite = np.where(np.isfinite(t), t, 0.0)
    return t, (oc + t_finite * dirs) / radius


def _turn(x, z, cos, sin):
    """Rotate the horizontal components ``(x, z)`` by the angle with ``cos``, ``sin`` about y."""
    return cos * x + sin * z, -sin * x + cos * z


def _intersect_box(origin, dirs, centre, half_size, angle):
    """Nearest hits of boxes turned by ``angle`` about the vertical axis (slab method)."""
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    rel = origin - centre
    # World to box frame is a turn by -angle; the vertical component is unchanged.
    o_x, o_z = _turn(rel[0], rel[2], cos, -sin)
    d_x, d_z = _turn(dirs[0], dirs[2], cos, -sin)
    local_o, local_d = (o_x, rel[1], o_z), (d_x, dirs[1], d_z)
    enter, leave = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis in range(3):
            t_low = (-half_size[axis] - local_o[axis]) / local_d[axis]
            t_high = (half_size[axis] - local_o[axis]) / local_d[axis]
            enter.append(np.minimum(t_low, t_high))
            leave.append(np.maximum(t_low, t_high))
    t_near = np.maximum(np.maximum(enter[0], enter[1]), enter[2])
    t_far = np.minimum(np.minimum(leave[0], leave[1]), leave[2])
    t = _valid(t_near, t_near <= t_far)
    # The slab entered last holds the face that is hit; its outward normal opposes the ray.
    n_local = [np.where(enter[axis] == t_near, -np.sign(local_d[axis]), 0.0) for axis in range(3)]
    n_x, n_z = _turn(n_local[0], n_local[2], cos, sin)
    return t, np.stack([n_x, n_local[1], n_z])


def _intersect_cylinder(origin, dirs, centre, radius, height):
    """Nearest hits of vertical cylinders standing on the floor: the side or the top cap."""
    ox, oy, oz = origin[0] - centre[0], origin[1], origin[2] - centre[2]
    dx, dy, dz = dirs
    r2 = radius**2
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - r2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        y_side = oy + t_side * dy
        t_side = _valid(t_side, (disc >= 0) & (y_side >= 0) & (y_side <= height))
        t_cap = (height - oy) / dy
        cap_x, cap_z = ox + t_cap * dx, oz + t_cap * dz
        t_cap = _valid(t_cap, cap_x * cap_x + cap_z * cap_z <= r2)
    t_side_finite = np.where(np.isfinite(t_side), t_side, 0.0)
    on_cap = t_cap < t_side
    normal = np.stack([
        np.where(on_cap, 0.0, (ox + t_side_finite * dx) / radius),
        on_cap.astype(float),
        np.where(on_cap, 0.0, (oz + t_side_finite * dz) / radius),
    ])
    return np.minimum(t_side, t_cap), normal


def _hash_unit(seed: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) from integer keys (splitmix64 finaliser)."""
    h = (seed.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ key.astype(np.int64).astype(np.uint64)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def _surface_tables(scenes: Scenes) -> tuple[np.ndarray, np.ndarray]:
    """Class ``(B, S)`` and albedo ``(B, S, 3)`` of every surface id (room planes, then slots)."""
    num_scenes = len(scenes)
    room_labels = np.tile([FLOOR, WALL, WALL, WALL], (num_scenes, 1))
    labels = np.concatenate([room_labels, scenes.kind], axis=1)
    walls = np.repeat(scenes.wall_color[:, None, :], 3, axis=1)
    colors = np.concatenate([scenes.floor_color[:, None, :], walls, scenes.color], axis=1)
    return labels, colors


def _cast(scenes: Scenes, rays_cam: np.ndarray) -> tuple[_NearestHit, np.ndarray, np.ndarray]:
    """Nearest surface for every ray of every scene; also the world rays ``(3, B, P)`` and rotations."""
    rotation = camera_to_world(scenes.pitch, scenes.yaw)
    dirs = np.einsum("bij,pj->ibp", rotation, rays_cam)
    num_scenes = len(scenes)
    origin = np.zeros((3, num_scenes, 1))
    origin[1, :, 0] = scenes.camera_height
    hits = _NearestHit(num_scenes, len(rays_cam))
    every_scene = np.arange(num_scenes)
    room = [
        (1, np.zeros(num_scenes), 1.0, _FLOOR_ID),
        (2, scenes.room_depth, -1.0, _BACK_WALL_ID),
        (0, -scenes.room_half_width, 1.0, _LEFT_WALL_ID),
        (0, scenes.room_half_width, -1.0, _RIGHT_WALL_ID),
    ]
    for axis, offset, facing, instance in room:
        t, n = _intersect_plane(origin, dirs, axis, offset, facing)
        hits.offer(every_scene, t, n, instance)
    for slot in range(scenes.kind.shape[1]):
        for kind in (BOX, SPHERE, CYLINDER):
            rows = np.flatnonzero(scenes.kind[:, slot] == kind)
            if rows.size == 0:
                continue
            half = scenes.half_size[rows, slot].T[:, :, None]
            x, z = scenes.position[rows, slot, 0], scenes.position[rows, slot, 1]
            centre = np.stack([x, half[1, :, 0], z])[:, :, None]
            ray_o, ray_d = origin[:, rows], dirs[:, rows]
            if kind == BOX:
                t, n = _intersect_box(ray_o, ray_d, centre, half, scenes.angle[rows, slot])
            elif kind == SPHERE:
                t, n = _intersect_sphere(ray_o, ray_d, centre, half[0])
            else:
                t, n = _intersect_cylinder(ray_o, ray_d, centre, half[0], 2 * half[1])
            hits.offer(rows, t, n, _FIRST_OBJECT_ID + slot)
    return hits, dirs, rotation


def _shade(scenes: Scenes, hits: _NearestHit, label: np.ndarray, albedo: np.ndarray, dirs: np.ndarray,
           image_noise: float) -> np.ndarray:
    """RGB ``(3, B, P)`` in [0, 1]: albedo x texture x (ambient + diffuse), plus uniform sensor noise."""
    x, y, z = dirs * hits.t
    y += scenes.camera_height[:, None]
    # Cell noise fixed to the surface: one random value per (surface, 3-D cell). The key packing is
    # injective while cell indices stay within +-2047, i.e. for rooms up to 400 units across.
    cx, cy, cz = (np.floor(c * TEXTURE_CELLS_PER_UNIT).astype(np.int64) for c in (x, y, z))
    key = ((hits.instance.astype(np.int64) * 4096 + cx) * 4096 + cy) * 4096 + cz
    texture = 1.0 - TEXTURE_CONTRAST * _hash_unit(scenes.noise_seed[:, None], key)
    tile = scenes.floor_tile[:, None]
    odd_tile = (np.floor(x / tile) + np.floor(z / tile)) % 2 == 1
    texture *= np.where((label == FLOOR) & odd_tile, 1.0 - FLOOR_TILE_CONTRAST, 1.0)
    light = scenes.light_dir.T[:, :, None]
    diffuse = np.maximum(hits.normal[0] * light[0] + hits.normal[1] * light[1] + hits.normal[2] * light[2], 0.0)
    ambient = scenes.ambient[:, None]
    rgb = albedo * (texture * (ambient + (1.0 - ambient) * diffuse))
    num_pixels = rgb.shape[2]
    channel_pixel = np.arange(3)[:, None, None] * num_pixels + np.arange(num_pixels)
    uniform = _hash_unit(scenes.noise_seed[:, None] + 1, channel_pixel)
    # A uniform on [-a, a] has standard deviation a / sqrt(3).
    rgb += (2.0 * uniform - 1.0) * (image_noise * np.sqrt(3.0))
    return np.clip(rgb, 0.0, 1.0)


def find_edges(segmentation: np.ndarray, depth: np.ndarray, normals: np.ndarray, instance: np.ndarray,
               *, depth_jump: float = 0.05, crease_deg: float = 30.0) -> np.ndarray:
    """Edge map ``(B, H, W)`` in {0, 1} from the exact labels.

    A pixel is an edge when, against any of its 4-neighbours, the class changes, the normals
    differ by more than ``crease_deg`` (box corners, floor-wall junctions, cylinder rims), or the
    surface changes with a relative depth jump above ``depth_jump`` (one object occluding
    another). The depth test is restricted to a change of surface because a plane seen at a
    grazing angle has large relative depth steps between neighbouring pixels without any edge.
    """
    cos_crease = np.cos(np.radians(crease_deg))
    edges = np.zeros(segmentation.shape, dtype=bool)
    for axis in (1, 2):
        def pair(a):
            first = [slice(None)] * a.ndim
            second = [slice(None)] * a.ndim
            first[axis], second[axis] = slice(None, -1), slice(1, None)
            return a[tuple(first)], a[tuple(second)]

        (s0, s1), (d0, d1), (n0, n1), (i0, i1) = pair(segmentation), pair(depth), pair(normals), pair(instance)
        jump = np.abs(d0 - d1) > depth_jump * np.minimum(d0, d1)
        crease = n0[..., 0] * n1[..., 0] + n0[..., 1] * n1[..., 1] + n0[..., 2] * n1[..., 2] < cos_crease
        differs = (s0 != s1) | crease | ((i0 != i1) & jump)
        low = [slice(None)] * edges.ndim
        high = [slice(None)] * edges.ndim
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        edges[tuple(low)] |= differs
        edges[tuple(high)] |= differs
    return edges.astype(np.uint8)


def render(scenes: Scenes, height: int, width: int, *, image_noise: float = 0.02) -> dict[str, np.ndarray]:
    """Render ``scenes`` at ``height`` x ``width``; returns the image and its exact labels.

    Keys: ``image`` uint8 (B, H, W, 3); ``segmentation`` uint8 (B, H, W) with the class ids of
    :data:`CLASS_NAMES`; ``depth`` float32 (B, H, W); ``normals`` float32 (B, H, W, 3), unit,
    camera frame; ``edges`` uint8 (B, H, W); ``instance`` int16 (B, H, W), which surface was hit
    (0 floor, 1 back wall, 2 left wall, 3 right wall, 4 + k object slot k).
    """
    if len(scenes) == 0:
        raise ValueError("render needs at least one scene")
    rays = camera_rays(height, width)
    # Filled chunk by chunk in their final dtypes: the peak is the split itself plus one chunk's
    # float64 working arrays, not a list of chunks and their concatenation (2,000 scenes at
    # 128 px: about 0.7 GB instead of 2 GB).
    n = len(scenes)
    out = {"image": np.empty((n, height, width, 3), np.uint8), "segmentation": np.empty((n, height, width), np.uint8),
           "depth": np.empty((n, height, width), np.float32), "normals": np.empty((n, height, width, 3), np.float32),
           "edges": np.empty((n, height, width), np.uint8), "instance": np.empty((n, height, width), np.int16)}
    step = chunk_scenes(height, width)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        chunk = scenes.subset(rows)
        hits, dirs, rotation = _cast(chunk, rays)
        label_table, color_table = _surface_tables(chunk)
        scene_index = np.arange(len(chunk))[:, None]
        label = label_table[scene_index, hits.instance].astype(np.uint8)
        albedo = color_table.transpose(2, 0, 1)[:, scene_index, hits.instance]
        rgb = _shade(chunk, hits, label, albedo, dirs, image_noise)
        shape = (len(chunk), height, width)
        out["image"][rows] = np.moveaxis(np.round(rgb * 255.0).astype(np.uint8), 0, -1).reshape(shape + (3,))
        out["segmentation"][rows] = label.reshape(shape)
        out["depth"][rows] = hits.t.reshape(shape)
        # Camera-frame normal = R^T n_world.
        out["normals"][rows] = (np.moveaxis(hits.normal, 0, -1) @ rotation).reshape(shape + (3,))
        out["instance"][rows] = hits.instance.reshape(shape)
        # Edges compare 4-neighbours inside one image, so a chunk's edges are the whole split's.
        out["edges"][rows] = find_edges(out["segmentation"][rows], out["depth"][rows], out["normals"][rows],
                                        out["instance"][rows])
    return out
