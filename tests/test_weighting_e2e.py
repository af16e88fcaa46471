"""Every weighting strategy composes with every architecture: a tiny run of `shared` and of
`aux_nas` with each registered strategy trains end to end and logs what the strategy learned."""
from __future__ import annotations

import math

import pytest
import torch

from fast_subset import slow_except
from taskfold.trainer.config import ConfigError, config_from_dict
from taskfold.trainer.loop import setup, train
from taskfold.trainer.rundir import RunDir
from taskfold.trainer.weighting import WEIGHTINGS
from taskfold.trainer.weighting.common import GradientStrategy
from taskfold.trainer.weighting.grads import SharedPart

TINY = {
    "data": {"size": 32, "train_size": 16, "val_size": 4, "test_size": 4},
    "tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "depth", "kind": "depth"}],
    "model": {"backbone": "resnet10", "head_channels": 8},
    "train": {"epochs": 2, "batch_size": 8, "log_every": 1, "progress": False},
    "primary": "seg",
}


@pytest.fixture
def combinations(monkeypatch) -> list[torch.Tensor]:
    """Per weight step of a gradient strategy, each task's gradient norm on the shared part, recorded
    when the combination ``sum_t beta_t g_t`` replaces the shared gradient (the step is not a plain sum)."""
    seen: list[torch.Tensor] = []
    combine = SharedPart.backward

    def recording(self, grads, beta, rest_total):
        seen.append(grads.detach().norm(dim=1))
        return combine(self, grads, beta, rest_total)

    monkeypatch.setattr(SharedPart, "backward", recording)
    return seen


def assert_combined(strategy: str, combinations: list[torch.Tensor], steps: int) -> None:
    """A gradient strategy combined both tasks' gradients at every weight step, and each task's
    gradient reached the shared part (Aux-NAS's auxiliary one only once its zero-initialised
    fusion convolutions have moved, hence "at some step")."""
    if issubclass(WEIGHTINGS.get(strategy), GradientStrategy):
        assert len(combinations) == steps and all(norms.shape == (2,) for norms in combinations)
        assert bool((torch.stack(combinations).amax(dim=0) > 0).all())
    else:
        assert combinations == []


FAST_ON_AUX_NAS = ("ew", "cagrad")  # the other strategies on aux_nas run in the slow suite


@pytest.mark.parametrize("method, strategy", [
    pytest.param(method, strategy, id=f"{strategy}-{method}",
                 marks=[pytest.mark.slow] if method == "aux_nas" and strategy not in FAST_ON_AUX_NAS else [])
    for method in ("shared", "aux_nas") for strategy in WEIGHTINGS.names()])
def test_strategy_trains_end_to_end(method, strategy, combinations, tmp_path):
    torch.manual_seed(0)
    cfg = config_from_dict({**TINY, "method": method, "weighting": strategy})
    summary = train(cfg, tmp_path)
    records = RunDir(tmp_path).read_metrics()
    steps = [r for r in records if r["type"] == "train"]
    assert len(steps) == (2 if method == "aux_nas" else 4)  # aux_nas spends half of each epoch on alpha
    assert_combined(strategy, combinations, len(steps))
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert set(summary["test"]) == {"seg", "depth"}
    if strategy != "ew":
        assert any(k.startswith("weighting/") for r in steps for k in r)
    if method == "aux_nas":
        assert any("arch/max_alpha_p" in r for r in steps)


@pytest.mark.parametrize("spec, fragment", [
    ({"name": "nope"}, "unknown weighting strategy 'nope'"),
    ({"name": "ial", "g": 3}, "weighting.g"),
    ({"name": "cagrad", "c": "big"}, "weighting.c: expected a number"),
])
def test_bad_strategy_config(spec, fragment, tmp_path):
    cfg = config_from_dict({**TINY, "weighting": spec})
    with pytest.raises(ValueError, match=fragment):
        setup(cfg, tmp_path)


def test_strategy_needing_primary_without_one(tmp_path):
    raw = {k: v for k, v in TINY.items() if k != "primary"}
    cfg = config_from_dict({**raw, "weighting": "gcs"})
    with pytest.raises(ConfigError, match="needs `primary:`"):
        setup(cfg, tmp_path)


@pytest.mark.parametrize("method", [
    {"name": "dmtg", "num_groups": 2, "stem_blocks": 1},
    {"name": "bmtas", "resource_lambda": 0.1},
], ids=["dmtg", "bmtas"])
@pytest.mark.parametrize("strategy", slow_except(["uw", "pcgrad", "gcs", "ial"], {"pcgrad"}))
def test_strategies_compose_with_searchable_networks(method, strategy, combinations, tmp_path):
    """The searched networks expose their shared stem/blocks, so gradient strategies apply too."""
    torch.manual_seed(0)
    cfg = config_from_dict({**TINY, "method": method, "weighting": strategy})
    summary = train(cfg, tmp_path)
    steps = [r for r in RunDir(tmp_path).read_metrics() if r["type"] == "train"]
    assert_combined(strategy, combinations, len(steps))
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    assert set(summary["test"]) == {"seg", "depth"}
