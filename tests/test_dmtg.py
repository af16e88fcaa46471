"""DMTG: the Gumbel-weighted loss, read-off into at most K groups, the pruned graph (one ONNX
call, N outputs, parity with PyTorch) and its MACs against a count made by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cli_runner import assert_main_user_error
from taskfold.compiler.bundle import write_bundle
from taskfold.compiler.strip import strip
from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.models.nets import build_network
from taskfold.runtime import load
from taskfold.trainer.config import ConfigError
from taskfold.trainer.data.base import DatasetInfo
from taskfold.trainer.data.loader import load_batch
from taskfold.trainer.methods import create_method
from taskfold.trainer.tasks import create_task

SIZE = 32
TASKS = [TaskHead(f"t{i}", "classification", "global", 2 + i) for i in range(5)]


def group_net(num_groups=3, stem_blocks=1, head_hidden=16, **extra):
    torch.manual_seed(0)
    spec = ArchSpec(method="dmtg", backbone="resnet10", image_size=SIZE, tasks=TASKS, head_channels=8,
                    options={"num_groups": num_groups, "stem_blocks": stem_blocks, "head_hidden": head_hidden, **extra})
    return spec, build_network(spec)


def conv_linear_macs(module: nn.Module, x: torch.Tensor) -> int:
    """MACs of every Conv2d and Linear, from their weights and the output sizes seen in a forward."""
    total = 0

    def hook(mod, _inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return total


def test_loss_is_gumbel_weighted_sum_over_heads_that_ran():
    spec, model = group_net(skip_below=0.0)
    method = create_method({"name": "dmtg", "num_groups": 3, "stem_blocks": 1})
    model.train()
    images = torch.randn(4, 3, SIZE, SIZE)
    targets = {"classification": torch.zeros(4, dtype=torch.long)}
    tasks = [classification_task(t.name, t.out_channels) for t in TASKS]
    out = model(images)
    assert all(out[t.name].shape[0] == 3 for t in TASKS)  # every head ran (nothing skipped)
    losses = method.task_losses(model, out, targets, tasks)
    z = out.weights
    for i, t in enumerate(TASKS):
        expected = sum(z[i, k] * nn.functional.cross_entropy(out[t.name][k], targets["classification"]) for k in range(3))
        assert torch.allclose(losses[t.name], expected)
    assert torch.allclose(z.sum(dim=1), torch.ones(len(TASKS)))


def classification_task(name: str, classes: int):
    info = DatasetInfo((SIZE, SIZE), (0.0,) * 3, (1.0,) * 3, {"classification": {"classes": classes}})
    return create_task(name, "classification", info)


@pytest.mark.parametrize("head_hidden", [16, 0])
def test_hard_sampling_gradients_equal_every_head_with_autograd(head_hidden):
    """Hard sampling scores the unchosen heads without autograd; every gradient (weights and S)
    must equal the plain computation that back-propagates through all K·N heads."""
    spec, model = group_net(hard=True, tau=1.0, head_hidden=head_hidden)
    method = create_method({"name": "dmtg", "num_groups": 3, "stem_blocks": 1, "hard": True})
    tasks = [classification_task(t.name, t.out_channels) for t in TASKS]
    images, targets = torch.randn(4, 3, SIZE, SIZE), {"classification": torch.randint(0, 2, (4,))}
    with torch.no_grad():  # copies start identical (as in the paper): make them differ
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.group_logits.normal_()
    model.train()

    torch.manual_seed(1)
    sum(method.task_losses(model, model(images), targets, tasks).values()).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch.manual_seed(1)  # the same Gumbel draw, then every head and branch with autograd
    z = nn.functional.gumbel_softmax(model.group_logits, tau=1.0, hard=True, dim=1)
    x, stem_features = model._stem(images)
    feats = {k: model._branch(k, x, stem_features) for k in range(3)}
    pooled = {k: f[-1].mean(dim=(2, 3)) for k, f in feats.items()}
    total = sum(z[i, k] * task.loss(model._heads(task.name, feats, pooled, [0, 1, 2])[k], targets["classification"])
                for i, task in enumerate(tasks) for k in range(3))
    total.backward()
    plain = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fast["group_logits"].abs().sum() > 0
    assert fast.keys() < plain.keys()  # unchosen heads and branches: no grad, so the optimiser skips them
    for name, grad in plain.items():
        assert torch.allclose(fast.get(name, torch.zeros_like(grad)), grad, atol=1e-6), name


def test_negligible_heads_and_unused_branches_are_skipped():
    _, model = group_net(skip_below=0.5, tau=0.05)
    with torch.no_grad():
        model.group_logits.copy_(torch.tensor([[9.0, 0, 0]] * 5))  # every task wants group 0
    model.train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.active.sum() == 5 and out.active[:, 0].all()
    assert all(v.shape[0] == 1 for v in out.values())


def test_a_fixed_grouping_runs_only_the_chosen_heads_even_with_hard_sampling():
    _, model = group_net(hard=True)
    model.fix_assignment([0, 2, 2, 0, 0])  # frozen logits: no straight-through gradient to feed
    model.train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.active.sum() == 5 and out.active[:, 1].sum() == 0
    assert all(v.shape[0] == 1 for v in out.values())


def test_read_off_groups_vanish_and_pruned_bundle_matches(tmp_path):
    _, model = group_net()
    with torch.no_grad():  # tasks 0,1 -> group 2; tasks 2,3,4 -> group 0; group 1 empty
        model.group_logits.copy_(torch.tensor([[0, 0, 5.0], [0, 0, 5.0], [5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0]]))
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, SIZE, SIZE))  # non-trivial BN statistics
    x = torch.randn(4, 3, SIZE, SIZE)
    result = strip(model, reference_inputs=x)
    assert result.info["groups"] == {"0": ["t2", "t3", "t4"], "2": ["t0", "t1"]}
    assert result.info["strip_drift_max_abs"] < 1e-5
    tasks = [{"name": t.name, "kind": t.kind} for t in TASKS]
    bundle = write_bundle(tmp_path / "b", model=result.model, name="g", method="dmtg",
                          input_shape=(1, 3, SIZE, SIZE), mean=[0] * 3, std=[1] * 3, tasks=tasks, parity_inputs=x)
    predictor = load(bundle)
    images = np.random.default_rng(0).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    got = predictor(images)  # one ONNX Runtime call answers all N tasks
    with torch.no_grad():
        want = result.model(torch.from_numpy(images))
    assert sorted(got) == sorted(t.name for t in TASKS)
    for name in got:
        assert np.abs(got[name] - want[name].numpy()).max() <= 1e-4

    # MACs: stem + the two surviving branches + N heads, counted by hand from the PyTorch modules.
    pruned = result.model
    probe = torch.zeros(1, 3, SIZE, SIZE)
    stem = _Chain(pruned.stem)
    with torch.no_grad():
        stem_out = stem(probe)
    branch_macs = sum(conv_linear_macs(_Chain(b), stem_out) for b in pruned.branches.values())
    channels, hidden = model.branches[0][-1].conv2.out_channels, 16
    head_macs = sum(channels * hidden + hidden * t.out_channels for t in TASKS)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["cost"]["macs"] == conv_linear_macs(stem, probe) + branch_macs + head_macs
    assert set(manifest["cost"]["per_task_macs"]) == {t.name for t in TASKS}


class _Chain(nn.Module):
    """Blocks applied one after another (a stem or a group branch as one module)."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("options, fragment", [
    ({"num_groups": 0}, "must be >= 1"),
    ({"num_groups": 20, "max_groups": 8}, "exceed method.max_groups"),
])
def test_bad_group_counts(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        create_method({"name": "dmtg", **options})



@pytest.mark.parametrize("extra, fragment", [
    ("tasks: [{name: a, kind: classification, options: {target: nope}}, {name: b, kind: segmentation}]\n",
     "dataset has no label 'nope'"),
    ("tasks: [{name: a, kind: classification, options: {target: digit_class}}, {name: b, kind: segmentation}]\n"
     "data: {dataset: composites, options: {fashion_root: /nonexistent}, train_size: 8, val_size: 2, test_size: 2}\n",
     "Fashion-MNIST"),
    ("tasks: [{name: a, kind: segmentation}, {name: b, kind: depth}]\nmethod: {name: dmtg, num_groups: 3}\n",
     "3 groups for only 2 tasks"),
])
def test_bad_dmtg_inputs_exit_2(extra, fragment, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    text = extra if "method:" in extra else extra + "method: {name: dmtg, num_groups: 2}\n"
    if "data:" not in text:
        text += "data: {train_size: 8, val_size: 2, test_size: 2, size: 32}\n"
    recipe.write_text(text)
    assert_main_user_error(capsys, fragment, "train", str(recipe), "-o", str(tmp_path / "run"))


def test_report_shows_the_assignment_heatmap(tmp_path):
    from taskfold.trainer.config import config_from_dict
    from taskfold.trainer.loop import train
    from taskfold.trainer.report import write_report
    from taskfold.trainer.rundir import RunDir

    cfg = config_from_dict({"method": {"name": "dmtg", "num_groups": 2, "stem_blocks": 1},
                            "tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "depth", "kind": "depth"},
                                      {"name": "scene", "kind": "classification"}],
                            "data": {"size": 32, "train_size": 8, "val_size": 2, "test_size": 2},
                            "model": {"backbone": "resnet10", "head_channels": 8},
                            "train": {"epochs": 1, "batch_size": 4, "progress": False}})
    summary = train(cfg, tmp_path)
    report = write_report(RunDir(tmp_path), summary=summary).read_text()
    assert "## Task groups (DMTG)" in report and (tmp_path / "groups.png").stat().st_size > 0


def _tiny_config(method: dict, **extra):
    from taskfold.trainer.config import config_from_dict

    return config_from_dict({"method": method, **extra,
                             "tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "depth", "kind": "depth"},
                                       {"name": "scene", "kind": "classification"}],
                             "data": {"size": 32, "train_size": 8, "val_size": 4, "test_size": 2},
                             "model": {"backbone": "resnet10", "head_channels": 8},
                             "train": {"epochs": 1, "batch_size": 4, "progress": False}})


