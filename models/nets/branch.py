"""BranchNet (BMTAS search): a supergraph of T candidate copies per backbone block.

Every backbone block ``l`` gets T copies ``op_l0 .. op_l(T-1)`` (deep copies: identical
initialisation, as the paper starts every copy from the same ImageNet weights; the warm-up, which
trains copy t on task t only, is what breaks the symmetry). Task t routes through layer l with
``z_l^(t) = GumbelSoftmax(alpha[l, t], tau)`` and its layer output is ``sum_j z_lj^(t) op_lj(x_t)``.
The stem is shared by all tasks (it is not a searchable block of the adapter).

Routing modes, chosen by the method:

- ``warmup = True``: one-hot routing, task t -> copy t (each copy sees only its task);
- training: soft Gumbel-softmax samples, one draw of ``z`` per forward;
- eval: the argmax routing, i.e. the derived tree (tasks that share a prefix share compute).

An op is evaluated once per distinct input tensor: at layer 0 every task reads the stem output,
so the T copies run once each; in eval, tasks with a common prefix hold the same tensor and so
share every op they both select.

The last BatchNorm(s) of every copy — those whose output reaches the block output without
passing another convolution, found on the autograd graph of a probe pass — lose their affine
parameters during search, so that the copies' outputs are on one scale (paper, supp. A).

``block_macs``: MAdds of one copy of each block at the search resolution (the resource loss's
look-up table), counted with :class:`torch.utils.flop_counter.FlopCounterMode` (MACs = flops/2)
and cached per (backbone, options, resolution).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from taskfold.models.arch import ArchSpec
from taskfold.models.backbones import Backbone
from taskfold.models.errors import ModelError
from taskfold.models.modes import eval_mode
from taskfold.models.nets.registry import NETWORKS
from taskfold.models.nets.shared import build_heads, spec_backbone
from taskfold.models.nets.tree import Tree, derive_tree

_MACS_CACHE: dict[tuple, list[int]] = {}
NOT_FOR_INFERENCE = ("this is a bmtas search run (a supergraph); compile the retrained run in RUN/retrain "
                     "(`taskfold run` trains it there)")


def count_macs(module: nn.Module, *inputs: Tensor) -> int:
    """Multiply-accumulates of one forward call (FlopCounterMode's flops / 2), eval mode, no grad."""
    with eval_mode(module), torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


def block_macs_table(backbone: Backbone, name: str, options: dict, image_size: int) -> list[int]:
    """MAdds of each block of ``backbone`` for one image of ``image_size`` (cached in-process).

    The key is the registered backbone name, its options and the resolution: block shapes, and so
    MAdds, depend on nothing else.
    """
    key = (name, tuple(sorted((k, repr(v)) for k, v in options.items())), image_size)
    if key not in _MACS_CACHE:
        with torch.no_grad():
            x = backbone.eval().stem(torch.zeros(1, 3, image_size, image_size))
        table = []
        for block in backbone.blocks:
            table.append(count_macs(block, x))
            with torch.no_grad():
                x = block(x)
        _MACS_CACHE[key] = table
    return list(_MACS_CACHE[key])


def output_batchnorms(block: nn.Module, example: Tensor) -> list[nn.BatchNorm2d]:
    """The BatchNorms whose output reaches ``block``'s output without crossing a convolution.

    Found on the autograd graph of one probe pass: a walk back from the output stops at
    convolutions and at the block input, and collects every BatchNorm node it meets. For a
    ResNet basic block that is ``bn2`` and, if present, the shortcut's BN; for an inverted
    residual ``bn3``; for a conv-bn-relu block its BN. No backbone is special-cased.
    """
    produced: dict[object, nn.BatchNorm2d] = {}
    handles = []
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            def hook(mod, _inputs, output, _store=produced):
                _store[output.grad_fn] = mod
            handles.append(module.register_forward_hook(hook))
    try:
        with eval_mode(block), torch.enable_grad():
            out = block(example.detach().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    found: list[nn.BatchNorm2d] = []
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced:
            found.append(produced[node])
            continue
        if "Convolution" in type(node).__name__:
            continue
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return found


def drop_affine(bn: nn.BatchNorm2d) -> None:
    """Turn ``bn`` into a pure normalisation (no learnable scale/shift)."""
    bn.affine = False
    bn.weight = None
    bn.bias = None


def set_bn_stat_tracking(model: nn.Module, track: bool) -> None:
    """Switch running-statistics updates of every BatchNorm on/off (train mode keeps batch stats)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = track


def reset_bn_stats(model: nn.Module) -> None:
    """Forget every BatchNorm's running statistics (they restart as a cumulative average)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()


class BranchNet(nn.Module):
    """The BMTAS supergraph: shared stem, T copies of every block, routing logits, one head per task."""

    def __init__(self, backbone: Backbone, heads: nn.ModuleDict, image_size: int, block_macs: list[int]) -> None:
        """``heads``: one per task, in task order (they name the tasks); ``block_macs``: MAdds of
        one copy of each block at ``image_size`` (:func:`block_macs_table`), the resource loss's table."""
        super().__init__()
        backbone.eval()  # the probes below must not touch BN stats
        self.task_names = list(heads)
        num_tasks, num_layers = len(self.task_names), len(backbone.blocks)
        if len(block_macs) != num_layers:
            raise ModelError(f"block_macs has {len(block_macs)} entries for {num_layers} blocks")
        self.block_macs = list(block_macs)
        self.stem_macs = count_macs(backbone.stem, torch.zeros(1, 3, image_size, image_size))
        self.stem = backbone.stem.train()
        with torch.no_grad():
            x = backbone.stem(torch.zeros(2, 3, image_size, image_size))
        self.candidates = nn.ModuleList()
        for block in backbone.blocks:
            for bn in output_batchnorms(block, x):
                drop_affine(bn)
            with torch.no_grad():
                x = block.eval()(x)
            self.candidates.append(nn.ModuleList([copy.deepcopy(block).train() for _ in range(num_tasks)]))
        self.heads = heads
        self.alpha = nn.Parameter(torch.zeros(num_layers, num_tasks, num_tasks))
        for module in self.modules():  # stats reset after every alpha phase: average since then
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None
        self.tau = 1.0
        self.warmup = False
        self.shared_features: list[Tensor] = []

    @property
    def num_layers(self) -> int:
        return len(self.candidates)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.stem.parameters())

    def inference_network(self) -> nn.Module:
        """A supergraph is never exported: its weights were trained for soft routings and without
        the output BatchNorms' affine parameters, so its derived tree is not the model the method
        delivers; the retrained tree (``bmtas_retrain``) is."""
        raise ModelError(NOT_FOR_INFERENCE)

    def inference_summary(self, kept: nn.Module, images: Tensor, *, force: bool) -> dict:
        raise ModelError(NOT_FOR_INFERENCE)

    def routing(self) -> list[list[int]]:
        """``routing[t][l]``: the copy task t takes at layer l under argmax (the derived architecture)."""
        return self.alpha.detach().argmax(dim=-1).t().tolist()

    def derived_tree(self) -> Tree:
        return derive_tree(self.routing(), self.task_names)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        x = self.stem(image)
        self.shared_features = [x]
        num_tasks = len(self.task_names)
        inputs = [x] * num_tasks
        features: list[list[Tensor]] = [[] for _ in range(num_tasks)]
        soft = self.training and not self.warmup
        z = F.gumbel_softmax(self.alpha, tau=self.tau, dim=-1) if soft else None
        routing = self.routing()
        for layer, ops in enumerate(self.candidates):
            cache: dict[tuple[int, int], Tensor] = {}

            def run(j: int, inp: Tensor) -> Tensor:
                key = (id(inp), j)
                if key not in cache:
                    cache[key] = ops[j](inp)
                return cache[key]

            outputs = []
            for t, inp in enumerate(inputs):
                if z is not None:
                    outputs.append(sum(z[layer, t, j] * run(j, inp) for j in range(num_tasks)))
                else:
                    outputs.append(run(t if self.warmup else routing[t][layer], inp))
            for t, out in enumerate(outputs):
                features[t].append(out)
            inputs = outputs
        return {name: head(features[t]) for t, (name, head) in enumerate(self.heads.items())}


@NETWORKS.register("bmtas")
def build_branch_net(spec: ArchSpec, *, backbone_weights: str | None = None) -> BranchNet:
    backbone = spec_backbone(spec, backbone_weights)
    heads = build_heads(spec, backbone.feature_info, spec.tasks)
    block_macs = block_macs_table(backbone, spec.backbone, spec.backbone_options, spec.image_size)
    return BranchNet(backbone, heads, spec.image_size, block_macs)
