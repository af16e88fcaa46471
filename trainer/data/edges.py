"""Edge maps from label maps, as the PASCAL multi-task loaders make them (ASTMT, BMTAS, MTI-Net):
the 4-neighbour Laplacian of the label map (OpenCV's ``Laplacian`` with its default 1-aperture
kernel and reflect-101 border), non-zero where a label changes, then thinned to one-pixel-wide
lines with the two-subiteration algorithm of Guo & Hall (1989) that scikit-image's ``thin`` uses.
"""
from __future__ import annotations

import numpy as np


def laplacian(label_map: np.ndarray) -> np.ndarray:
    """``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` convolved with reflect-101 borders: int32 for maps of
    up to 16-bit integers (exact, and the same values OpenCV's float64 result holds), else float64."""
    small_ints = np.issubdtype(label_map.dtype, np.integer) and label_map.itemsize <= 2
    x = np.pad(label_map.astype(np.int32 if small_ints else np.float64), 1, mode="reflect")  # = REFLECT_101
    return x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * x[1:-1, 1:-1]


def _thin_tables() -> tuple[np.ndarray, np.ndarray]:
    """Which 8-neighbourhood codes delete the centre pixel in subiteration 1 and 2.

    Bit k of a code is neighbour x_{k+1}, counter-clockwise from east: x1 E, x2 NE, x3 N, x4 NW,
    x5 W, x6 SW, x7 S, x8 SE.
    """
    first, second = np.zeros(256, bool), np.zeros(256, bool)
    for code in range(256):
        x = [(code >> k) & 1 for k in range(8)] + [code & 1]  # x[8] wraps to x1
        # G1: exactly one 4-connected run of background→object transitions (crossing number 1)
        crossing = sum(1 for i in (0, 2, 4, 6) if not x[i] and (x[i + 1] or x[i + 2]))
        # G2: 2 <= min(n1, n2) <= 3
        n1 = sum(x[i] | x[i + 1] for i in (0, 2, 4, 6))
        n2 = sum(x[i + 1] | x[i + 2] for i in (0, 2, 4, 6))
        if crossing != 1 or not 2 <= min(n1, n2) <= 3:
            continue
        # G3 / G3': (x2 | x3 | ~x8) & x1 == 0, and its 180-degree rotation (x6 | x7 | ~x4) & x5 == 0
        first[code] = ((x[1] | x[2] | (1 - x[7])) & x[0]) == 0
        second[code] = ((x[5] | x[6] | (1 - x[3])) & x[4]) == 0
    return first, second


_FIRST, _SECOND = _thin_tables()
# (row offset, column offset) of x1..x8
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def thin(mask: np.ndarray) -> np.ndarray:
    """Skeleton of a boolean mask, one pixel wide (pixels outside the image count as background).

    Only the pixels still in the skeleton are visited: boundaries cover a few percent of a label
    map, so each subiteration looks up ~8 neighbours of those pixels instead of shifting whole
    images. Within a subiteration every code is taken before any pixel is deleted (the algorithm
    is parallel), as in scikit-image.
    """
    height, width = mask.shape
    skeleton = np.pad(mask.astype(bool), 1).ravel()
    stride = width + 2
    offsets = [dy * stride + dx for dy, dx in _NEIGHBOURS]
    alive = np.flatnonzero(skeleton)
    while True:
        changed = False
        for table in (_FIRST, _SECOND):
            code = np.zeros(alive.size, np.uint8)
            for bit, offset in enumerate(offsets):
                code |= skeleton[alive + offset].view(np.uint8) << bit
            delete = table[code]
            if delete.any():
                skeleton[alive[delete]] = False
                alive = alive[~delete]
                changed = True
        if not changed:
            return skeleton.reshape(height + 2, width + 2)[1:-1, 1:-1].copy()


def label_edges(label_map: np.ndarray) -> np.ndarray:
    """uint8 (H, W): 1 on the thinned boundaries between labels."""
    return thin(laplacian(label_map) != 0).astype(np.uint8)