def test_init_from_naive_mtl_reproduces_it_then_fine_tune_keeps_the_read_off(tmp_path):
    """A GroupNet started from a naive-MTL run answers every task exactly as that run does (all
    branches are its encoder, all head copies its heads); the fine-tune stage trains the read-off
    groups, frozen, from the search's weights; the report compares it with the naive-MTL run."""
    from taskfold.trainer.loop import setup, train, train_stages
    from taskfold.trainer.report import write_report
    from taskfold.trainer.rundir import RunDir

    train(_tiny_config("shared"), tmp_path / "mtl")
    shared = build_network(RunDir(tmp_path / "mtl").load_arch())
    RunDir(tmp_path / "mtl").load_weights(shared)
    method = {"name": "dmtg", "num_groups": 2, "stem_blocks": 1, "head_hidden": 0,
              "init_from": str(tmp_path / "mtl"), "finetune_epochs": 1}
    state = setup(_tiny_config(method), tmp_path / "probe")
    images = load_batch(state.datasets["val"], range(len(state.datasets["val"])))[0]
    with torch.no_grad():
        expected, got = shared.eval()(images), state.model.eval()(images)
    for task in expected:
        assert torch.allclose(got[task], expected[task], atol=1e-5), task

    baseline = {"report": {"baseline": str(tmp_path / "mtl")}}
    summary, last = train_stages(_tiny_config(method, **baseline), tmp_path / "dmtg")
    search = RunDir(tmp_path / "dmtg").load_arch().decision["assignment"]
    finetuned = RunDir(last).load_arch()
    assert last == tmp_path / "dmtg" / "retrain"
    assert finetuned.options["assignment"] == "fixed"
    assert finetuned.decision["assignment"] == search
    assert summary["test"].keys() == {"seg", "depth", "scene"}

    naive = RunDir(tmp_path / "mtl").test_metrics()
    gain = 100 * sum((naive[t]["loss"] - summary["test"][t]["loss"]) / naive[t]["loss"] for t in naive) / 3
    report = write_report(RunDir(last), summary=summary).read_text()
    assert f"| NormGain_L (test losses) | {gain:+.2f} % |" in report


