"""BMTAS at inference: the retrained branching tree as one graph with T outputs.

``bmtas_retrain``: nothing to strip — the BranchedNet already runs each tree node once. The
stripper measures MAdds per layer, per node and per task (PyTorch's flop counter on each node's
real input) for ``manifest["compile"]``; the manifest's ``cost`` comes from the ONNX counter.

``bmtas`` (a search run) is refused: the supergraph's weights were trained for soft routings and
without the output BatchNorms' affine parameters, so its derived tree is not the model the
method delivers; the retrained run is (``taskfold run`` trains it into ``RUN/retrain``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from taskfold.compiler.errors import CompileError
from taskfold.compiler.strip import STRIPPERS, StripResult
from taskfold.models.arch import ArchSpec
from taskfold.models.nets.branch import count_macs
from taskfold.models.nets.branched import BranchedNet, node_key


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


def macs_breakdown(model: BranchedNet, image_size: int) -> dict:
    """MAdds of the stem, every node (by layer) and every head, and what each task depends on."""
    modules: dict[str, nn.Module] = {"stem": model.stem, **{f"node:{k}": m for k, m in model.nodes.items()},
                                     **{f"head:{k}": m for k, m in model.heads.items()}}
    inputs = _captured_inputs(model.eval(), modules, torch.zeros(1, 3, image_size, image_size))
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


@STRIPPERS.register("bmtas_retrain")
def strip_branched(model: nn.Module, spec: ArchSpec, *, force: bool = False, **_: object) -> StripResult:
    if not isinstance(model, BranchedNet):
        raise CompileError(f"the bmtas_retrain stripper needs a BranchedNet; got {type(model).__name__}")
    return StripResult(model=model, outputs=spec.task_names, info={
        "stripped": [], "tree": model.tree, **macs_breakdown(model, spec.image_size)})


@STRIPPERS.register("bmtas")
def refuse_search(model: nn.Module, spec: ArchSpec, *, force: bool = False, **_: object) -> StripResult:
    raise CompileError("this is a bmtas search run (a supergraph); compile the retrained run in RUN/retrain "
                       "(`taskfold run` trains it there)")
