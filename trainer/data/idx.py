"""Read the IDX format (MNIST, Fashion-MNIST, KMNIST, ...) from any directory, gzipped or not.

IDX is the format LeCun's MNIST files use: a 4-byte magic number ``0 0 <type> <ndim>``, then
``ndim`` big-endian uint32 dimensions, then the values, big-endian, in C order. We read it with
numpy alone so that any distribution of these files (a Debian package, a user's download, a
fixture written by a test) works without a dataset library.

Also home of the two errors the real-image loaders raise, since this is the lowest module they
all import: :class:`DatasetUnavailable` (files absent; the message says how to get them) and
:class:`DataFormatError` (files present but not what they claim to be).
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

# IDX type byte -> big-endian numpy dtype (from the format description on the MNIST page).
IDX_DTYPES: dict[int, str] = {
    0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8",
}
SPLITS = ("train", "t10k")
_GZIP_MAGIC = b"\x1f\x8b"


class DatasetUnavailable(ValueError):
    """Files a dataset needs are not there; the message says how to install or point at them."""


class DataFormatError(ValueError):
    """A data file exists but is not valid (bad magic, truncated, wrong shape); names the file."""


def load_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzip, detected from its first bytes, not its name).

    Returns the array in native byte order with the file's dtype and shape.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataFormatError(f"{path}: corrupt gzip data ({err})") from None
    if len(raw) < 4:
        raise DataFormatError(f"{path}: not an IDX file (only {len(raw)} bytes, no magic number)")
    zero0, zero1, type_code, ndim = raw[:4]
    if zero0 or zero1 or type_code not in IDX_DTYPES:
        raise DataFormatError(
            f"{path}: not an IDX file (magic number {raw[:4].hex()}; expected 0000 then a type "
            f"byte in {', '.join(f'{c:02x}' for c in IDX_DTYPES)} then the number of dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"{path}: IDX shape {shape} of {dtype.name} needs {expected} data bytes, "
            f"file has {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def find_idx_pair(directory: str | Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) files of ``split`` ("train" or "t10k") in ``directory``.

    Accepts the usual names with or without ``.gz`` and both spellings seen in the wild
    (``train-images-idx3-ubyte`` and ``train-images.idx3-ubyte``). Raises
    :class:`DatasetUnavailable` listing what is missing; callers add how to get it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown IDX split {split!r}; expected one of {', '.join(SPLITS)}")
    directory = Path(directory)
    found: list[Path] = []
    missing: list[str] = []
    for part in ("images-idx3", "labels-idx1"):
        stems = [f"{split}-{part}-ubyte", f"{split}-{part.replace('-', '.')}-ubyte"]
        candidates = [directory / f"{stem}{ext}" for stem in stems for ext in (".gz", "")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(f"{stems[0]}(.gz)")
        else:
            found.append(hit)
    if missing:
        raise DatasetUnavailable(f"IDX files not found in {directory}: missing {', '.join(missing)}")
    return found[0], found[1]


def load_idx_pair(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, h, w)`` and labels ``int64 (N,)`` of one split, checked to agree."""
    images_path, labels_path = find_idx_pair(directory, split)
    images, labels = load_idx(images_path), load_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(f"{images_path}: expected uint8 images (N, h, w), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataFormatError(
            f"{labels_path}: expected {len(images)} labels to match {images_path.name}, got shape {labels.shape}"
        )
    return images, labels.astype(np.int64)
