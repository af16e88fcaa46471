"""The shipped recipes: the packaged demo is the same file as ``configs/demo.yaml``; every recipe
in configs/ loads with a method and weighting strategy that build; and every paper recipe on an
on-disk dataset trains (one epoch of a couple of steps, every stage) on a fixture written in that
dataset's on-disk format, with only its size shrunk, so a recipe cannot rot."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

import dataset_fixtures as fixtures
from taskfold.cli.main import demo_recipe
from taskfold.trainer.config import load_config
from taskfold.trainer.loop import train_stages
from taskfold.trainer.methods import create_method
from taskfold.trainer.rundir import RunDir
from taskfold.trainer.weighting import create_weighting

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WRITERS = {"nyuv2": fixtures.write_nyuv2, "cityscapes": fixtures.write_cityscapes, "celeba": fixtures.write_celeba,
           "taskonomy": fixtures.write_taskonomy, "pascal_context": fixtures.write_pascal}
PAPER_RECIPES = sorted(path.name for path in CONFIGS.glob("*.yaml") if load_config(path).data.dataset in WRITERS)
# 64 px: stride-32 features are 2x2, so batch norm has more than one value even in a batch of one.
SHRINK = ["data.size=64", "train.epochs=1", "train.batch_size=2", "model.head_channels=8", "train.progress=false",
          "data.workers=0"]
# Even, so that no batch (weight or architecture) holds one image: pooled heads normalise over the batch.
TRAIN_IMAGES = {"celeba": 2}


def test_packaged_demo_recipe_is_configs_demo():
    assert demo_recipe().read_bytes() == (CONFIGS / "demo.yaml").read_bytes()


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_recipe_loads_and_its_components_build(recipe):
    cfg = load_config(CONFIGS / recipe)
    assert cfg.name == Path(recipe).stem
    create_method(cfg.method)
    names = [t.name for t in cfg.tasks]
    create_weighting(cfg.weighting, tasks=names, primary=[cfg.primary] if cfg.primary else names,
                     task_weights={t.name: t.weight for t in cfg.tasks})


def test_every_paper_dataset_has_a_recipe():
    assert {load_config(CONFIGS / name).data.dataset for name in PAPER_RECIPES} == set(WRITERS)


@pytest.mark.slow  # ResNet-50 and MobileNetV2 networks: 10-60 s each on 2 cores
@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipe_trains_on_its_fixture(name: str, tmp_path: Path):
    dataset = load_config(CONFIGS / name).data.dataset
    (tmp_path / "data").mkdir()
    root = WRITERS[dataset](tmp_path / "data")
    overrides = [*SHRINK, f"data.root={root}", f"data.train_size={TRAIN_IMAGES.get(dataset, 4)}"]
    if load_config(CONFIGS / name).method_name == "bmtas":
        # Two architecture and two weight images: ASPP's image-pooling branch normalises over the batch.
        overrides += ["method.retrain_epochs=1", "method.arch_fraction=0.5"]
    if dataset == "pascal_context":  # the fixture has three train images: list one twice for four
        listing = root / "ImageSets" / "Context" / "train.txt"
        listing.write_text(listing.read_text() + listing.read_text().splitlines()[0] + "\n")
    cfg = load_config(CONFIGS / name, overrides)
    summary, last = train_stages(cfg, tmp_path / "run")
    records = RunDir(tmp_path / "run").read_metrics()
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert set(summary["test"]) == {t.name for t in RunDir(last).load_config().tasks}
    assert (Path(last) / "arch.json").is_file()
