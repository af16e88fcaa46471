"""Random damage, seeded: a few hundred manifests and input batches a user could hand the runtime.
Each is either accepted, and then provably fits the graph, or refused with the runtime's own
error (BundleError / InputError); any other exception is a crash a user would meet as a traceback.
The oracle is computed apart from the code under test: from the ONNX graph itself, and from the
plain rules of the input contract."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from bundle_edit import write_manifest_text
from fs_tools import clone
from taskfold.runtime.bundle import open_bundle
from taskfold.runtime.errors import BundleError, InputError
from taskfold.runtime.inputs import check_images

ODD_VALUES: list[Any] = [None, True, 0, -1, 3.5, float("nan"), "", "x", "float64", [], [1], [-1, 3, 64],
                         [-1, 3, 64, 64], ["a"], {}, {"name": 1}, [{"name": "x"}], 10 ** 30]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path into a JSON value."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _damage(manifest: dict, rng: random.Random) -> dict:
    """One to three edits: a value replaced by an odd one, a key or item deleted, a key added."""
    damaged = copy.deepcopy(manifest)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(damaged))
        parent = damaged
        for key in path[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.6:
            parent[path[-1]] = rng.choice(ODD_VALUES)
        elif action < 0.85:
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "name", "output", "shape", "dtype"])] = rng.choice(ODD_VALUES)
        if not _paths(damaged):
            break
    return damaged


def _fits_graph(manifest: dict, graph: onnx.ModelProto) -> bool:
    """What an accepted manifest must promise truthfully: the graph's input name, a shape that
    agrees with the graph's on every fixed dimension, and outputs the graph has."""
    (graph_input,) = [i for i in graph.graph.input if i.name not in {t.name for t in graph.graph.initializer}]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim]
    spec = manifest["input"]
    outputs = {o.name for o in graph.graph.output}
    shape_ok = len(spec["shape"]) == len(dims) and all(
        g is None or s < 0 or s == g for s, g in zip(spec["shape"], dims))
    return (spec["name"] == graph_input.name and shape_ok
            and all(task["output"] in outputs for task in manifest["tasks"]))


def test_damaged_manifests_are_refused_or_fit_the_graph(demo_bundle: Path, tmp_path: Path) -> None:
    folder = clone(demo_bundle, tmp_path / "bundle")
    original = json.loads((folder / "manifest.json").read_text())
    graph = onnx.load(str(demo_bundle / "model.onnx"))
    rng = random.Random(0)
    refused = accepted = 0
    for case in range(300):
        damaged = _damage(original, rng)
        text = json.dumps(damaged) if case % 10 else json.dumps(damaged)[: rng.randint(0, 200)]
        write_manifest_text(folder, text)
        try:
            open_bundle(folder).graph("model.onnx")
        except BundleError as exc:
            assert str(exc).count("\n") == 0, exc
            refused += 1
            continue
        assert _fits_graph(damaged, graph), (case, text)
        accepted += 1
    assert refused > 100 and accepted > 0  # the damage reaches the checks, and harmless edits pass


def _fits_contract(images: Any) -> bool:
    return (isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[0] > 0
            and images.shape[1:] == (3, 64, 64) and images.dtype == np.float32
            and bool(np.isfinite(images).all()))


@pytest.mark.parametrize("seed", range(2))
def test_random_batches_are_refused_or_fit_the_contract(seed: int) -> None:
    spec = {"name": "images", "shape": [-1, 3, 64, 64], "dtype": "float32"}
    rng = np.random.default_rng(seed)
    dtypes = [np.float32] * 5 + [np.float64, np.float16, np.int64, np.uint8, np.bool_]
    refused = accepted = 0
    for _ in range(150):
        ndim = int(rng.choice([3, 4, 4, 4, 4, 4, 5]))
        shape = [int(rng.choice([0, 1, 2])), int(rng.choice([1, 3, 3, 3, 4])), int(rng.choice([63, 64, 64, 64])),
                 int(rng.choice([64, 64, 64, 65]))][:ndim] + [1] * max(0, ndim - 4)
        images: Any = rng.standard_normal(shape).astype(dtypes[int(rng.integers(len(dtypes)))])
        if images.size and rng.random() < 0.2 and images.dtype.kind == "f":
            images.flat[int(rng.integers(images.size))] = rng.choice([np.nan, np.inf])
        if rng.random() < 0.05:
            images = images.tolist()
        try:
            assert check_images(images, spec) is images
        except InputError as exc:
            assert not _fits_contract(images) and "\n" not in str(exc)
            refused += 1
            continue
        assert _fits_contract(images)
        accepted += 1
    assert refused > 0 and accepted > 0
