"""The training loop's schedule bookkeeping: progress reaches 1 at the last weight step whatever
share of the data a method keeps for architecture steps."""
from __future__ import annotations

import pytest

from taskfold.trainer.config import config_from_dict
from taskfold.trainer.loop import fit, setup
from taskfold.trainer.methods.base import Progress

TINY = {
    "data": {"size": 32, "train_size": 20, "val_size": 4, "test_size": 4},
    "tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "depth", "kind": "depth"}],
    "model": {"backbone": "resnet10", "head_channels": 8},
    "train": {"epochs": 2, "batch_size": 4, "progress": False},
    "primary": "seg",
}


@pytest.mark.parametrize("method", ["shared", "aux_nas"])
def test_progress_reaches_one_at_the_last_step(method, tmp_path):
    state = setup(config_from_dict({**TINY, "method": method}), tmp_path)
    seen: list[float] = []
    original = state.method.start_epoch

    def record(model, progress: Progress):
        seen.append(progress.total_steps)
        return original(model, progress)

    state.method.start_epoch = record
    fit(state)
    steps = [r["step"] for r in state.run.read_metrics() if r["type"] == "train"]
    assert steps[-1] == seen[0]  # the last weight step is step total_steps: fraction 1.0
