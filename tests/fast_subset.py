"""Which cases of a parametrised test `make test-fast` runs: one representative each.

Every case still runs in `make test` (and CI); the rest are marked ``slow`` so the fast suite
stays under three minutes on 2 cores while it still crosses every code path once.
"""
from __future__ import annotations

from collections.abc import Iterable

import pytest


def slow_except(values: Iterable, keep: set) -> list:
    """``values`` for ``pytest.mark.parametrize``, all but those in ``keep`` marked ``slow``."""
    values = list(values)
    missing = keep - set(values)
    assert not missing, f"fast representatives {missing} are not among the cases"
    return [v if v in keep else pytest.param(v, marks=pytest.mark.slow) for v in values]
