"""The command line end to end, and its promise for user mistakes: one line on stderr, exit 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from cli_runner import assert_main_user_error, assert_user_error, run_cli
from taskfold.cli.main import main

def test_demo_bundle_matches_pytorch_and_has_no_batchnorm(demo_bundle: Path):
    manifest = json.loads((demo_bundle / "manifest.json").read_text())
    assert manifest["format"] == "taskfold.bundle/1"
    assert manifest["compile"]["onnx_parity_max_abs"] <= 1e-4
    graph = onnx.load(str(demo_bundle / "model.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert [o.name for o in graph.output] == [t["output"] for t in manifest["tasks"]]
    assert graph.input[0].name == "image"


def test_runtime_outputs_match_pytorch_on_fresh_inputs(demo_run: Path, demo_bundle: Path):
    """An independent check of the compiler's own parity claim, on inputs it never saw."""
    import torch

    from taskfold.compiler.compile_run import load_trained
    from taskfold.runtime import load
    from taskfold.trainer.rundir import RunDir

    _, _, model = load_trained(RunDir(demo_run))
    images = np.random.default_rng(1).normal(size=(3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in model(torch.from_numpy(images)).items()}
    got = load(demo_bundle)(images)
    assert set(got) == set(expected)
    for task in expected:
        assert np.abs(got[task] - expected[task]).max() <= 1e-4, task


def test_flops_json_matches_manifest(demo_bundle: Path, capsys):
    assert main(["flops", str(demo_bundle), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    manifest = json.loads((demo_bundle / "manifest.json").read_text())
    assert result["macs"] == manifest["cost"]["macs"] and result["params"] == manifest["cost"]["params"]


def test_bench_json(demo_bundle: Path, capsys):
    assert main(["bench", str(demo_bundle), "--batch", "1,2", "--iters", "3", "--warmup", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["p50_ms"] <= r["p99_ms"] and r["provider"] == "CPUExecutionProvider" for r in rows)


def test_predict_writes_every_task(demo_bundle: Path, tmp_path: Path):
    images = tmp_path / "x.npy"
    np.save(images, np.zeros((2, 3, 64, 64), np.float32))
    assert main(["predict", str(demo_bundle), str(images)]) == 0
    out = np.load(tmp_path / "x.out.npz")
    assert sorted(out.files) == ["depth", "normals", "seg"] and out["seg"].shape[0] == 2


def test_unknown_config_field_exits_2(tmp_path: Path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("tasks: [{name: seg, kind: segmentation}]\nmodel: {backbon: resnet18}\n")
    assert_main_user_error(capsys, "unknown field 'model.backbon'", "train", str(recipe), "-o", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # nothing written for a config that cannot run


def test_unknown_backbone_exits_2(tmp_path: Path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("tasks: [{name: seg, kind: segmentation}]\nmodel: {backbone: resnet19}\n")
    assert_main_user_error(capsys, "unknown backbone 'resnet19'", "train", str(recipe), "-o", str(tmp_path / "r"))


def test_missing_bundle_file_exits_2(demo_bundle: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle, copy)
    (copy / "model.onnx").unlink()
    assert_user_error(run_cli("bench", str(copy)), "model.onnx")


def test_tampered_model_exits_2_and_is_left_alone(demo_bundle: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    assert_user_error(run_cli("flops", str(copy)), "sha256")
    assert (copy / "model.onnx").read_bytes() == bytes(data)  # nothing lost or rewritten


def test_wrong_input_shape_exits_2(demo_bundle: Path, tmp_path: Path):
    images = tmp_path / "x.npy"
    np.save(images, np.zeros((2, 3, 32, 32), np.float32))
    assert_user_error(run_cli("predict", str(demo_bundle), str(images)), "64")


def test_existing_run_directory_is_not_overwritten(demo_run: Path, capsys):
    before = sorted(p.name for p in demo_run.iterdir())
    assert_main_user_error(capsys, "already exists", "train", "configs/demo.yaml", "-o", str(demo_run))
    assert sorted(p.name for p in demo_run.iterdir()) == before


@pytest.mark.parametrize("args", [["flops", "/nonexistent/model.onnx"], ["compile", "/nonexistent/run"]])
def test_missing_paths_exit_2(args, capsys):
    assert_main_user_error(capsys, "nonexistent", *args)


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert_main_user_error(capsys, "not a taskfold run directory",
                           "train", "configs/demo.yaml", "-o", str(precious), "--overwrite")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_flops_on_a_file_that_is_not_onnx_exits_2(tmp_path: Path):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"\x00\x01 not a protobuf at all")
    assert_user_error(run_cli("flops", str(junk)), "not a readable ONNX model")


def test_bench_bad_batch_exits_2(demo_bundle: Path):
    assert_user_error(run_cli("bench", str(demo_bundle), "--batch", "0"), "batch sizes must be >= 1")
