"""Training methods, registered by name in :data:`METHODS`; see base.py for the contract."""
from __future__ import annotations

from taskfold.trainer.config import build_options
from taskfold.trainer.methods.base import METHODS, Method, Progress
from taskfold.trainer.methods import aux, bmtas, dmtg, plain  # noqa: F401  (registers the methods)


def create_method(spec: dict) -> Method:
    """``{"name": "aux_nas", **options}`` → a method object with validated options."""
    cls = METHODS.get(spec["name"])
    options = build_options(cls.Options, {k: v for k, v in spec.items() if k != "name"}, "method")
    return cls(options)


__all__ = ["METHODS", "Method", "Progress", "create_method"]
