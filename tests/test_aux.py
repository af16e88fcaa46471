"""Aux-G / Aux-NAS: the stripped primary network is exactly the full network with alpha^P = 0,
gradients flow only where the link layout says, and the lambda schedules are as specified."""
from __future__ import annotations

import pytest
import torch

from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.models.nets import build_network
from taskfold.trainer.methods.aux import lambda_at

TASKS = [TaskHead("seg", "segmentation", "dense", 5), TaskHead("normals", "normals", "dense", 3),
         TaskHead("depth", "depth", "dense", 1)]


def make(method: str, backbone: str = "resnet18", tasks=TASKS, **options):
    torch.manual_seed(0)
    spec = ArchSpec(method=method, backbone=backbone, image_size=32, tasks=tasks, head_channels=8,
                    primary=["seg"], options=options)
    return build_network(spec)


def randomise(model) -> None:
    """Non-zero fusion convs, alpha away from init and non-trivial BN statistics."""
    for op in model.fusions.values():
        torch.nn.init.normal_(op.conv.weight, std=0.2)
    for logit in model.alpha_logits.values():
        torch.nn.init.normal_(logit.data)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32))
    model.eval()


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny_patch16_224"])
def test_stripped_equals_full_network_with_alpha_p_zero(backbone):
    model = make("aux_nas", backbone)
    randomise(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model(x)["seg"]
        model.cut_aux_to_primary = True
        cut = model(x)["seg"]
        stripped = model.inference_network().eval()(x)
    assert list(stripped) == ["seg"]
    assert (cut - stripped["seg"]).abs().max() <= 1e-5
    assert (full - cut).abs().max() > 1e-4  # alpha^P != 0 really did change the output


def test_links_grow_linearly_with_aux_tasks():
    one = make("aux_nas", tasks=TASKS[:2])
    two = make("aux_nas")
    n_p = lambda m: sum(len(m.sources[k]) for k in m.sources if k.startswith("b0_"))  # noqa: E731
    assert n_p(two) == 2 * n_p(one)
    assert len(two.fusions) - len(one.fusions) == sum(1 for k in one.fusions if not k.startswith("b0_"))


@pytest.mark.parametrize("method", ["aux_g_stage", "aux_g_layer"])
def test_aux_g_gradients_flow_only_from_auxiliary_into_primary(method):
    model = make(method)
    for op in model.fusions.values():  # as after some training: links carry signal
        torch.nn.init.normal_(op.conv.weight, std=0.2)
    assert all(not key.startswith("b0_") for key in model.fusions)  # nothing feeds the primary
    out = model(torch.randn(2, 3, 32, 32))
    out["normals"].pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.branches[0].parameters())
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 3, 32, 32))
    out["seg"].pow(2).mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.branches[1].parameters())


def test_aux_g_stage_links_only_stage_ends():
    model = make("aux_g_stage")
    ends = {stage[-1] for stage in model.branches[0].stages}
    assert {int(k.split("_")[1]) for k in model.fusions} == {e for e in ends if e > 0}
    assert not list(model.alpha_logits)


def test_stripped_aux_g_is_the_plain_single_task_network():
    model = make("aux_g_layer")
    stripped = model.inference_network()
    assert len(stripped.norms) == 0
    single = build_network(ArchSpec(method="single", backbone="resnet18", image_size=32, tasks=TASKS[:1],
                                    head_channels=8)).nets["seg"]
    assert sum(p.numel() for p in stripped.parameters()) == sum(p.numel() for p in single.parameters())


def test_alpha_inits_paper_and_reference():
    assert torch.allclose(make("aux_nas").alpha_values("P"), torch.tensor(0.5))
    ref = make("aux_nas", alpha_p_init=0.001)
    assert torch.allclose(ref.alpha_values("P"), torch.tensor(0.001), atol=1e-7)
    assert torch.allclose(ref.alpha_values("A"), torch.tensor(0.5))


@pytest.mark.parametrize("schedule, fraction, expected", [
    ("paper", 0.0, 0.0), ("paper", 0.25, 25.0), ("paper", 1.0, 100.0),
    ("reference", 0.49, 0.0), ("reference", 0.65, 500.0), ("reference", 0.8, 1000.0), ("reference", 0.95, 1000.0),
])
def test_lambda_schedules(schedule, fraction, expected):
    lam_max = {"paper": 100.0, "reference": 1000.0}[schedule]
    assert lambda_at(schedule, lam_max, fraction) == pytest.approx(expected)


def test_branches_initialise_from_single_task_runs(tmp_path):
    """`method.init_from` loads each branch (backbone + head) from a finished single-task run."""
    from safetensors.torch import load_file

    from taskfold.trainer.config import config_from_dict
    from taskfold.trainer.loop import setup, train

    tiny = {"data": {"size": 32, "train_size": 8, "val_size": 2, "test_size": 2},
            "model": {"backbone": "resnet10", "head_channels": 8},
            "train": {"epochs": 1, "batch_size": 4, "progress": False}}
    train(config_from_dict({**tiny, "method": "single", "tasks": [{"name": "normals", "kind": "normals"}]}),
          tmp_path / "single_normals")
    cfg = config_from_dict({**tiny, "primary": "seg",
                            "tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "normals", "kind": "normals"}],
                            "method": {"name": "aux_nas", "init_from": {"normals": str(tmp_path / "single_normals")}}})
    model = setup(cfg, tmp_path / "aux").model
    saved = load_file(str(tmp_path / "single_normals" / "checkpoints" / "last" / "model.safetensors"))
    branch = model.branches[model.task_order.index("normals")].state_dict()
    assert all(torch.equal(branch[k], saved[f"nets.normals.backbone.{k}"]) for k in branch)
    head = model.heads[model.task_order.index("normals")].state_dict()
    assert all(torch.equal(head[k], saved[f"nets.normals.heads.normals.{k}"]) for k in head)
