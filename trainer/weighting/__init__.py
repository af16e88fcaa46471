"""Loss and gradient weighting strategies, each registered by name in :data:`WEIGHTINGS`.

``create_weighting({"name": "ial", ...options}, tasks=..., primary=...)`` validates the options
against the strategy's ``Options`` dataclass and returns a :class:`WeightingStrategy`.
"""
from __future__ import annotations

from taskfold.trainer.weighting.base import StepContext, WeightingStrategy
from taskfold.trainer.weighting.registry import WEIGHTINGS, create_weighting
from taskfold.trainer.weighting import (  # noqa: F401  (importing a module registers its strategies)
    cagrad, dwa, equal, gcs, gradnorm, ial, projection, uncertainty,
)

__all__ = ["StepContext", "WeightingStrategy", "WEIGHTINGS", "create_weighting"]
