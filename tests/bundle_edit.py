"""Edit a bundle's manifest the way a careless (or curious) user would, for tests of the runtime's
checks: the manifest's own hash is rewritten to match unless asked not to, so each test reaches
the check it is about."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from taskfold.runtime.bundle import MANIFEST, MANIFEST_HASH


def write_manifest_text(folder: Path, text: str, *, rehash: bool = True) -> None:
    data = text.encode("utf-8")
    (folder / MANIFEST).write_bytes(data)
    if rehash:
        (folder / MANIFEST_HASH).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n")


def edit_manifest(folder: Path, *, rehash: bool = True, **changes: Any) -> None:
    """Replace top-level manifest keys (``input={...}``, ``tasks=[...]``)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    write_manifest_text(folder, json.dumps({**manifest, **changes}), rehash=rehash)


def rehash_file(folder: Path, name: str) -> None:
    """Record ``name``'s current sha256 in the manifest (and rehash the manifest)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = f"sha256:{hashlib.sha256((folder / name).read_bytes()).hexdigest()}"
    write_manifest_text(folder, json.dumps(manifest))
