"""Networks, registered by method name; every forward returns ``{task: Tensor}``."""
from __future__ import annotations

from taskfold.models.nets.registry import NETWORKS, build_network
from taskfold.models.nets import aux, branch, branched, group, shared  # noqa: F401  (registers the networks)

__all__ = ["NETWORKS", "build_network"]
