"""Exceptions for runtime mistakes a user can fix; the CLI prints each as one line and exits 2.

All three subclass ``ValueError`` so a caller (or the CLI) can treat every user-fixable runtime
problem the same way, while tests and services can still tell them apart.
"""
from __future__ import annotations


class BundleError(ValueError):
    """A bundle folder or its manifest is missing, unreadable, of an unknown format or tampered."""


class InputError(ValueError):
    """Images handed to a predictor have the wrong type, rank, shape or dtype."""


class BackendUnavailable(ValueError):
    """A backend or execution provider cannot run here; the message says why and what exists.

    Raised instead of falling back silently: a caller who asked for a GPU must not get a CPU
    run (and CPU latencies) without knowing it.
    """


class MissingExtra(ValueError):
    """A command or call needs an optional extra (``taskfold[train]``, ``[serve]``) that is not installed."""
