"""Data-parallel training (trainer/distributed.py): two gloo processes on the CPU.

- Two processes with SyncBatchNorm equal one process with the same global batch and seed.
- Every method (and a per-task-gradient strategy) finishes under two processes with the same
  network and architecture decision on both ranks (the run gathers and compares every rank's
  fingerprint and decision; a mismatch is an error), and the run directory is written once.
- A two-process run killed with SIGKILL and resumed with two processes ends bit-identical to an
  uninterrupted two-process run; resuming with another process count is refused.
- The pieces, in one process: each rank's share of the batch plan, merged evaluation meters.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from cli_runner import ROOT, assert_user_error, run_cli

BASE = {
    "data": {"dataset": "synthscenes", "size": 32, "train_size": 32, "val_size": 6, "test_size": 5, "seed": 0},
    "tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "normals", "kind": "normals"}],
    "model": {"backbone": "resnet10", "head_channels": 8},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "log_every": 1, "checkpoint_every": 2},
}
METHODS = {
    "aux_nas": {"method": {"name": "aux_nas"}, "primary": "seg"},
    "dmtg": {"method": {"name": "dmtg", "num_groups": 2, "stem_blocks": 1, "hard": True, "finetune_epochs": 1}},
    "bmtas": {"method": {"name": "bmtas", "retrain_epochs": 1, "warmup_fraction": 0.1, "arch_fraction": 0.25,
                         "resource_lambda": 0.02}},
    "pcgrad": {"method": "shared", "weighting": "pcgrad"},
}


def _recipe(tmp_path: Path, name: str, train: dict | None = None, data: dict | None = None, **extra) -> Path:
    recipe = {"name": name, **BASE, **extra}
    recipe["train"] = {**BASE["train"], **(train or {})}
    recipe["data"] = {**BASE["data"], **(data or {})}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def _records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds", None)
    return records


def _train(recipe: Path, run: Path, nproc: int = 1) -> None:
    proc = run_cli("train", str(recipe), "-o", str(run), "--quiet", *(["--nproc", str(nproc)] if nproc > 1 else []))
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# one process: the pieces


def test_each_rank_reads_its_share_of_every_global_batch():
    from taskfold.trainer.data.loader import EpochBatches

    one = EpochBatches(38, 8, seed=3, arch_fraction=0.25)
    ranks = [EpochBatches(38, 8, seed=3, arch_fraction=0.25, rank=r, world_size=3) for r in range(3)]
    for epoch in range(2):
        kinds = one.plan(epoch)
        shared_kinds = [r.plan(epoch) for r in ranks]
        global_batches = [list(batch) for batch in one]
        shards = [list(r) for r in ranks]
        # 38 samples: 10 architecture (batches of 8 and 2) and 28 weight (8, 8, 8, 4); the
        # architecture batch of 2 has fewer samples than the 3 ranks and is left out under DDP
        assert all(k == shared_kinds[0] for k in shared_kinds)
        kept = [(kind, batch) for kind, batch in zip(kinds, global_batches) if len(batch) >= 3]
        assert shared_kinds[0] == [kind for kind, _ in kept]
        for i, (_, batch) in enumerate(kept):
            assert [key for shard in shards for key in shard[i]] == batch  # contiguous shares, in rank order
        assert ranks[0].weight_batches == one.weight_batches == 4

    # a last weight batch of 1 sample with 2 ranks: one step fewer per epoch
    assert EpochBatches(17, 8, world_size=2).weight_batches == 2
    # evaluation keeps every sample: a rank with an empty share of the last batch skips it
    evals = [EpochBatches(9, 4, shuffle=False, rank=r, world_size=2) for r in range(2)]
    for r in evals:
        r.plan(0)
    seen = sorted(key.index for r in evals for batch in r for key in batch)
    assert seen == list(range(9))


@pytest.mark.parametrize("kind", ["segmentation", "normals", "depth", "edges", "classification"])
def test_evaluation_meters_merge_to_the_whole_split(kind):
    """A meter fed half the batches, merged with one fed the other half, reports what one meter fed
    every batch reports (how a DDP evaluation combines its ranks)."""
    from taskfold.trainer.data import create_dataset
    from taskfold.trainer.data.loader import load_batch
    from taskfold.trainer.tasks import create_task

    dataset = create_dataset("synthscenes", "val", size=16, num_samples=12, seed=1)
    task = create_task(kind, kind, dataset.info)
    generator = torch.Generator().manual_seed(0)
    whole, halves = task.new_meter(), [task.new_meter(), task.new_meter()]
    for start in range(0, 12, 3):
        _, targets = load_batch(dataset, range(start, start + 3))
        target = targets[task.target]
        pred = torch.randn((3, task.out_channels, *target.shape[-2:]) if target.dim() > 1 else (3, task.out_channels),
                           generator=generator)
        whole.update(pred, target)
        halves[start // 3 % 2].update(pred, target)
    halves[0].merge(halves[1])
    want, got = whole.compute(), halves[0].compute()
    assert want.keys() == got.keys()
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# two gloo processes


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """shared + EW, SyncBatchNorm, SGD: the weights after 4 steps agree to 1e-5. (SGD's update is
    linear in the gradient; Adam's per-element normalisation turns rounding-level differences of
    near-zero gradients into lr-sized steps, so with Adam two runs agree only to about lr.)"""
    recipe = _recipe(tmp_path, "shared", train={"optimizer": "sgd", "sync_bn": True}, method="shared", weighting="ew")
    one, two = tmp_path / "one", tmp_path / "two"
    _train(recipe, one)
    _train(recipe, two, nproc=2)
    want, got = _weights(one), _weights(two)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    # the weights did move (a run that trained nothing would pass the comparison above)
    assert any(float((want[k] - got[k]).abs().max()) < 1e-5 < float(want[k].std()) for k in want if "conv" in k)

    ones, twos = _records(one), _records(two)
    assert [r["type"] for r in twos] == [r["type"] for r in ones][:-1] + ["processes", "test"]  # written once
    assert (json.loads((two / "run_info.json").read_text())["processes"], json.loads((one / "run_info.json").read_text())["processes"]) == (2, 1)
    for task, metrics in ones[-1]["test"].items():  # evaluation sharded over 2 ranks, meters merged
        for name, value in metrics.items():
            assert twos[-1]["test"][task][name] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, name)


def _processes_records(run: Path) -> list[dict]:
    return [r for r in _records(run) if r["type"] == "processes"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_finishes_under_two_processes_with_the_ranks_in_agreement(method, tmp_path):
    recipe = _recipe(tmp_path, method, data={"train_size": 48}, **METHODS[method])
    run = tmp_path / "run"
    _train(recipe, run, nproc=2)
    stages = [run] + ([run / "retrain"] if (run / "retrain").is_dir() else [])
    assert len(stages) == (2 if method in ("dmtg", "bmtas") else 1)
    for stage in stages:
        records = _records(stage)
        (processes,) = _processes_records(stage)  # gathered from every rank, compared before writing
        assert processes["count"] == 2 and processes["fingerprints"][0] == processes["fingerprints"][1]
        assert sum(r["type"] == "test" for r in records) == 1  # rank 0 alone writes
        steps = [r["step"] for r in records if r["type"] == "train"]
        assert steps == sorted(set(steps))
        decision = json.loads((stage / "arch.json").read_text())["decision"]
        assert decision or method == "pcgrad"  # what was searched (shared + PCGrad searches nothing)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def _train_steps(run: Path) -> int:
    try:
        return sum('"type": "train"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_kill_both_ranks_then_resume_with_two_processes_is_bit_identical(tmp_path):
    recipe = _recipe(tmp_path, "pcgrad", data={"train_size": 40}, **METHODS["pcgrad"])
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _train(recipe, reference, nproc=2)
    step = random.randint(3, _train_steps(reference) - 1)  # after the first checkpoint (step 2)
    launcher = subprocess.Popen([sys.executable, "-m", "taskfold.cli", "train", str(recipe), "-o", str(killed),
                                 "--quiet", "--nproc", "2"], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while _train_steps(killed) < step and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and both ranks
    launcher.wait()
    assert (killed / "checkpoints" / "last").is_dir(), "killed before its first checkpoint"

    assert_user_error(run_cli("train", "--resume", str(killed), "--quiet"), "trained by 2 process(es)")
    proc = run_cli("train", "--resume", str(killed), "--quiet", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = _weights(reference), _weights(killed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), f"weights differ after a kill at step {step}"
    assert _records(killed) == _records(reference), f"metrics differ after a kill at step {step}"


@pytest.mark.slow
def test_nproc_with_a_bad_recipe_is_one_line(tmp_path):
    recipe = _recipe(tmp_path, "bad", method="shared", weighting="nope")
    assert_user_error(run_cli("train", str(recipe), "-o", str(tmp_path / "run"), "--nproc", "2"),
                      "unknown weighting strategy 'nope'")
    assert not (tmp_path / "run").exists()


def _two_gpus_missing() -> str | None:
    if not torch.cuda.is_available():
        from taskfold.runtime.cuda import cuda_unavailable_reason

        return cuda_unavailable_reason() or "torch.cuda.is_available() is false"
    if torch.cuda.device_count() < 2:
        return f"DDP on NCCL needs 2 GPUs; this machine has {torch.cuda.device_count()}"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_two_gpus_missing() is not None, reason=str(_two_gpus_missing()))
@pytest.mark.parametrize("method", ["aux_nas", "bmtas"])
def test_two_gpus_nccl_with_bf16_and_the_ranks_in_agreement(method, tmp_path):
    recipe = _recipe(tmp_path, method, data={"train_size": 48},
                     train={"device": "cuda", "amp": "bf16", "sync_bn": True}, **METHODS[method])
    run = tmp_path / "run"
    _train(recipe, run, nproc=2)
    info = json.loads((run / "run_info.json").read_text())
    assert info["processes"] == 2 and info["device"] == "cuda:0"
    (processes,) = _processes_records(run)
    assert processes["fingerprints"][0] == processes["fingerprints"][1]
