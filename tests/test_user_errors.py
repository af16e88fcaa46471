"""One clear line, everywhere: each mistake below used to print a traceback (or, for `flops` on
an empty file, a confident "0 GMACs"). Now each exits 2 with one line naming the problem, and
nothing that existed before the command was changed."""
from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from bundle_edit import edit_manifest, rehash_file
from cli_runner import assert_user_error, run_cli
from fs_tools import clone, replace_bytes, snapshot
from taskfold.cli.main import demo_recipe, main
from taskfold.trainer.runlock import lock_file_for

DEMO = str(demo_recipe())


def _bundle_case(change: Callable[[Path], None]) -> Callable[..., list[str]]:
    def prepare(tmp: Path, run: Path, bundle: Path) -> list[str]:
        copy = clone(bundle, tmp / "bundle")
        change(copy)
        np.save(tmp / "x.npy", np.zeros((1, 3, 64, 64), np.float32))
        return ["predict", str(copy), str(tmp / "x.npy"), "-o", str(tmp / "out.npz")]
    return prepare


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _with_input(folder: Path, **changes) -> None:
    spec = {**_manifest(folder)["input"], **changes}
    edit_manifest(folder, input={k: v for k, v in spec.items() if v is not None})


def _with_task(folder: Path, **changes) -> None:
    tasks = _manifest(folder)["tasks"]
    tasks[0] = {**tasks[0], **changes}
    edit_manifest(folder, tasks=tasks)


