"""Shared fixtures: one tiny trained run of the demo recipe and its compiled bundle, made once per
session with the real CLI, so end-to-end tests exercise exactly what users run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

# The demo recipe cut to seconds of training. Its ASPP heads (the demo itself now uses DPT ones,
# issue 16) are kept here because test_precision's INT8 tolerances and teacher-data guard were
# calibrated on them; DPT-on-CNN export parity is tested in test_heads and by a full demo run.
TINY = ["data.train_size=48", "data.val_size=8", "data.test_size=8", "train.epochs=1",
        "train.batch_size=16", "train.progress=false", "bench.iters=3", "bench.warmup=1",
        "model.dense_head=aspp"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    from taskfold.cli.main import demo_recipe, main

    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    args = ["train", str(demo_recipe()), "-o", str(run_dir), "--quiet"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    return run_dir


@pytest.fixture(scope="session")
def demo_bundle(demo_run: Path) -> Path:
    from taskfold.cli.main import main

    assert main(["compile", str(demo_run)]) == 0
    return demo_run / "bundle"


def cached_backbones(img_size: int):
    """``build(name)``: the backbone ``name`` made once (seed 0, eval mode), then the same object
    again. Each test module calls this once, so each keeps its own backbones (VGG/ViT-B are slow
    to initialise)."""
    import functools

    from taskfold.models.backbones import create_backbone

    @functools.cache
    def build(name: str):
        torch.manual_seed(0)
        return create_backbone(name, img_size=img_size).eval()

    return build
