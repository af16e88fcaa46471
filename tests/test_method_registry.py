"""Every registered method, end to end through the registries (timm style): build its network,
one weight step and one architecture step, read the decision off, round-trip arch.json, strip
(the one generic path, compiler/strip.py, through the network contract of models/nets/base.py),
export and check ONNX Runtime against PyTorch. A method registered without a network or a case
here fails, and so does a network that does not keep the contract."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from taskfold.compiler.bundle import write_bundle
from taskfold.compiler.errors import CompileError
from taskfold.compiler.strip import strip
from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.models.nets import NETWORKS, build_network
from taskfold.models.nets.base import MultiTaskNetwork, SearchableNetwork
from taskfold.runtime import load
from taskfold.trainer.data import create_dataset
from taskfold.trainer.data.loader import load_batch
from taskfold.trainer.methods import METHODS, Progress, create_method
from taskfold.trainer.tasks import create_task

torch.set_num_threads(1)
SIZE = 32
TASKS = {"seg": ("segmentation", 6), "depth": ("depth", 1)}
TREE = [[["seg", "depth"]], [["seg", "depth"]], [["seg"], ["depth"]], [["seg"], ["depth"]]]
CASES = {      # the options each method needs for a two-task resnet10 run; primary: seg
    "single": {}, "shared": {},
    "aux_g_stage": {}, "aux_g_layer": {}, "aux_nas": {},
    "dmtg": {"num_groups": 2},
    "bmtas": {"warmup_fraction": 0.0, "resource_lambda": 1.0},
    "bmtas_retrain": {"tree": TREE},
}


def test_method_and_network_registries_agree():
    methods = set(METHODS.names())
    assert methods == set(NETWORKS.names()), "every method needs a network (models/nets) and nothing else"
    assert methods == set(CASES), "every method needs a case in this test"


@pytest.fixture(scope="module")
def batch():
    data = create_dataset("synthscenes", "train", size=SIZE, num_samples=4, seed=0)
    tasks = [create_task(name, kind, data.info) for name, (kind, _) in TASKS.items()]
    images, targets = load_batch(data, range(len(data)))
    return images, targets, tasks


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_trains_reads_off_round_trips_strips_and_exports(name, batch, tmp_path):
    images, targets, tasks = batch
    torch.manual_seed(0)
    spec = ArchSpec(name, "resnet10", SIZE, [TaskHead(n, k, "dense", c) for n, (k, c) in TASKS.items()],
                    head_channels=8, primary=["seg"], options=dict(CASES[name]))
    method = create_method({"name": name, **CASES[name]})
    model = method.build(spec, backbone_weights=None).train()
    assert isinstance(model, MultiTaskNetwork), "every network keeps the contract of models/nets/base.py"
    defaults = [p.name for p in inspect.signature(type(model).__init__).parameters.values() if p.default is not p.empty]
    assert not defaults, f"a network takes explicit, typed arguments with no defaults of its own: {defaults}"
    assert isinstance(model, SearchableNetwork) or method.arch_fraction == 0, "a searching method needs arch_parameters()"
    progress = Progress(0, 1, 1, 4)
    method.start_epoch(model, progress)

    # one weight step: finite losses for every task, and the method's parameters move
    groups = method.param_groups(model)
    weights = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.SGD([{"params": g["params"]} for g in groups], lr=0.1)
    losses = method.task_losses(model, model(images), targets, tasks)
    assert set(losses) == set(TASKS) and all(torch.isfinite(v) for v in losses.values())
    before = [p.detach().clone() for p in weights]
    sum(losses.values()).backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, weights))

    # one architecture step where the method searches: only the architecture parameters move
    if method.arch_fraction > 0:
        arch = model.arch_parameters()
        arch_before = [p.detach().clone() for p in arch]
        weights_before = [p.detach().clone() for p in weights]
        method.arch_step(model, images, targets, tasks, progress)
        assert any(not torch.equal(b, p) for b, p in zip(arch_before, arch))
        assert all(torch.equal(b, p) for b, p in zip(weights_before, weights))

    # read-off into arch.json; rebuilt from the file, the network answers exactly as trained
    spec.decision = method.read_off(model)
    spec.save(tmp_path / "arch.json")
    loaded = ArchSpec.load(tmp_path / "arch.json")
    assert loaded.to_dict() == json.loads(json.dumps(spec.to_dict()))   # nothing lost but tuple-ness
    rebuilt = build_network(loaded)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        expected, got = model(images), rebuilt(images)
    for task in TASKS:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=0)

    # strip what inference does not need, export, and compare ONNX Runtime with PyTorch
    if name == "bmtas":  # a supergraph is never compiled: its follow-up retrain is (case bmtas_retrain)
        with pytest.raises(CompileError, match="retrain"):
            strip(rebuilt, force=True, reference_inputs=images)
        return
    result = strip(rebuilt, force=True, reference_inputs=images)
    assert result.outputs and set(result.outputs) <= set(TASKS)
    assert isinstance(result.info["stripped"], list)
    assert ("strip_drift_max_abs" in result.info) == (result.model is not rebuilt)  # measured whenever cut
    bundle = write_bundle(tmp_path / "bundle", model=result.model, name=name, method=name,
                          input_shape=(1, 3, SIZE, SIZE), mean=[0.0] * 3, std=[1.0] * 3,
                          tasks=[{"name": n, "kind": TASKS[n][0]} for n in result.outputs], parity_inputs=images)
    onnx_outputs = load(bundle)(images.numpy())
    with torch.no_grad():
        torch_outputs = result.model.eval()(images)
    for task in result.outputs:
        np.testing.assert_allclose(onnx_outputs[task], torch_outputs[task].numpy(), rtol=1e-4, atol=1e-4)
        if name not in ("aux_g_stage", "aux_g_layer", "aux_nas"):   # aux strippers drop the links on purpose
            np.testing.assert_allclose(torch_outputs[task].numpy(), expected[task].numpy(), rtol=1e-4, atol=1e-5)
