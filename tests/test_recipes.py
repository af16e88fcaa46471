"""The shipped recipes: the packaged demo (``taskfold demo`` on an installed wheel) is the same
file as ``configs/demo.yaml`` (what ``make demo`` and the docs use), and every recipe in configs/
loads with a method and weighting strategy that build."""
from __future__ import annotations

from pathlib import Path

import pytest

from taskfold.cli.main import demo_recipe
from taskfold.trainer.config import load_config
from taskfold.trainer.methods import create_method
from taskfold.trainer.weighting import create_weighting

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_packaged_demo_recipe_is_configs_demo():
    assert demo_recipe().read_bytes() == (CONFIGS / "demo.yaml").read_bytes()


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_recipe_loads_and_its_components_build(recipe):
    cfg = load_config(CONFIGS / recipe)
    create_method(cfg.method)
    names = [t.name for t in cfg.tasks]
    create_weighting(cfg.weighting, tasks=names, primary=[cfg.primary] if cfg.primary else names,
                     task_weights={t.name: t.weight for t in cfg.tasks})
