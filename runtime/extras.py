"""Which optional extra provides what, and a one-line error when a command's extra is missing.

``pip install taskfold`` is the runtime alone (numpy, onnx, onnxruntime). Commands that need more
check here first, so a slim service image gets "install taskfold[serve]" rather than an
ImportError traceback from deep inside a web framework.
"""
from __future__ import annotations

import importlib.util

from taskfold.runtime.errors import MissingExtra

# Import names (not distribution names) each extra brings, as the code imports them.
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "torchvision", "timm", "onnxscript", "safetensors", "yaml", "tqdm", "matplotlib"),
    "serve": ("starlette", "uvicorn"),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found without importing them)."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtra naming the extra to install when any of its modules is absent."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                           f"pip install 'taskfold[{extra}]'")
