"""Exceptions for user mistakes caught while building models (the CLI turns them into exit 2)."""
from __future__ import annotations


class ModelError(ValueError):
    """A model cannot be built as asked: bad backbone option, unreadable weights file, ..."""
