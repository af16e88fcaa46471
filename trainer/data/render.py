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
_CHUNK = 64  # scenes per vectorised pass: keeps the (scenes, pixels, 3) arrays cache-sized


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
    zero, one = np.zeros_like(pitch), np.ones_like(pitch)
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
    """Per-pixel record of the nearest surface found so far, updated one surface at a time."""

    def __init__(self, num_scenes: int, num_pixels: int) -> None:
        self.t = np.full((num_scenes, num_pixels), np.inf)
        self.normal = np.zeros((num_scenes, num_pixels, 3))
        self.label = np.zeros((num_scenes, num_pixels), dtype=np.uint8)
        self.instance = np.zeros((num_scenes, num_pixels), dtype=np.int16)
        self.albedo = np.zeros((num_scenes, num_pixels, 3))

    def offer(self, rows, t, normal, label: int, instance: int, albedo) -> None:
        """Keep the surface at pixels of scenes ``rows`` where it is nearer than what was kept."""
        nearer = t < self.t[rows]
        self.t[rows] = np.where(nearer, t, self.t[rows])
        self.normal[rows] = np.where(nearer[..., None], normal, self.normal[rows])
        self.label[rows] = np.where(nearer, label, self.label[rows])
        self.instance[rows] = np.where(nearer, instance, self.instance[rows])
        self.albedo[rows] = np.where(nearer[..., None], albedo[:, None, :], self.albedo[rows])


def _valid(t: np.ndarray, hit: np.ndarray) -> np.ndarray:
    return np.where(hit & (t > _MIN_T), t, np.inf)


