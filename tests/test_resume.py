"""Resume: a run killed with SIGKILL at a random step and resumed ends bit-identical to a run that
was never interrupted (weights and metrics.jsonl), also when the kill came in the middle of a
checkpoint swap; --resume refuses finished runs and changes that alter training; a NaN loss
stops training with one line."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from cli_runner import ROOT, assert_user_error, run_cli
from taskfold.cli.main import main

RECIPE = {
    "data": {"dataset": "synthscenes", "size": 32, "train_size": 48, "val_size": 4, "test_size": 4, "seed": 0},
    "tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "normals", "kind": "normals"}],
    "model": {"backbone": "resnet10", "head_channels": 8},
    "train": {"epochs": 2, "batch_size": 4, "lr": 0.002, "log_every": 1, "checkpoint_every": 2},
}
METHODS = {"shared": {"method": "shared", "weighting": "dwa"},
           "aux_nas": {"method": {"name": "aux_nas"}, "primary": "seg", "weighting": "gradnorm"}}


def _recipe(tmp_path: Path, name: str, **extra) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **RECIPE, **METHODS[name], **extra}))
    return path


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field (the only thing a resume may change)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds", None)
    return records


def _train_steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum('"type": "train"' in line for line in lines)


def _kill_at_step(recipe: Path, run: Path, step: int) -> None:
    """Start `taskfold train` and SIGKILL it once it has logged ``step`` weight steps."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "taskfold.cli", "train", str(recipe), "-o", str(run), "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _train_steps(run) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "last").is_dir(), "killed before its first checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["shared", "aux_nas"])
def test_kill_9_at_a_random_step_then_resume_is_bit_identical(method, tmp_path):
    recipe = _recipe(tmp_path, method)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run_cli("train", str(recipe), "-o", str(reference), "--quiet").returncode == 0
    total = _train_steps(reference)
    step = random.randint(3, total - 1)  # after the first checkpoint (step 2); named in the failure message
    _kill_at_step(recipe, killed, step)
    proc = run_cli("train", "--resume", str(killed), "--quiet")
    assert proc.returncode == 0, proc.stderr
    want = load_file(str(reference / "checkpoints" / "last" / "model.safetensors"))
    got = load_file(str(killed / "checkpoints" / "last" / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all((want[k] == got[k]).all() for k in want), f"weights differ after a kill at step {step}"
    assert _records(killed) == _records(reference)  # appended, no duplicates, nothing lost


@pytest.mark.slow
def test_a_kill_in_the_middle_of_a_checkpoint_swap_resumes_from_the_previous_checkpoint(tmp_path):
    recipe = _recipe(tmp_path, "shared")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run_cli("train", str(recipe), "-o", str(reference), "--quiet").returncode == 0
    _kill_at_step(recipe, killed, 9)
    # The state a kill between the swap's two renames leaves: the previous checkpoint moved aside,
    # the new one half written (no COMPLETE marker).
    checkpoints = killed / "checkpoints"
    shutil.rmtree(checkpoints / "last.new", ignore_errors=True)
    os.replace(checkpoints / "last", checkpoints / "last.old")
    (checkpoints / "last.new").mkdir()
    (checkpoints / "last.new" / "model.safetensors").write_bytes(b"\0" * 100)
    proc = run_cli("train", "--resume", str(killed), "--quiet")
    assert proc.returncode == 0, proc.stderr
    want = load_file(str(reference / "checkpoints" / "last" / "model.safetensors"))
    got = load_file(str(checkpoints / "last" / "model.safetensors"))
    assert all((want[k] == got[k]).all() for k in want)
    assert not (checkpoints / "last.old").exists() and not (checkpoints / "last.new").exists()


@pytest.mark.slow
def test_resume_refuses_a_finished_run_and_unsafe_changes(tmp_path):
    recipe = _recipe(tmp_path, "shared", train={**RECIPE["train"], "epochs": 1})
    run = tmp_path / "run"
    assert run_cli("train", str(recipe), "-o", str(run), "--quiet").returncode == 0
    before = (run / "metrics.jsonl").read_bytes()
    assert_user_error(run_cli("train", "--resume", str(run)), "is finished")
    (run / "metrics.jsonl").write_bytes(before.rsplit(b"\n", 2)[0] + b"\n")  # as if killed before the test
    assert_user_error(run_cli("train", "--resume", str(run), "--set", "train.lr=0.1", "--set", "model.head_channels=4"),
                      "changed model.head_channels, train.lr")
    assert_user_error(run_cli("train", str(recipe), "--resume", str(run)), "cannot be given with it")
    assert_user_error(run_cli("train", "--resume", str(tmp_path / "nowhere")), "not a taskfold run directory")


def test_a_nan_loss_stops_training_with_one_line_naming_task_and_step(tmp_path, capsys):
    recipe = _recipe(tmp_path, "shared", train={**RECIPE["train"], "optimizer": "sgd", "lr": 1e12})
    capsys.readouterr()
    assert main(["train", str(recipe), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "the loss of task" in line and " at step " in line and "last finite total loss" in line, line
