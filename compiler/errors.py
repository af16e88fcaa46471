"""The compiler's user-facing exception (the CLI turns it into one line on stderr, exit 2)."""
from __future__ import annotations


class CompileError(ValueError):
    """A run or model cannot be compiled into a bundle: export failure, parity failure, ..."""