def _intersect_plane(origin, dirs, axis: int, offset, normal: tuple[float, float, float]):
    """Hits of the plane ``p[axis] = offset`` (offset per scene) seen from its front side."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (offset[:, None] - origin[:, None, axis]) / dirs[..., axis]
    facing = dirs @ np.asarray(normal) < 0
    return _valid(t, facing), np.broadcast_to(np.asarray(normal, dtype=float), dirs.shape)


def _intersect_sphere(origin, dirs, centre, radius):
    """Nearest hits of spheres (one per scene row) from outside; normals ``(p - c) / r``."""
    oc = origin - centre
    a = np.einsum("npk,npk->np", dirs, dirs)
    b = np.einsum("npk,nk->np", dirs, oc)
    c = np.einsum("nk,nk->n", oc, oc) - radius**2
    disc = b * b - a * c[:, None]
    t = _valid((-b - np.sqrt(np.maximum(disc, 0.0))) / a, disc >= 0)
    point = origin[:, None, :] + np.where(np.isfinite(t), t, 0.0)[..., None] * dirs
    return t, (point - centre[:, None, :]) / radius[:, None, None]


def _intersect_box(origin, dirs, centre, half_size, angle):
    """Nearest hits of boxes turned by ``angle`` about the vertical axis (slab method)."""
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    rel = origin - centre
    # Into the box frame (rotate by -angle about y); the y axis is unchanged.
    o_local = np.stack([cos[:, 0] * rel[:, 0] - sin[:, 0] * rel[:, 2], rel[:, 1],
                        sin[:, 0] * rel[:, 0] + cos[:, 0] * rel[:, 2]], axis=-1)
    d_local = np.stack([cos * dirs[..., 0] - sin * dirs[..., 2], dirs[..., 1],
                        sin * dirs[..., 0] + cos * dirs[..., 2]], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_low = (-half_size[:, None, :] - o_local[:, None, :]) / d_local
        t_high = (half_size[:, None, :] - o_local[:, None, :]) / d_local
    t_enter = np.minimum(t_low, t_high)
    t_near, t_far = t_enter.max(axis=-1), np.maximum(t_low, t_high).min(axis=-1)
    t = _valid(t_near, t_near <= t_far)
    # The face entered last is the one hit; its outward normal opposes the ray on that axis.
    face = np.argmax(t_enter, axis=-1)
    n_local = np.zeros_like(d_local)
    np.put_along_axis(n_local, face[..., None], -np.sign(np.take_along_axis(d_local, face[..., None], -1)), -1)
    normal = np.stack([cos * n_local[..., 0] + sin * n_local[..., 2], n_local[..., 1],
                       -sin * n_local[..., 0] + cos * n_local[..., 2]], axis=-1)
    return t, normal


def _intersect_cylinder(origin, dirs, centre, radius, height):
    """Nearest hits of vertical cylinders standing on the floor: the side or the top cap."""
    ox, oz = origin[:, 0:1] - centre[:, 0:1], origin[:, 2:3] - centre[:, 2:3]
    dx, dy, dz = dirs[..., 0], dirs[..., 1], dirs[..., 2]
    r2 = (radius**2)[:, None]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - r2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        y_side = origin[:, 1:2] + t_side * dy
        t_side = _valid(t_side, (disc >= 0) & (y_side >= 0) & (y_side <= height[:, None]))
        t_cap = (height[:, None] - origin[:, 1:2]) / dy
        cap_x, cap_z = ox + t_cap * dx, oz + t_cap * dz
        t_cap = _valid(t_cap, cap_x * cap_x + cap_z * cap_z <= r2)
    side_x = np.where(np.isfinite(t_side), ox + t_side * dx, 0.0) / radius[:, None]
    side_z = np.where(np.isfinite(t_side), oz + t_side * dz, 0.0) / radius[:, None]
    on_cap = t_cap < t_side
    normal = np.stack([np.where(on_cap, 0.0, side_x), on_cap.astype(float), np.where(on_cap, 0.0, side_z)], axis=-1)
    return np.minimum(t_side, t_cap), normal


def _hash_unit(seed: np.ndarray, *coords: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) from integer coordinates (splitmix-style)."""
    h = seed.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for coord in coords:
        h = (h ^ coord.astype(np.int64).astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(29))
        h = h * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(32))
    return (h >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def _cast(scenes: Scenes, rays_cam: np.ndarray) -> tuple[_NearestHit, np.ndarray, np.ndarray]:
    """Nearest surface for every ray of every scene; also the world rays and rotations used."""
    rotation = camera_to_world(scenes.pitch, scenes.yaw)
    dirs = np.einsum("pj,bij->bpi", rays_cam, rotation)
    num_scenes = len(scenes)
    origin = np.zeros((num_scenes, 3))
    origin[:, 1] = scenes.camera_height
    hits = _NearestHit(num_scenes, len(rays_cam))
    everything = slice(None)
    floor_color = scenes.floor_color
    room = [
        (1, np.zeros(num_scenes), (0.0, 1.0, 0.0), FLOOR, _FLOOR_ID, floor_color),
        (2, scenes.room_depth, (0.0, 0.0, -1.0), WALL, _BACK_WALL_ID, scenes.wall_color),
        (0, -scenes.room_half_width, (1.0, 0.0, 0.0), WALL, _LEFT_WALL_ID, scenes.wall_color),
        (0, scenes.room_half_width, (-1.0, 0.0, 0.0), WALL, _RIGHT_WALL_ID, scenes.wall_color),
    ]
    for axis, offset, normal, label, instance, color in room:
        t, n = _intersect_plane(origin, dirs, axis, offset, normal)
        hits.offer(everything, t, n, label, instance, color)
    for slot in range(scenes.kind.shape[1]):
        for kind in (BOX, SPHERE, CYLINDER):
            rows = np.flatnonzero(scenes.kind[:, slot] == kind)
            if rows.size == 0:
                continue
            half = scenes.half_size[rows, slot]
            x, z = scenes.position[rows, slot, 0], scenes.position[rows, slot, 1]
            centre = np.stack([x, half[:, 1], z], axis=-1)
            if kind == BOX:
                t, n = _intersect_box(origin[rows], dirs[rows], centre, half, scenes.angle[rows, slot])
            elif kind == SPHERE:
                t, n = _intersect_sphere(origin[rows], dirs[rows], centre, half[:, 0])
            else:
                t, n = _intersect_cylinder(origin[rows], dirs[rows], centre, half[:, 0], 2 * half[:, 1])
            hits.offer(rows, t, n, kind, _FIRST_OBJECT_ID + slot, scenes.color[rows, slot])
    return hits, dirs, rotation


def _shade(scenes: Scenes, hits: _NearestHit, dirs: np.ndarray, image_noise: float) -> np.ndarray:
    """RGB in [0, 1]: albedo x texture x (ambient + diffuse), plus uniform sensor noise."""
    point = dirs * hits.t[..., None]
    point[..., 1] += scenes.camera_height[:, None]
    seed = scenes.noise_seed[:, None]
    cells = np.floor(point * TEXTURE_CELLS_PER_UNIT)
    texture = 1.0 - TEXTURE_CONTRAST * _hash_unit(seed, hits.instance, cells[..., 0], cells[..., 1], cells[..., 2])
    tile = scenes.floor_tile[:, None]
    odd_tile = (np.floor(point[..., 0] / tile) + np.floor(point[..., 2] / tile)) % 2 == 1
    texture = texture * np.where((hits.label == FLOOR) & odd_tile, 1.0 - FLOOR_TILE_CONTRAST, 1.0)
    diffuse = np.maximum(np.einsum("bpk,bk->bp", hits.normal, scenes.light_dir), 0.0)
    ambient = scenes.ambient[:, None]
    rgb = hits.albedo * (texture * (ambient + (1.0 - ambient) * diffuse))[..., None]
    pixel = np.arange(dirs.shape[1])[None, :, None]
    channel = np.arange(3)[None, None, :]
    uniform = _hash_unit(scenes.noise_seed[:, None, None] + 1, pixel, channel)
    # A uniform on [-a, a] has standard deviation a / sqrt(3).
    rgb = rgb + (2.0 * uniform - 1.0) * image_noise * np.sqrt(3.0)
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
        crease = np.einsum("...k,...k->...", n0, n1) < cos_crease
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
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "segmentation", "depth", "normals", "instance")}
    for start in range(0, len(scenes), _CHUNK):
        chunk = scenes.subset(slice(start, start + _CHUNK))
        hits, dirs, rotation = _cast(chunk, rays)
        rgb = _shade(chunk, hits, dirs, image_noise)
        parts["image"].append(np.round(rgb * 255.0).astype(np.uint8))
        parts["segmentation"].append(hits.label)
        parts["depth"].append(hits.t.astype(np.float32))
        # Camera-frame normal = R^T n_world.
        parts["normals"].append(np.einsum("bpi,bij->bpj", hits.normal, rotation).astype(np.float32))
        parts["instance"].append(hits.instance)
    shape = (len(scenes), height, width)
    out = {key: np.concatenate(chunks).reshape(shape + chunks[0].shape[2:]) for key, chunks in parts.items()}
    out["edges"] = find_edges(out["segmentation"], out["depth"], out["normals"], out["instance"])
    return out
