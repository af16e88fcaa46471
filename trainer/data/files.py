"""Reading the papers' on-disk datasets: where to look, and one-line errors that name the path.

Every on-disk loader checks, before the first step, that its root, split lists and every label
file of every listed image exist, and that the file counts agree (the reference loaders assert
the same); a file that exists but cannot be decoded raises :class:`DataFormatError` naming it
when it is read. Nothing here downloads anything.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from taskfold.trainer.config import ConfigError
from taskfold.trainer.data.idx import DataFormatError, DatasetUnavailable

DOCS = "see docs/datasets.md"


def dataset_root(root: str | None, dataset: str) -> Path:
    """``data.root`` as a folder that exists."""
    if root is None:
        raise ConfigError(f"data.root: dataset {dataset!r} reads its files from a folder; "
                          f"set data.root to it ({DOCS})")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetUnavailable(f"{dataset}: data.root {path} is not a folder ({DOCS})")
    return path


def require_dir(path: Path, dataset: str, what: str) -> Path:
    if not path.is_dir():
        raise DatasetUnavailable(f"{dataset}: missing {what} folder {path}")
    return path


def require_file(path: Path, dataset: str, what: str) -> Path:
    if not path.is_file():
        raise DatasetUnavailable(f"{dataset}: missing {what} {path}")
    return path


def read_lines(path: Path, dataset: str, what: str) -> list[str]:
    """Non-empty stripped lines of a split/list file."""
    require_file(path, dataset, what)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def limit(items: list, num_samples: int | None) -> list:
    """The first ``num_samples`` items (all when None)."""
    return items if num_samples is None else items[:num_samples]


def read_npy(path: Path, dataset: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataFormatError(f"{dataset}: cannot read {path} ({exc})") from None


def read_image(path: Path, dataset: str, mode: str | None = None) -> np.ndarray:
    """A JPEG/PNG as an array (``mode`` e.g. ``"RGB"`` converts; None keeps the file's own mode,
    so 16-bit PNGs stay 16-bit)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode) if mode else image)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataFormatError(f"{dataset}: cannot read {path} ({type(exc).__name__})") from None


def read_mat(path: Path, dataset: str) -> dict:
    """A MATLAB file through scipy.io.loadmat (never pickle)."""
    from scipy.io import loadmat

    try:
        return loadmat(str(path))
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise DataFormatError(f"{dataset}: cannot read {path} ({exc})") from None


def check_shape(array: np.ndarray, shape: tuple, path: Path, dataset: str) -> np.ndarray:
    """``shape`` may hold None for any size."""
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise DataFormatError(f"{dataset}: {path} has shape {array.shape}, expected {want}")
    return array
