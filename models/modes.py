"""``eval_mode(module)``: run a block of code with a module in eval mode, then put its mode back.

Exporting, parity checks, MAC counting, probing a backbone and evaluation all need eval-mode
BatchNorm and dropout for a moment and must not leave a training network in eval mode (or the
reverse), also when they fail.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` for the ``with`` block; its previous mode afterwards, however the block ends."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
