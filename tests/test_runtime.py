"""Runtime: a two-task bundle exported from torch, loaded and checked against torch and raw ORT."""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from taskfold.runtime import (
    BackendUnavailable, BundleError, InputError, benchmark, count_onnx, load, verify_bundle, write_manifest,
)
from taskfold.runtime.cuda import cuda_unavailable_reason

from bundle_edit import edit_manifest, rehash_file, write_manifest_text
from cli_runner import assert_user_error, run_cli

torch = pytest.importorskip("torch")
SIZE = 16


class TwoTasks(torch.nn.Module):
    """A trunk with a dense head and a global head: the shape of every taskfold bundle."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.seg = torch.nn.Conv2d(8, 5, 1)
        self.scene = torch.nn.Linear(8, 4)

    def forward(self, image: Any) -> tuple[Any, Any]:
        features = self.trunk(image)
        return self.seg(features), self.scene(features.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TwoTasks]:
    """A bundle folder (model.onnx + manifest.json written by write_manifest) and its torch model."""
    torch.manual_seed(0)
    model = TwoTasks().eval()
    folder = tmp_path_factory.mktemp("bundle")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(1, 3, SIZE, SIZE),), str(folder / "model.onnx"), dynamo=False,
            input_names=["image"], output_names=["seg_logits", "scene_logits"],
            dynamic_axes={"image": {0: "N"}, "seg_logits": {0: "N"}, "scene_logits": {0: "N"}},
        )
    cost = count_onnx(folder / "model.onnx")
    write_manifest(folder, {
        "name": "two-tasks",
        "method": "test",
        "input": {"name": "image", "shape": [-1, 3, SIZE, SIZE], "dtype": "float32", "layout": "NCHW",
                  "mean": [0.5] * 3, "std": [0.25] * 3},
        "tasks": [
            {"name": "seg", "kind": "segmentation", "output": "seg_logits", "shape": [-1, 5, SIZE, SIZE],
             "classes": 5},
            {"name": "scene", "kind": "classification", "output": "scene_logits", "shape": [-1, 4], "classes": 4},
        ],
        "cost": {"macs": cost.macs, "params": cost.params,
                 "per_task_macs": {"seg": cost.per_output_macs["seg_logits"],
                                   "scene": cost.per_output_macs["scene_logits"]}},
        "files": ["model.onnx"],
    })
    return folder, model


@pytest.fixture
def bundle_copy(built: tuple[Path, TwoTasks], tmp_path: Path) -> Path:
    """A private copy a test may damage."""
    return Path(shutil.copytree(built[0], tmp_path / "bundle"))


def _images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


def test_outputs_match_torch_and_a_raw_session(built: tuple[Path, TwoTasks]) -> None:
    folder, model = built
    predictor = load(folder, threads=1)
    images = _images(3)
    out = predictor(images)
    assert list(out) == ["seg", "scene"]
    with torch.no_grad():
        seg, scene = (t.numpy() for t in model(torch.from_numpy(images)))
    np.testing.assert_allclose(out["seg"], seg, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["scene"], scene, rtol=1e-5, atol=1e-5)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    raw_seg, raw_scene = session.run(["seg_logits", "scene_logits"], {"image": images})
    np.testing.assert_allclose(out["seg"], raw_seg, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["scene"], raw_scene, rtol=1e-6, atol=1e-6)


def test_manifest_fields_are_exposed(built: tuple[Path, TwoTasks]) -> None:
    folder, model = built
    predictor = load(folder, threads=2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert predictor.manifest == manifest == verify_bundle(folder)
    assert [t["name"] for t in predictor.tasks] == ["seg", "scene"]
    assert predictor.input_spec["shape"] == [-1, 3, SIZE, SIZE]
    assert predictor.provider == "CPUExecutionProvider" and predictor.threads == 2
    assert predictor.cost["params"] == sum(p.numel() for p in model.parameters())
    seg_macs = SIZE * SIZE * 8 * 3 * 9 + SIZE * SIZE * 5 * 8  # trunk conv + 1x1 seg conv
    assert predictor.cost["per_task_macs"] == {"seg": seg_macs, "scene": SIZE * SIZE * 8 * 3 * 9 + 8 * 4}
    assert set(manifest["files"]) == {"model.onnx"} and manifest["files"]["model.onnx"].startswith("sha256:")


def test_tampered_model_is_refused(bundle_copy: Path) -> None:
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx does not match its sha256 in manifest.json \(tampered"):
        load(bundle_copy)


def test_missing_model_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"bundle .*: model.onnx is missing$"):
        load(bundle_copy)


def _task(folder: Path, index: int, **changes: Any) -> list[dict]:
    tasks = json.loads((folder / "manifest.json").read_text())["tasks"]
    tasks[index] = {**tasks[index], **changes}
    return tasks


def _input(folder: Path, **changes: Any) -> dict:
    spec = json.loads((folder / "manifest.json").read_text())["input"]
    return {k: v for k, v in {**spec, **changes}.items() if v is not None}


def _truncate_and_rehash(folder: Path) -> None:
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    rehash_file(folder, "model.onnx")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: shutil.rmtree(d), "no such folder"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda d: (d / "manifest.json.sha256").unlink(), "manifest.json.sha256 is missing"),
    (lambda d: write_manifest_text(d, "{not json"), "not readable JSON"),
    (lambda d: write_manifest_text(d, json.dumps({"format": "other/9"})), "unknown format 'other/9'"),
    (lambda d: edit_manifest(d, files={"../model.onnx": "sha256:00"}), "is not inside the bundle"),
    # a swapped task name, the manifest's hash left as it was
    (lambda d: edit_manifest(d, tasks=_task(d, 0, name="depth"), rehash=False),
     r"manifest.json does not match its sha256 in manifest.json.sha256"),
    (lambda d: edit_manifest(d, tasks={"seg": "seg_logits"}), "'tasks' must be a non-empty list"),
    (lambda d: edit_manifest(d, input=_input(d, shape=None)), "input.shape must be a list of integers"),
    (lambda d: edit_manifest(d, tasks=_task(d, 1, output="scene")),
     "task 'scene' reads output 'scene', which the graph does not have"),
    (lambda d: edit_manifest(d, input=_input(d, name="pixels")),
     r"the manifest's input 'pixels' does not match the graph's input\(s\) \['image'\]"),
    (lambda d: edit_manifest(d, input=_input(d, shape=[-1, 3, 32, 32])),
     r"input.shape \[-1, 3, 32, 32\] in the manifest contradicts the graph's \(\?,3,16,16\)"),
    (lambda d: edit_manifest(d, input=_input(d, dtype="float16")),
     "input.dtype 'float16' in the manifest contradicts the graph's float32"),
    (lambda d: edit_manifest(d, tasks=_task(d, 1, shape=[-1, 7])),
     r"task 'scene' shape \[-1, 7\] in the manifest contradicts the graph's \(\?,4\)"),
    (_truncate_and_rehash, "not a readable ONNX model"),
])
def test_broken_bundles_give_one_clear_line(bundle_copy: Path, damage: Any, message: str) -> None:
    damage(bundle_copy)
    with pytest.raises(BundleError, match=message) as caught:
        load(bundle_copy)
    assert "\n" not in str(caught.value)


def test_symbolic_links_in_a_bundle_are_refused(bundle_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.onnx"
    (bundle_copy / "model.onnx").rename(elsewhere)
    (bundle_copy / "model.onnx").symlink_to(elsewhere)  # same bytes, same hash: still refused
    with pytest.raises(BundleError, match="model.onnx is a symbolic link"):
        load(bundle_copy)
    (bundle_copy / "model.onnx").unlink()
    (bundle_copy / "model.onnx").write_bytes(elsewhere.read_bytes())
    (bundle_copy / "notes").symlink_to(tmp_path)  # not listed, still not allowed inside a bundle
    with pytest.raises(BundleError, match="notes is a symbolic link"):
        load(bundle_copy)


def test_the_session_runs_the_verified_bytes_not_the_file(bundle_copy: Path, monkeypatch: Any) -> None:
    """ONNX Runtime gets the bytes that were hashed; it never opens model.onnx by path."""
    opened = []
    real = ort.InferenceSession

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    predictor = load(bundle_copy, threads=1)
    assert len(opened) == 1 and opened[0] == (bundle_copy / "model.onnx").read_bytes()
    assert set(predictor(_images(1))) == {"seg", "scene"}


def _external_data_bundle(folder: Path, *, list_data: bool) -> np.ndarray:
    """A one-conv graph whose weight lives in ``weights.bin`` (ONNX external data)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(3).standard_normal((2, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["y"])], "ext",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    write_manifest(folder, {
        "name": "ext", "input": {"name": "image", "shape": [-1, 3, 4, 4], "dtype": "float32"},
        "tasks": [{"name": "y", "kind": "depth", "output": "y"}],
        "files": ["model.onnx", "weights.bin"] if list_data else ["model.onnx"]})
    return weight


