"""Branching trees: what a BMTAS search derives and what its retrain stage builds.

A tree over L encoder layers (backbone blocks) is written, in ``arch.json`` and in the retrain
recipe, as one grouping per layer, each a list of groups of task names::

    [[["seg", "depth", "normals", "edges"]],        # layer 0: one shared block
     [["seg", "depth"], ["normals", "edges"]],      # layer 1: two branches
     [["seg"], ["depth"], ["normals", "edges"]]]    # layer 2: ...

Every layer's grouping is a partition of the tasks that refines the previous layer's (a group
never merges tasks that were already apart). Each group is one node: one block run once for all
its tasks. The stem before layer 0 is shared by all tasks. In canonical form tasks inside a group
keep the task order and groups are ordered by their first task.
"""
from __future__ import annotations

from taskfold.models.errors import ModelError

Tree = list[list[list[str]]]


class TreeError(ModelError):
    """A tree that is not a valid branching of the given tasks over the given layers."""


def canonical(grouping: list[list[str]], order: list[str]) -> list[list[str]]:
    """Tasks in task order inside each group, groups ordered by their first task."""
    rank = {name: i for i, name in enumerate(order)}
    groups = [sorted(group, key=rank.__getitem__) for group in grouping]
    return sorted(groups, key=lambda group: rank[group[0]])


def derive_tree(routing: list[list[int]], task_names: list[str]) -> Tree:
    """The tree of an argmax routing: ``routing[t][l]`` is the copy task t takes at layer l.

    Tasks share a node at layer l exactly when their choices coincide at every layer <= l, so the
    grouping of layer l is the partition by routing prefix; it refines layer l-1's by construction.
    """
    num_layers = len(routing[0]) if routing else 0
    tree: Tree = []
    for layer in range(num_layers):
        by_prefix: dict[tuple[int, ...], list[str]] = {}
        for name, path in zip(task_names, routing):
            by_prefix.setdefault(tuple(path[:layer + 1]), []).append(name)
        tree.append(canonical(list(by_prefix.values()), task_names))
    return tree


def check_tree(tree: object, task_names: list[str], num_layers: int) -> Tree:
    """Validate ``tree`` for these tasks and layers; return it in canonical form or raise TreeError."""
    if not isinstance(tree, list) or len(tree) != num_layers:
        got = len(tree) if isinstance(tree, list) else type(tree).__name__
        raise TreeError(f"needs one grouping per encoder layer ({num_layers}), got {got}")
    known = set(task_names)
    parent: list[list[str]] = [list(task_names)]
    out: Tree = []
    for layer, grouping in enumerate(tree):
        where = f"layer {layer}"
        if not isinstance(grouping, list) or not all(isinstance(g, list) and g for g in grouping):
            raise TreeError(f"{where}: expected a list of non-empty groups of task names")
        names = [name for group in grouping for name in group]
        unknown = sorted({str(n) for n in names} - known)
        if unknown:
            raise TreeError(f"{where}: unknown task {unknown[0]!r} (tasks: {', '.join(task_names)})")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise TreeError(f"{where}: task {twice[0]!r} appears in more than one group")
        missing = [n for n in task_names if n not in names]
        if missing:
            raise TreeError(f"{where}: task {missing[0]!r} is in no group")
        for group in grouping:
            if not any(set(group) <= set(p) for p in parent):
                raise TreeError(f"{where}: group {group} is not inside one group of layer {layer - 1} "
                                f"(a branch cannot merge tasks that were already apart)")
        parent = canonical(grouping, task_names)
        out.append(parent)
    return out


def parent_index(tree: Tree, layer: int, group: int) -> int | None:
    """Index of the group at ``layer - 1`` that feeds node (layer, group); None for the stem."""
    if layer == 0:
        return None
    first = tree[layer][group][0]
    return next(i for i, g in enumerate(tree[layer - 1]) if first in g)


def tree_macs(tree: Tree, block_macs: list[int], stem_macs: int) -> dict:
    """Encoder MAdds of a tree from the block look-up table (heads excluded).

    Layer l costs ``c_l`` per node; a task pays the stem and the one node per layer on its path.
    """
    per_layer = [len(grouping) * block_macs[layer] for layer, grouping in enumerate(tree)]
    tasks = [name for group in tree[0] for name in group] if tree else []
    return {
        "block_macs": list(block_macs),
        "stem_macs": stem_macs,
        "encoder_macs_per_layer": per_layer,
        "encoder_macs": stem_macs + sum(per_layer),
        "encoder_macs_per_task": {name: stem_macs + sum(block_macs) for name in tasks},
    }
