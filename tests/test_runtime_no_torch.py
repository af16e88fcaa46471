"""The runtime works where torch cannot be imported: proven in a subprocess that blocks it.

The bundle is built here with onnx.helper (no torch), and the subprocess's outputs are checked
against a numpy implementation of the same graph.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from taskfold.runtime import write_manifest

# Runs in a fresh interpreter: any attempt to import torch (even one a library would catch)
# is recorded and refused, then every runtime module is imported and a bundle is served.
CHILD = r"""
import importlib, importlib.abc, json, pkgutil, sys
import numpy as np

class BlockTorch(importlib.abc.MetaPathFinder):
    attempts = []
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            BlockTorch.attempts.append(name)
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, BlockTorch())
import taskfold.runtime as rt
modules = [m.name for m in pkgutil.walk_packages(rt.__path__, "taskfold.runtime.")]
for name in modules:
    importlib.import_module(name)
bundle, images_path, out_path = sys.argv[1:4]
predictor = rt.load(bundle, threads=1)
np.savez(out_path, **predictor(np.load(images_path)))
rows = rt.benchmark(predictor, (2,), warmup=0, iters=2)
print(json.dumps({"attempts": BlockTorch.attempts, "modules": modules, "macs": rt.count_onnx(bundle).macs,
                  "torch_in_modules": any(m.split(".")[0] == "torch" for m in sys.modules),
                  "bench_batches": [r["batch"] for r in rows]}))
"""


def _bundle(folder: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 1x1 conv + ReLU (output "dense") and global pool + Gemm (output "global"); returns weights."""
    weights = {
        "w_conv": rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
        "b_conv": rng.standard_normal(4).astype(np.float32),
        "w_fc": rng.standard_normal((2, 4)).astype(np.float32),
        "b_fc": rng.standard_normal(2).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["image", "w_conv", "b_conv"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["dense"]),
        helper.make_node("GlobalAveragePool", ["dense"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w_fc", "b_fc"], ["global"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["N", 4, 8, 8]),
         helper.make_tensor_value_info("global", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, folder / "model.onnx")
    write_manifest(folder, {
        "name": "tiny", "method": "test",
        "input": {"name": "image", "shape": [-1, 3, 8, 8], "dtype": "float32", "layout": "NCHW"},
        "tasks": [{"name": "mask", "kind": "segmentation", "output": "dense", "shape": [-1, 4, 8, 8]},
                  {"name": "label", "kind": "classification", "output": "global", "shape": [-1, 2]}],
    })
    return weights


def test_runtime_needs_no_torch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "bundle"
    folder.mkdir()
    w = _bundle(folder, rng)
    images = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["attempts"] == [] and not report["torch_in_modules"]
    assert {"taskfold.runtime.predictor", "taskfold.runtime.flops.count"} <= set(report["modules"])
    assert report["macs"] == 4 * 8 * 8 * 3 + 2 * 4 and report["bench_batches"] == [2]

    dense = np.maximum(np.einsum("oc,nchw->nohw", w["w_conv"][:, :, 0, 0], images)
                       + w["b_conv"][None, :, None, None], 0)
    label = dense.mean(axis=(2, 3)) @ w["w_fc"].T + w["b_fc"]
    out = np.load(tmp_path / "out.npz")
    assert sorted(out.files) == ["label", "mask"]
    np.testing.assert_allclose(out["mask"], dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["label"], label, rtol=1e-5, atol=1e-5)
