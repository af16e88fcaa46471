"""BMTAS: supergraph routing, tree derivation/validation, the branched network's cost and ONNX
parity, the search method's checks, and a tiny search -> retrain -> compile run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from taskfold.compiler.bundle import write_bundle
from taskfold.compiler.compile_run import compile_run
from taskfold.compiler.errors import CompileError
from taskfold.models.arch import ArchSpec, TaskHead
from taskfold.models.nets import build_network
from taskfold.models.nets.branched import node_key
from taskfold.runtime import load
from taskfold.runtime.flops import count_onnx
from taskfold.trainer.config import ConfigError, config_from_dict
from taskfold.trainer.loop import train
from taskfold.trainer.methods import Progress, create_method

torch.set_num_threads(1)
SIZE = 32
NAMES = ["seg", "depth", "normals", "edges"]
KINDS = {"seg": ("segmentation", 6), "depth": ("depth", 1), "normals": ("normals", 3), "edges": ("edges", 1)}
TREE = [[["seg", "depth", "normals", "edges"]],
        [["seg", "depth"], ["normals", "edges"]],
        [["seg", "depth"], ["normals"], ["edges"]],
        [["seg"], ["depth"], ["normals"], ["edges"]]]


def make_spec(method: str, names: list[str] = NAMES, **options) -> ArchSpec:
    tasks = [TaskHead(n, KINDS[n][0], "dense", KINDS[n][1]) for n in names]
    return ArchSpec(method, "resnet10", SIZE, tasks, head_channels=8, options=options)


def conv_macs_by_hooks(module: nn.Module, run) -> int:
    """Σ over Conv2d/Linear calls inside ``module`` of output elements × weights per output."""
    total = 0

    def hook(m, _inputs, out):
        nonlocal total
        per_output = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.in_features
        total += out.numel() * per_output

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return total


def test_derivation_from_hand_set_alpha_gives_expected_tree() -> None:
    net = build_network(make_spec("bmtas"))
    # routing[t][l]: seg/depth stay together until layer 3; normals/edges split at layer 2.
    routing = {"seg": [0, 0, 0, 0], "depth": [0, 0, 0, 1], "normals": [0, 3, 2, 2], "edges": [0, 3, 3, 2]}
    with torch.no_grad():
        net.alpha.normal_(0, 0.1)
        for t, name in enumerate(NAMES):
            for layer, j in enumerate(routing[name]):
                net.alpha[layer, t, j] = 5.0
    assert net.derived_tree() == TREE
    method = create_method({"name": "bmtas"})
    decision = method.read_off(net)
    assert decision["tree"] == TREE and decision["routing"] == routing
    assert decision["encoder_macs_per_layer"] == [n * len(g) for n, g in zip(net.block_macs, TREE)]
    # The derived tree runs as a tree in eval mode: an op evaluated once per (input, copy).
    calls = []
    for ops in net.candidates:
        for op in ops:
            op.register_forward_hook(lambda *_: calls.append(1))
    net.eval()(torch.zeros(1, 3, SIZE, SIZE))
    assert len(calls) == sum(len(g) for g in TREE)


def test_warmup_routes_task_t_through_copy_t_only() -> None:
    torch.manual_seed(0)
    net = build_network(make_spec("bmtas", ["seg", "depth"])).train()
    net.warmup = True
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.manual_seed(1)
    before = net(x)
    with torch.no_grad():  # change every copy 1: task 0 must not notice, task 1 must
        for ops in net.candidates:
            for p in ops[1].parameters():
                p.add_(0.5)
    torch.manual_seed(1)
    after = net(x)
    assert torch.equal(before["seg"], after["seg"])
    assert not torch.allclose(before["depth"], after["depth"])


def test_output_batchnorms_lose_affine_parameters() -> None:
    net = build_network(make_spec("bmtas", ["seg", "depth"]))
    block = net.candidates[1][0]  # a basic block with a downsampling shortcut
    assert block.bn2.weight is None and block.downsample[1].weight is None
    assert block.bn1.weight is not None


@pytest.mark.parametrize("tree, message", [
    (TREE[:3], "one grouping per encoder layer (4), got 3"),
    ([TREE[0], [["seg", "depth"], ["normals"]], *TREE[2:]], "task 'edges' is in no group"),
    ([TREE[0], [["seg", "depth", "edges"], ["normals", "edges"]], *TREE[2:]], "'edges' appears in more"),
    ([TREE[0], TREE[1], [["seg", "normals"], ["depth"], ["edges"]], TREE[3]], "is not inside one group"),
    ([TREE[0], TREE[1], TREE[2], [["seg"], ["depth"], ["normals"], ["edges"], ["sky"]]], "unknown task 'sky'"),
])
def test_invalid_trees_are_rejected(tree, message) -> None:
    method = create_method({"name": "bmtas_retrain", "tree": tree})
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        method.build(make_spec("bmtas_retrain", tree=tree), backbone_weights=None)
    assert str(err.value).startswith("method.tree: ") and "\n" not in str(err.value)


def test_bad_lambda_and_too_many_tasks_are_rejected() -> None:
    with pytest.raises(ConfigError, match="resource_lambda: must be >= 0, got -0.1"):
        create_method({"name": "bmtas", "resource_lambda": -0.1})
    many = ArchSpec("bmtas", "resnet10", SIZE, [TaskHead(f"t{i}", "depth", "dense", 1) for i in range(9)])
    with pytest.raises(ConfigError, match="'paper_chain' supports at most 8 tasks, got 9"):
        create_method({"name": "bmtas", "resource_estimator": "paper_chain"}).build(many, backbone_weights=None)
    many.tasks *= 2
    with pytest.raises(ConfigError, match="'exact' supports at most 16 tasks, got 18"):
        create_method({"name": "bmtas"}).build(many, backbone_weights=None)


@pytest.mark.slow
def test_bundle_macs_are_tree_nodes_plus_heads_and_onnx_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network(make_spec("bmtas_retrain", tree=TREE)).train()
    with torch.no_grad():  # real running statistics for the BN folding
        net(torch.randn(4, 3, SIZE, SIZE))
    net.eval()
    x = torch.zeros(1, 3, SIZE, SIZE)
    stem_out = net.stem(x)
    lut = build_network(make_spec("bmtas")).block_macs
    expected = conv_macs_by_hooks(net.stem, lambda: net.stem(x))
    feats = [stem_out]
    for layer, grouping in enumerate(TREE):
        block_in = feats[-1]
        node_cost = conv_macs_by_hooks(net.nodes[node_key(layer, 0)], lambda: net.nodes[node_key(layer, 0)](block_in))
        assert node_cost == lut[layer]
        expected += node_cost * len(grouping)
        feats.append(net.nodes[node_key(layer, 0)](block_in))
    heads = {n: conv_macs_by_hooks(net.heads[n], lambda n=n: net.heads[n](feats[1:])) for n in NAMES}
    expected += sum(heads.values())

    images = torch.randn(3, 3, SIZE, SIZE)
    bundle = write_bundle(tmp_path / "b", model=net, name="t", method="bmtas_retrain",
                          input_shape=(1, 3, SIZE, SIZE), mean=[0.0] * 3, std=[1.0] * 3,
                          tasks=[{"name": n, "kind": KINDS[n][0]} for n in NAMES], parity_inputs=images)
    cost = count_onnx(bundle / "model.onnx")
    assert cost.macs == expected
    # Per task: the stem, one node per layer, its own head.
    path_cost = expected - sum(heads.values()) - sum(lut[l] * (len(g) - 1) for l, g in enumerate(TREE))
    assert cost.per_output_macs == {n: path_cost + heads[n] for n in NAMES}
    out = load(bundle)(images.numpy())
    with torch.no_grad():
        ref = net(images)
    for n in NAMES:
        np.testing.assert_allclose(out[n], ref[n].numpy(), atol=1e-4)


def test_alpha_steps_keep_bn_stats_and_each_alpha_phase_resets_them_once() -> None:
    torch.manual_seed(0)
    spec = make_spec("bmtas", ["seg", "depth"])
    method = create_method({"name": "bmtas", "warmup_fraction": 0.0, "resource_lambda": 1.0})
    net = method.build(spec, backbone_weights=None).train()
    seen = []
    bn = net.candidates[0][0].bn1
    from taskfold.trainer.tasks import create_task
    from taskfold.trainer.data import create_dataset
    from taskfold.trainer.data.loader import load_batch
    data = create_dataset("synthscenes", "train", size=SIZE, num_samples=4, seed=0)
    tasks = [create_task("seg", "segmentation", data.info), create_task("depth", "depth", data.info)]
    images, targets = load_batch(data, range(len(data)))
    method.start_epoch(net, Progress(0, 2, 0, 10))
    net(images)                                        # a weight step's forward: statistics tracked
    tracked = bn.running_mean.clone()
    assert not torch.equal(tracked, torch.zeros_like(tracked)) and bn.num_batches_tracked == 1
    bn.register_forward_hook(lambda m, i, o: seen.append(m.track_running_stats))
    for step in (1, 2, 3):                             # alpha steps of one phase leave them alone
        logs = method.arch_step(net, images, targets, tasks, Progress(0, 2, step, 10))
    assert not net.alpha.detach().eq(0).all() and logs["expected_madds"] > 0
    assert seen and not any(seen)
    assert torch.equal(bn.running_mean, tracked) and bn.num_batches_tracked == 1
    method.start_epoch(net, Progress(1, 2, 5, 10))     # the next alpha phase starts afresh
    assert torch.equal(bn.running_mean, torch.zeros_like(tracked)) and bn.num_batches_tracked == 0


@pytest.mark.slow
def test_tiny_search_retrain_compile(tmp_path: Path) -> None:
    raw = {
        "name": "tiny", "method": {"name": "bmtas", "resource_lambda": 0.5, "retrain": "supergraph",
                                   "warmup_fraction": 0.2, "arch_fraction": 0.25},
        "data": {"dataset": "synthscenes", "size": SIZE, "train_size": 16, "val_size": 4, "test_size": 4},
        "tasks": [{"name": "seg", "kind": "segmentation"}, {"name": "depth", "kind": "depth"}],
        "model": {"backbone": "resnet10", "head_channels": 8},
        "train": {"epochs": 1, "batch_size": 4, "progress": False},
        "compile": {"parity_samples": 2},
    }
    summary = train(config_from_dict(raw), tmp_path / "run")
    arch = json.loads((tmp_path / "run" / "arch.json").read_text())["decision"]
    assert len(arch["tree"]) == 4 and set(arch["routing"]) == {"seg", "depth"}
    with pytest.raises(CompileError, match="compile the retrained run in RUN/retrain"):
        compile_run(tmp_path / "run")
    retrain_cfg = summary["follow_up"]
    assert retrain_cfg.method["name"] == "bmtas_retrain" and retrain_cfg.method["tree"] == arch["tree"]
    assert retrain_cfg.method["init_checkpoint"].endswith("model.safetensors")
    train(retrain_cfg, tmp_path / "run" / "retrain")
    manifest = json.loads((compile_run(tmp_path / "run" / "retrain") / "manifest.json").read_text())
    info = manifest["compile"]
    assert manifest["cost"]["macs"] == info["macs_total"]
    assert manifest["cost"]["per_task_macs"] == info["macs_per_task"]
    assert info["tree"] == arch["tree"]


def test_retrain_divides_shared_learning_rates() -> None:
    method = create_method({"name": "bmtas_retrain", "tree": TREE})
    net = method.build(make_spec("bmtas_retrain", tree=TREE), backbone_weights=None)
    scales = {id(p): g.get("lr_scale", 1.0) for g in method.param_groups(net) for p in g["params"]}
    assert scales[id(net.nodes["l0_g0"].conv1.weight)] == 0.25
    assert scales[id(net.nodes["l2_g0"].conv1.weight)] == 0.5
    assert scales[id(net.nodes["l3_g2"].conv1.weight)] == 1.0
    assert scales[id(next(net.heads.parameters()))] == 1.0
    assert len(scales) == len(list(net.parameters()))


def test_report_draws_tree_and_tabulates_tradeoff(tmp_path: Path) -> None:
    from taskfold.trainer.bmtas_report import TradeoffRow, plot_tradeoff, plot_tree, tradeoff_table

    assert plot_tree(TREE, tmp_path / "tree.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [TradeoffRow("single", 73_500_000, 0.0), TradeoffRow("λ=0", 40_000_000, -1.234, [1, 2, 3, 4])]
    assert plot_tradeoff(rows, tmp_path / "t.png").is_file()
    assert tradeoff_table(rows).splitlines()[2:] == ["| single | 73.5 | +0.00 | — |",
                                                     "| λ=0 | 40.0 | -1.23 | 1 2 3 4 |"]


@pytest.mark.parametrize("reset", [True, False])
def test_alpha_optimizer_state_is_reset_at_every_epoch_unless_disabled(reset: bool) -> None:
    method = create_method({"name": "bmtas", "warmup_fraction": 0.0, "reset_alpha_optimizer": reset})
    net = method.build(make_spec("bmtas", ["seg", "depth"]), backbone_weights=None)
    net.alpha.grad = torch.ones_like(net.alpha)
    method.alpha_optimizer.step()
    assert method.alpha_optimizer.state
    method.start_epoch(net, Progress(1, 2, 5, 10))
    assert bool(method.alpha_optimizer.state) is not reset
