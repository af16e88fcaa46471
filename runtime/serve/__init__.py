"""``taskfold serve``: bundles behind the KServe v2 / Triton HTTP protocol, with dynamic batching.

Importing this package needs only the runtime's own dependencies; the web stack (Starlette on
uvicorn, the ``serve`` extra) is imported when :func:`serve` starts a server.
"""
from __future__ import annotations

from taskfold.runtime.serve.server import ServeError, ServeOptions, build_app, load_models, serve

__all__ = ["ServeError", "ServeOptions", "build_app", "load_models", "serve"]
