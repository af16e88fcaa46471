"""The registry of weighting strategies and the one place that builds them from a config."""
from __future__ import annotations

from taskfold.models.registry import Registry
from taskfold.trainer.config import ConfigError, build_options
from taskfold.trainer.weighting.base import WeightingStrategy

WEIGHTINGS: Registry[type] = Registry("weighting strategy")


def create_weighting(spec: dict, *, tasks: list[str], primary: list[str],
                     task_weights: dict[str, float] | None = None) -> WeightingStrategy:
    """Build a strategy from ``{"name": ..., **options}``.

    A strategy class has a nested ``Options`` dataclass (validated here) and ``requires_primary``
    (True for PCGrad-Aux, GCS, IAL: those need ``primary:`` in the config to tell primary and
    auxiliary tasks apart).
    """
    name = spec.get("name", "ew")
    cls = WEIGHTINGS.get(name)
    options = build_options(cls.Options, {k: v for k, v in spec.items() if k != "name"}, "weighting")
    auxiliary = [t for t in tasks if t not in primary]
    if getattr(cls, "requires_primary", False) and (not auxiliary or len(primary) != 1):
        raise ConfigError(f"weighting {name!r} needs `primary:` set to one task (the others become auxiliary)")
    return cls(options=options, tasks=tasks, task_weights=task_weights or {t: 1.0 for t in tasks})