def _run_case(change: Callable[[Path], None]) -> Callable[..., list[str]]:
    def prepare(tmp: Path, run: Path, bundle: Path) -> list[str]:
        copy = clone(run, tmp / "run")
        change(copy)
        return ["compile", str(copy), "-o", str(tmp / "compiled")]
    return prepare


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    replace_bytes(path, data[: len(data) // 3])


def _truncated_graph_rehashed(folder: Path) -> None:
    _truncate(folder / "model.onnx")
    rehash_file(folder, "model.onnx")


def _misfit_arch(run: Path) -> None:
    arch = json.loads((run / "arch.json").read_text())
    arch["head_channels"] += 16
    (run / "arch.json").write_text(json.dumps(arch))


def _binary_config(tmp: Path, run: Path, bundle: Path) -> list[str]:
    (tmp / "recipe.yaml").write_bytes(bytes(range(256)) * 4)
    return ["train", str(tmp / "recipe.yaml"), "-o", str(tmp / "r")]


def _empty_onnx(tmp: Path, run: Path, bundle: Path) -> list[str]:
    (tmp / "model.onnx").write_bytes(b"")
    return ["flops", str(tmp / "model.onnx")]


def _compile_into_cwd(tmp: Path, run: Path, bundle: Path) -> list[str]:
    return ["compile", str(clone(run, tmp / "run")), "-o", "."]


def _compile_into_the_run(tmp: Path, run: Path, bundle: Path) -> list[str]:
    copy = clone(run, tmp / "run")
    return ["compile", str(copy), "-o", str(copy)]


def _without_test_record(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(line for line in lines if '"type": "test"' not in line))


def _compile_into_a_folder_of_notes(tmp: Path, run: Path, bundle: Path) -> list[str]:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("mine")
    return ["compile", str(clone(run, tmp / "run")), "-o", str(tmp / "notes")]


def _compile_over_its_bundle(tmp: Path, run: Path, bundle: Path) -> list[str]:
    return ["compile", str(clone(run, tmp / "run"))]  # the run already holds run/bundle


def _predict_over_a_file(tmp: Path, run: Path, bundle: Path) -> list[str]:
    np.save(tmp / "x.npy", np.zeros((1, 3, 64, 64), np.float32))
    (tmp / "out.npz").write_bytes(b"earlier results")
    return ["predict", str(bundle), str(tmp / "x.npy"), "-o", str(tmp / "out.npz")]


def _overwrite_with_a_typo(tmp: Path, run: Path, bundle: Path) -> list[str]:
    return ["train", DEMO, "-o", str(clone(run, tmp / "r")), "--overwrite", "--quiet",
            "--set", "model.backbone=resnet1O"]


def _train_with(*sets: str, command: str = "train") -> Callable[..., list[str]]:
    def prepare(tmp: Path, run: Path, bundle: Path) -> list[str]:
        return [command, DEMO, "-o", str(tmp / "r"), "--quiet", *[a for s in sets for a in ("--set", s)]]
    return prepare


CASES = {
    "binary config file": (_binary_config, "not a text file"),
    "train.lr: .nan": (_train_with("train.lr=.nan"), "train.lr: must be a finite number > 0, got nan"),
    "data.size=100000": (_train_with("data.size=100000", "data.train_size=8"), "needs about"),
    "train_size=1e12": (_train_with("data.train_size=1000000000000"), "needs about"),
    "manifest tasks not a list": (_bundle_case(lambda b: edit_manifest(b, tasks={"seg": "seg"})),
                                  "'tasks' must be a non-empty list"),
    "manifest without input.shape": (_bundle_case(lambda b: _with_input(b, shape=None)),
                                     "input.shape must be a list of integers"),
    "an output the graph lacks": (_bundle_case(lambda b: _with_task(b, output="segmentation")),
                                  "which the graph does not have"),
    "an input the graph lacks": (_bundle_case(lambda b: _with_input(b, name="pixels")),
                                 "does not match the graph's input"),
    "a shape the graph contradicts": (_bundle_case(lambda b: _with_input(b, shape=[-1, 3, 128, 128])),
                                      "contradicts the graph's (?,3,64,64)"),
    "a dtype the graph contradicts": (_bundle_case(lambda b: _with_input(b, dtype="float64")),
                                      "input.dtype 'float64' in the manifest contradicts the graph's float32"),
    "truncated ONNX whose hash matches": (_bundle_case(_truncated_graph_rehashed), "not a readable ONNX model"),
    "truncated checkpoint": (_run_case(lambda r: _truncate(r / "checkpoints" / "last" / "model.safetensors")),
                             "is not readable"),
    "arch.json that does not fit the checkpoint": (_run_case(_misfit_arch), "checkpoint does not fit arch.json"),
    "malformed metrics.jsonl": (_run_case(lambda r: (r / "metrics.jsonl").write_text('{"type": "train"}\n{oops\n')),
                                "metrics.jsonl line 2 is not a JSON object"),
    "a run without a test record": (_run_case(_without_test_record), "has no test record"),
    "compile -o a folder that is not a bundle": (_compile_into_a_folder_of_notes, "is not a bundle"),
    "compile over an existing bundle": (_compile_over_its_bundle, "a bundle exists there (pass --overwrite"),
    "predict -o an existing file": (_predict_over_a_file, "already exists (pass --overwrite"),
    "name: /abs/path": (_train_with("name=/tmp/elsewhere"), "must be a plain name"),
    "a gradient strategy on a network that shares nothing": (
        _train_with("method=single", "weighting=pcgrad", "data.train_size=8"), "shares none"),
    "run --overwrite with a typo": (_overwrite_with_a_typo, "resnet1O"),
    "compile -o .": (_compile_into_cwd, "over the current directory"),
    "compile -o RUN": (_compile_into_the_run, "that is the run directory"),
    "flops on a 0-byte .onnx": (_empty_onnx, "not an ONNX model"),
    # Fields the pipeline used to meet only after training: refused before any work.
    "bench.threads: 0": (_train_with("bench.threads=0", command="run"), "threads >= 1"),
    "bench.iters: 0": (_train_with("bench.iters=0", command="run"), "need iters >= 1"),
    "compile.parity_tol: -1": (_train_with("compile.parity_tol=-1", command="run"), "parity_tol: must be a finite"),
}


def _cuda_missing() -> bool:
    from taskfold.compiler.tensorrt import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason() is not None


if _cuda_missing():  # on a GPU machine this recipe is valid and would train
    CASES["run with compile.tensorrt and no CUDA"] = (_train_with("compile.tensorrt=true", command="run"),
                                                      "needs CUDA")


@pytest.mark.parametrize("case", list(CASES))
def test_one_clear_line_and_nothing_changed(case: str, demo_run: Path, demo_bundle: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    prepare, fragment = CASES[case]
    argv = prepare(tmp_path, demo_run, demo_bundle)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert snapshot(tmp_path) == before


def test_through_the_real_command_line(tmp_path: Path) -> None:
    """Two of the cases above as a user meets them: a fresh process, no traceback."""
    _binary_config(tmp_path, tmp_path, tmp_path)
    assert_user_error(run_cli("train", str(tmp_path / "recipe.yaml")), "not a text file")
    _empty_onnx(tmp_path, tmp_path, tmp_path)
    assert_user_error(run_cli("flops", str(tmp_path / "model.onnx")), "not an ONNX model")


def test_a_locked_run_directory_names_the_holder(demo_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """Another process holds the run (an flock on its own open of the lock file, as a second
    `taskfold run` would): this one is refused with that PID and changes nothing."""
    run = clone(demo_run, tmp_path / "run")
    fd = os.open(lock_file_for(run), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"424242")
        before = snapshot(tmp_path)
        capsys.readouterr()
        assert main(["compile", str(run), "-o", str(tmp_path / "compiled")]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "is in use by process 424242" in line
        assert snapshot(tmp_path) == before
    finally:
        os.close(fd)


def test_version(capsys: pytest.CaptureFixture) -> None:
    from taskfold.runtime.bundle import taskfold_version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"taskfold {taskfold_version()}"


def test_a_corrupted_cache_file_is_rendered_again_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from taskfold.trainer.data import create_dataset

    def build():
        return create_dataset("synthscenes", "val", size=16, num_samples=3, cache_dir=str(tmp_path))

    first = build()
    (cache,) = tmp_path.glob("synthscenes-val-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])  # a killed copy, a full disk
    with caplog.at_level(logging.WARNING):
        again = build()
    assert "is unreadable" in caplog.text and str(cache) in caplog.text
    assert all((again.stored[k] == first.stored[k]).all() for k in first.stored)
    with np.load(cache) as rewritten:  # the cache is whole again
        assert len(rewritten["image"]) == 3
