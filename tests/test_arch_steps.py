"""Architecture steps of the searching methods (Aux-NAS, BMTAS) minimise the same objective as
the weight steps: each task's loss scaled by its recipe weight (``tasks[].weight``)."""
from __future__ import annotations

import copy

import pytest
import torch

from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.trainer.data import create_dataset
from taskfold.trainer.data.loader import load_batch
from taskfold.trainer.methods import Progress, create_method
from taskfold.trainer.methods.plain import per_task_losses
from taskfold.trainer.tasks import create_task

torch.set_num_threads(1)
SIZE = 32
PROGRESS = Progress(0, 1, 9, 10)
METHOD_OPTIONS = {"aux_nas": {}, "bmtas": {"warmup_fraction": 0.0, "resource_lambda": 1.0}}


def arch_step_update(name: str, weights: dict[str, float], model, images, targets) -> list[torch.Tensor]:
    """alpha's change after one architecture step, with plain SGD (lr 1) so the change is -grad."""
    data_info = create_dataset("synthscenes", "train", size=SIZE, num_samples=2, seed=0).info
    tasks = [create_task(t, k, data_info, weight=weights[t]) for t, k in (("seg", "segmentation"), ("depth", "depth"))]
    method = create_method({"name": name, **METHOD_OPTIONS[name]})
    method.alpha_optimizer = torch.optim.SGD(model.arch_parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.arch_parameters()]
    torch.manual_seed(1)                            # BMTAS samples Gumbel noise in its forward
    method.arch_step(model, images, targets, tasks, PROGRESS)
    return [p.detach() - b for p, b in zip(model.arch_parameters(), before)]


@pytest.mark.parametrize("name", list(METHOD_OPTIONS))
def test_arch_step_scales_task_losses_by_their_recipe_weight(name):
    torch.manual_seed(0)
    spec = ArchSpec(name, "resnet10", SIZE, [TaskHead("seg", "segmentation", "dense", 6),
                                             TaskHead("depth", "depth", "dense", 1)],
                    head_channels=8, primary=["seg"])
    method = create_method({"name": name, **METHOD_OPTIONS[name]})
    model = method.build(spec, backbone_weights=None).train()
    method.start_epoch(model, PROGRESS)           # BMTAS: tau for this point, as the steps will see it
    arch = {id(p) for p in model.arch_parameters()}
    with torch.no_grad():      # at init alpha changes nothing (zero fusion convs, identical copies)
        for p in model.parameters():
            if id(p) not in arch:
                p.add_(0.05 * torch.randn_like(p))
    data = create_dataset("synthscenes", "train", size=SIZE, num_samples=4, seed=0)
    images, targets = load_batch(data, range(len(data)))
    plain = arch_step_update(name, {"seg": 1.0, "depth": 1.0}, copy.deepcopy(model), images, targets)
    weighted = arch_step_update(name, {"seg": 1.0, "depth": 3.0}, copy.deepcopy(model), images, targets)
    # the difference is two more depth losses' gradient: -(3 - 1) dL_depth/dalpha
    probe = copy.deepcopy(model)
    torch.manual_seed(1)
    tasks = [create_task("depth", "depth", data.info)]
    depth_grads = torch.autograd.grad(per_task_losses(probe(images), targets, tasks)["depth"],
                                      probe.arch_parameters(), allow_unused=True)
    for p, w, g in zip(plain, weighted, depth_grads):
        expected = torch.zeros_like(p) if g is None else -2.0 * g
        # w - p cancels two updates of up to ~20 (alpha^P's seg gradient) down to ~1e-2: allow a
        # few float32 ulps of the updates themselves (the rounding depends on the CPU's kernels)
        ulps = 8 * torch.finfo(torch.float32).eps * max(p.abs().max(), w.abs().max()).item()
        torch.testing.assert_close(w - p, expected, rtol=1e-4, atol=max(1e-7, ulps))
    assert any(g is not None and g.abs().max() > 0 for g in depth_grads)