def test_report_baseline_must_be_a_finished_run_of_the_same_tasks(tmp_path):
    from taskfold.trainer.loop import setup, train

    with pytest.raises(ConfigError, match="report.baseline: .* is not a finished run"):
        setup(_tiny_config("shared", report={"baseline": str(tmp_path / "nothing")}), tmp_path / "a")
    other = _tiny_config("shared")
    other.tasks = other.tasks[:2]
    train(other, tmp_path / "two_tasks")
    with pytest.raises(ConfigError, match="report.baseline: the run at .* has no results for task 'scene'"):
        setup(_tiny_config("shared", report={"baseline": str(tmp_path / "two_tasks")}), tmp_path / "b")


@pytest.mark.parametrize("method, fragment", [
    ({"assignment": "fixed"}, "method.groups: give it exactly when method.assignment is fixed"),
    ({"assignment": "fixed", "groups": [0, 5, 1]}, "method.groups: needs one group in [0, 1]"),
    ({"init_from": "/nonexistent/run"}, "method.init_from: no checkpoint at /nonexistent/run"),
    ({"finetune_epochs": -1}, "method.finetune_epochs: must be >= 0"),
])
def test_bad_fine_tune_and_init_options(method, fragment, tmp_path):
    from taskfold.trainer.loop import setup

    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        setup(_tiny_config({"name": "dmtg", "num_groups": 2, **method}), tmp_path / "run")
