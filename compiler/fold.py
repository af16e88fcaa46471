"""Fold inference-mode BatchNorm into the Conv/Linear that feeds it.

In eval mode a BatchNorm is a per-channel affine map, so ``BN(conv(x))`` equals a single conv
with rescaled weights and a shifted bias. Folding removes one graph node and one memory pass
per pair from the exported model and makes the MAC count in the manifest honest.

Finding the pairs: ``torch.fx`` traces the model and a pair is an edge ``conv -> bn`` where
the conv's output feeds nothing but that BN. This works for any module structure (ResNet's
``conv1``/``bn1`` attributes, timm's ``ConvNormAct``, plain ``Sequential`` heads) because it
reads the data flow, not attribute names. Where a module cannot be traced (data-dependent
control flow), its children are traced one by one instead, so only pairs that straddle an
untraceable ``forward`` are missed; those BNs stay in place, which is always correct.
What a graph cannot show (a child called directly from an untraceable parent, a Linear on a
3-D input before a BatchNorm1d) is caught by ``write_bundle``'s parity check against the
unfolded model.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn

log = logging.getLogger(__name__)

# Exact types only: subclasses such as timm's StdConv2d transform their weight in forward().
_FOLDABLE_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Linear)
_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)

try:  # timm's BN + activation in one module; the BN part folds, drop + act are kept.
    from timm.layers import BatchNormAct2d as _BatchNormAct2d
except ImportError:  # timm is a dependency, but the fold itself does not need it
    _BatchNormAct2d = None


class _LeafTracer(fx.Tracer):
    """Keeps every BatchNorm (and subclass) as one ``call_module`` node instead of tracing into it."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """Return an eval-mode copy of ``model`` with every foldable Conv/Linear -> BN pair folded.

    The input model is not modified. The BN of a folded pair becomes ``nn.Identity`` (or, for
    timm's ``BatchNormAct2d``, a ``Sequential`` of its dropout and activation). BNs that could
    not be folded are left as they are and logged; ``remaining_batchnorms`` lists them.
    Returns the copy and the number of pairs folded.
    """
    # Tracing runs forward() on proxies, and a forward that stores tensors on the module
    # (e.g. ``self.shared_features``) would leave proxies behind: trace a throwaway copy.
    probe = copy.deepcopy(model).eval()
    pairs = _find_pairs(probe, "")
    del probe

    folded = copy.deepcopy(model).eval()
    shared = _shared_parameter_ids(folded)
    count = 0
    for conv_name, bn_name in pairs:
        conv = folded.get_submodule(conv_name)
        bn = folded.get_submodule(bn_name)
        if id(conv.weight) in shared or any(id(p) in shared for p in bn.parameters()):
            continue  # tied weights: changing them here would change another layer too
        _fold_into(conv, bn)
        _replace(folded, bn_name, _after_fold(bn))
        count += 1

    remaining = remaining_batchnorms(folded)
    if remaining:
        log.warning("%d BatchNorm layer(s) left unfolded (input is not one Conv/Linear used once): %s",
                    len(remaining), ", ".join(remaining))
    return folded, count


def remaining_batchnorms(model: nn.Module) -> list[str]:
    """Qualified names of the BatchNorm modules still in ``model`` (what folding had to leave)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _find_pairs(module: nn.Module, prefix: str) -> list[tuple[str, str]]:
    """(conv, bn) qualified-name pairs in ``module``; traces children where the whole fails."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception as exc:  # any tracing failure just means "look one level down"
        log.debug("fx trace of %r failed (%s); tracing its children", prefix or "<root>", exc)
        pairs: list[tuple[str, str]] = []
        for name, child in module.named_children():
            pairs.extend(_find_pairs(child, f"{prefix}{name}."))
        return pairs
    return [(prefix + c, prefix + b) for c, b in _pairs_in_graph(graph, module)]


def _pairs_in_graph(graph: fx.Graph, root: nn.Module) -> list[tuple[str, str]]:
    """Conv/Linear -> BN edges where both modules are called once and the conv feeds only the BN.

    Modules called more than once, or whose tensors are read directly (``get_attr``), are
    skipped: folding them would change the other uses.
    """
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    read_directly = [n.target for n in graph.nodes if n.op == "get_attr"]

    def used_elsewhere(name: str) -> bool:
        return calls[name] != 1 or any(t == name or t.startswith(name + ".") for t in read_directly)

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable_bn(root.get_submodule(node.target)):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        layer, bn = root.get_submodule(src.target), root.get_submodule(node.target)
        out_features = getattr(layer, "out_channels", getattr(layer, "out_features", None))
        if type(layer) not in _FOLDABLE_LINEAR or out_features != bn.num_features:
            continue
        if used_elsewhere(src.target) or used_elsewhere(node.target):
            continue
        pairs.append((src.target, node.target))
    return pairs


def _is_foldable_bn(m: nn.Module) -> bool:
    """An eval-mode BN that normalises with running statistics (so it is a fixed affine map)."""
    known = type(m) in _PLAIN_BN or (_BatchNormAct2d is not None and type(m) is _BatchNormAct2d)
    return known and m.running_mean is not None and m.running_var is not None


def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Rewrite ``layer``'s weight and bias in place so that it computes ``bn(layer(x))``.

    Computed in float64 and cast back, so folding adds no rounding beyond the final cast.
    """
    w = layer.weight.detach().double()
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)

    scale = gamma / torch.sqrt(var + bn.eps)
    new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (bias - mean) * scale + beta
    dtype, device = layer.weight.dtype, layer.weight.device
    layer.weight = nn.Parameter(new_w.to(device=device, dtype=dtype))
    layer.bias = nn.Parameter(new_b.to(device=device, dtype=dtype))


def _after_fold(bn: nn.Module) -> nn.Module:
    """What replaces a folded BN: nothing, or the activation a BatchNormAct2d applied after it."""
    if _BatchNormAct2d is not None and isinstance(bn, _BatchNormAct2d):
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()


def _replace(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path ``qualified_name`` (works for Sequential indices too)."""
    parent_name, _, leaf = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}