def test_external_data_is_verified_and_read_from_memory(tmp_path: Path) -> None:
    folder = tmp_path / "ext"
    weight = _external_data_bundle(folder, list_data=True)
    images = _images(2)[:, :, :4, :4].copy()
    out = load(folder, threads=1)(images)["y"]
    np.testing.assert_allclose(out, np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], images), rtol=1e-5, atol=1e-5)
    data = bytearray((folder / "weights.bin").read_bytes())
    data[0] ^= 0x01
    (folder / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.bin does not match its sha256"):
        load(folder)


def test_unlisted_external_data_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ext"
    _external_data_bundle(folder, list_data=False)
    with pytest.raises(BundleError, match="reads external data from 'weights.bin', which the manifest does not list"):
        load(folder)


def test_nonfinite_inputs_are_refused_unless_allowed(built: tuple[Path, TwoTasks]) -> None:
    predictor = load(built[0], threads=1)
    images = _images(2)
    images[1, 0, 3, 3] = np.nan
    images[0, 2, 0, 0] = np.inf
    with pytest.raises(InputError, match=r"the images hold 2 NaN/inf value\(s\)"):
        predictor(images)
    out = predictor(images, allow_nonfinite=True)
    assert np.isnan(out["scene"][1]).all()  # what the check protects a caller from


def test_normalize_applies_the_manifest_mean_and_std(built: tuple[Path, TwoTasks]) -> None:
    from taskfold.runtime.inputs import normalize

    predictor = load(built[0], threads=1)
    raw = np.random.default_rng(4).uniform(0, 1, (2, 3, SIZE, SIZE))
    expected = ((raw - 0.5) / 0.25).astype(np.float32)  # the fixture's mean 0.5, std 0.25
    np.testing.assert_allclose(normalize(raw, predictor.input_spec), expected, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match=r"expected 0-1 images, got values in \[0\.\d+, 255\]"):
        normalize(raw * 255, predictor.input_spec)


@pytest.mark.parametrize(("images", "message"), [
    ([[0.0]], r"expected a numpy array of shape \(N,3,16,16\), got list"),
    (np.zeros((3, SIZE, SIZE), np.float32), r"expected a 4-D NCHW batch \(N,3,16,16\), got shape \(3,16,16\)"),
    (np.zeros((2, 1, SIZE, SIZE), np.float32), r"expected 3 channels .* got 1 in shape \(2,1,16,16\)"),
    (np.zeros((2, 3, 8, 8), np.float32), r"expected spatial size 16x16 .* got 8x8"),
    (np.zeros((2, 3, SIZE, SIZE)), r"expected dtype float32, got float64; convert with images.astype\(np.float32\)"),
    (np.zeros((0, 3, SIZE, SIZE), np.float32), r"expected a non-empty batch"),
])
def test_bad_inputs_are_refused(built: tuple[Path, TwoTasks], images: Any, message: str) -> None:
    predictor = load(built[0], threads=1)
    with pytest.raises(InputError, match=message):
        predictor(images)


def test_unknown_backend_lists_the_available_ones(built: tuple[Path, TwoTasks]) -> None:
    with pytest.raises(BackendUnavailable, match="unknown backend 'onnx'; available: onnxruntime, tensorrt"):
        load(built[0], backend="onnx")


def test_tensorrt_without_cuda_says_why(built: tuple[Path, TwoTasks]) -> None:
    if cuda_unavailable_reason() is None:
        pytest.skip("a CUDA device is visible; this test covers machines without one")
    with pytest.raises(BackendUnavailable, match="backend 'tensorrt' needs CUDA: no CUDA device is visible"):
        load(built[0], backend="tensorrt")


def test_unavailable_provider_is_not_replaced_by_the_cpu(built: tuple[Path, TwoTasks]) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers() and cuda_unavailable_reason() is None:
        pytest.skip("CUDA provider and device present; nothing to refuse")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        load(built[0], providers=["CUDAExecutionProvider"])


def test_benchmark_rows(built: tuple[Path, TwoTasks]) -> None:
    predictor = load(built[0], threads=1)
    rows = benchmark(predictor, (1, 4), warmup=1, iters=8)
    assert [row["batch"] for row in rows] == [1, 4]
    for row in rows:
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput_ips"] == pytest.approx(row["batch"] * 1e3 / row["mean_ms"])
        assert (row["provider"], row["threads"]) == ("CPUExecutionProvider", 1)
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        benchmark(predictor, (0,))


# Pay only for the tasks you ask for: predictor(x, tasks=[...]) runs a pruned sub-graph.
TRUNK_MACS = SIZE * SIZE * 8 * 3 * 9
SEG_HEAD_MACS = SIZE * SIZE * 5 * 8
SCENE_HEAD_MACS = 8 * 4


def test_task_subsets_give_the_full_runs_outputs(built: tuple[Path, TwoTasks]) -> None:
    predictor = load(built[0], threads=1)
    images = _images(3, seed=4)
    full = predictor(images)
    for tasks in (["seg"], ["scene"], ["scene", "seg"]):
        subset = predictor(images, tasks=tasks)
        assert list(subset) == tasks
        for name in tasks:
            np.testing.assert_allclose(subset[name], full[name], rtol=0, atol=1e-6)


def test_a_task_subset_runs_a_graph_without_the_other_tasks(built: tuple[Path, TwoTasks]) -> None:
    predictor = load(built[0], threads=1)
    predictor(_images(1), tasks=["scene"])
    session = predictor._backend_for(["scene_logits"]).session
    assert [o.name for o in session.get_outputs()] == ["scene_logits"]
    # The sub-graph has no 1x1 seg conv: only the trunk conv is left.
    pruned = predictor._graphs.graph(["scene_logits"])
    assert [n.op_type for n in pruned.graph.node].count("Conv") == 1


def test_cost_of_a_task_subset_counts_shared_blocks_once(built: tuple[Path, TwoTasks]) -> None:
    predictor = load(built[0], threads=1)
    assert predictor.cost(tasks=["seg"]) == TRUNK_MACS + SEG_HEAD_MACS == predictor.cost["per_task_macs"]["seg"]
    assert predictor.cost(tasks=["scene"]) == TRUNK_MACS + SCENE_HEAD_MACS
    everything = TRUNK_MACS + SEG_HEAD_MACS + SCENE_HEAD_MACS
    assert predictor.cost() == predictor.cost(tasks=["scene", "seg"]) == everything == predictor.cost["macs"]
    assert everything < sum(predictor.cost["per_task_macs"].values())  # the trunk is not paid twice


@pytest.mark.parametrize("tasks, message", [
    (["depth"], "unknown task(s) 'depth'; this bundle has seg, scene"),
    ("seg", "tasks must be a list of task names"),
    ([], "tasks is empty"),
    (["seg", "seg"], "task(s) 'seg' asked more than once"),
])
def test_bad_task_subsets_are_refused(built: tuple[Path, TwoTasks], tasks: Any, message: str) -> None:
    predictor = load(built[0], threads=1)
    with pytest.raises(InputError, match=re.escape(message)):
        predictor(_images(1), tasks=tasks)
    with pytest.raises(InputError, match=re.escape(message)):
        predictor.cost(tasks=tasks)


def test_benchmark_times_a_task_subset(built: tuple[Path, TwoTasks]) -> None:
    rows = benchmark(load(built[0], threads=1), (2,), warmup=0, iters=2, tasks=["scene"])
    assert rows[0]["batch"] == 2 and rows[0]["p50_ms"] > 0


def test_cli_predict_runs_only_the_asked_tasks(built: tuple[Path, TwoTasks], tmp_path: Path) -> None:
    images = _images(2, seed=7)
    np.save(tmp_path / "images.npy", images)
    proc = run_cli("predict", str(built[0]), str(tmp_path / "images.npy"), "--tasks", "scene", "--json")
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "images.out.npz") as saved:
        assert list(saved) == ["scene"]
        np.testing.assert_allclose(saved["scene"], load(built[0])(images)["scene"], rtol=0, atol=1e-6)
    proc = run_cli("predict", str(built[0]), str(tmp_path / "images.npy"), "--tasks", "seg,depth", "--overwrite")
    assert_user_error(proc, "unknown task(s) 'depth'")


def test_spin_wait_off_reaches_every_session_and_changes_no_output(built: tuple[Path, TwoTasks]) -> None:
    folder, _ = built
    images = _images(2)
    quiet = load(folder, threads=2, spin_wait=False)
    key = "session.intra_op.allow_spinning"
    for session in (quiet._backend.session, quiet._backend_for(["scene_logits"]).session):  # task subsets too
        assert session.get_session_options().get_session_config_entry(key) == "0"
    spinning = load(folder, threads=2)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's default: spin
        spinning._backend.session.get_session_options().get_session_config_entry(key)
    for name, value in spinning(images).items():
        np.testing.assert_allclose(quiet(images)[name], value, rtol=0, atol=1e-6)
    with pytest.raises(BackendUnavailable, match="spin_wait= applies to the onnxruntime backend"):
        load(folder, backend="torch", spin_wait=False)
