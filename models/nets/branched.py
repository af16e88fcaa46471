"""BranchedNet (BMTAS retrain and inference): a branching tree that runs each node once.

Built from a tree (see :mod:`taskfold.models.nets.tree`), ``BranchedNetOptions.tree``: the stem,
then for every layer one copy of the backbone block per group, fed by its parent group's output,
and one head per task reading the outputs of the nodes on its path. A block shared by k tasks is
computed once for all of them, then split; so the graph's MAdds are
``stem + sum_l c_l * (groups at l) + heads``. One graph, one output per task: what the compiler
exports as is.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from taskfold.models.arch import ArchSpec
from taskfold.models.backbones import Backbone
from taskfold.models.errors import ModelError
from taskfold.models.modes import eval_mode
from taskfold.models.nets.base import KeptAsTrained
from taskfold.models.nets.branch import count_macs
from taskfold.models.nets.registry import NETWORKS, network_options
from taskfold.models.nets.shared import build_heads, spec_backbone
from taskfold.models.nets.tree import Tree, check_tree, parent_index
from taskfold.models.weights import sub_state


def node_key(layer: int, group: int) -> str:
    return f"l{layer}_g{group}"


@dataclass
class BranchedNetOptions:
    """What a BranchedNet is built from (BMTAS retrain's Options extend it)."""

    tree: list = field(default_factory=list)  # per encoder layer, the task groups (models/nets/tree.py)


class BranchedNet(KeptAsTrained, nn.Module):
    """The tree ``options.tree`` over ``backbone``'s blocks; ``heads``: one per task, in task order
    (they name the tasks)."""

    def __init__(self, backbone: Backbone, heads: nn.ModuleDict, options: BranchedNetOptions) -> None:
        super().__init__()
        self.task_names = list(heads)
        self.tree: Tree = check_tree(options.tree, self.task_names, len(backbone.blocks))
        self.stem = backbone.stem
        self.nodes = nn.ModuleDict({
            node_key(layer, g): copy.deepcopy(backbone.blocks[layer])
            for layer, grouping in enumerate(self.tree) for g in range(len(grouping))
        })
        self.heads = heads
        self.shared_features: list[Tensor] = []

    def inference_summary(self, kept: nn.Module, images: Tensor, *, force: bool) -> dict:
        """Nothing is cut (each node already runs once); the tree and its MAdds per layer, node and task."""
        return {"stripped": [], "tree": self.tree, **macs_breakdown(self, images[:1])}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The stem and every node that all tasks share (what gradient weighting strategies see)."""
        params = list(self.stem.parameters())
        for layer, grouping in enumerate(self.tree):
            if len(grouping) == 1:
                params += list(self.nodes[node_key(layer, 0)].parameters())
        return params

    def node_groups(self) -> dict[str, list[str]]:
        """Each node's tasks, by node key."""
        return {node_key(layer, g): group for layer, grouping in enumerate(self.tree)
                for g, group in enumerate(grouping)}

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        x = self.stem(image)
        self.shared_features = [x]
        previous: list[Tensor] = []
        features: dict[str, list[Tensor]] = {name: [] for name in self.task_names}
        for layer, grouping in enumerate(self.tree):
            current = []
            for g, group in enumerate(grouping):
                parent = parent_index(self.tree, layer, g)
                out = self.nodes[node_key(layer, g)](x if parent is None else previous[parent])
                current.append(out)
                for name in group:
                    features[name].append(out)
            if len(grouping) == 1:
                self.shared_features.append(current[0])
            previous = current
        return {name: head(features[name]) for name, head in self.heads.items()}

    def load_supergraph(self, state: dict[str, Tensor], routing: dict[str, list[int]]) -> int:
        """Initialise from BranchNet weights: node (l, g) takes copy ``routing[task][l]`` of its tasks.

        The supergraph's output BatchNorms have no affine parameters; the nodes keep their
        initial scale 1 and shift 0 there, which is the same function. Returns tensors copied.
        """
        mapped = {k: v for k, v in state.items() if k.startswith(("stem.", "heads."))}
        for layer, grouping in enumerate(self.tree):
            for g, group in enumerate(grouping):
                copy_index = routing[group[0]][layer]
                copy_state = sub_state(state, f"candidates.{layer}.{copy_index}.")
                mapped.update({f"nodes.{node_key(layer, g)}.{key}": value for key, value in copy_state.items()})
        own = self.state_dict()
        unexpected = sorted(set(mapped) - set(own))
        if unexpected:
            raise ModelError(f"supergraph weights do not fit this tree (e.g. {unexpected[0]})")
        with torch.no_grad():
            for key, value in mapped.items():
                own[key].copy_(value)
        return len(mapped)


def _captured_inputs(model: nn.Module, modules: dict[str, nn.Module], image: Tensor) -> dict[str, tuple]:
    """The positional inputs each named submodule receives in one forward pass."""
    seen: dict[str, tuple] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, _k=key: seen.__setitem__(_k, args))
               for key, m in modules.items()]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def macs_breakdown(model: BranchedNet, image: Tensor) -> dict:
    """MAdds of the stem, every node (by layer) and every head on one ``image`` (each module counted
    on the input it really receives), and what each task depends on."""
    modules: dict[str, nn.Module] = {"stem": model.stem, **{f"node:{k}": m for k, m in model.nodes.items()},
                                     **{f"head:{k}": m for k, m in model.heads.items()}}
    with eval_mode(model):
        inputs = _captured_inputs(model, modules, image)
    macs = {key: count_macs(modules[key], *inputs[key]) for key in modules}
    per_layer = [sum(macs[f"node:{node_key(layer, g)}"] for g in range(len(grouping)))
                 for layer, grouping in enumerate(model.tree)]
    per_task = {}
    for name in model.task_names:
        path = [node_key(layer, g) for layer, grouping in enumerate(model.tree)
                for g, group in enumerate(grouping) if name in group]
        per_task[name] = macs["stem"] + sum(macs[f"node:{k}"] for k in path) + macs[f"head:{name}"]
    return {"stem_macs": macs["stem"], "macs_per_layer": per_layer,
            "macs_per_node": {k: macs[f"node:{k}"] for k in model.nodes},
            "head_macs": {name: macs[f"head:{name}"] for name in model.task_names},
            "macs_per_task": per_task, "macs_total": sum(macs.values())}


@NETWORKS.register("bmtas_retrain")
def build_branched_net(spec: ArchSpec, *, backbone_weights: str | None = None) -> BranchedNet:
    backbone = spec_backbone(spec, backbone_weights)
    heads = build_heads(spec, backbone.feature_info, spec.tasks)
    return BranchedNet(backbone, heads, network_options(BranchedNetOptions, spec.options))
