"""Read, verify and write a bundle's ``manifest.json``.

A bundle is a folder holding ``model.onnx`` (optionally ``model.plan``, external-data files)
and ``manifest.json``. The manifest's ``files`` maps each file name to ``"sha256:<hex>"``;
the runtime refuses to load a bundle whose files do not match, so a truncated copy or an
edited graph fails loudly at load time instead of giving wrong predictions later.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from taskfold.runtime.errors import BundleError

FORMAT = "taskfold.bundle/1"
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("name", "input", "tasks", "files")
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB models never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file_name(bundle: Path, name: str) -> None:
    """Refuse names that would reach outside the bundle folder (``../x``, ``/etc/x``)."""
    parts = PurePosixPath(name).parts
    if not name or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise BundleError(f"bundle {bundle}: file name {name!r} in {MANIFEST} is not inside the bundle")


def read_manifest(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse ``manifest.json`` and check its format and required keys (files are not hashed)."""
    folder = Path(bundle)
    if not folder.is_dir():
        raise BundleError(f"bundle {folder}: no such folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"bundle {folder}: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {folder}: {MANIFEST} is not readable JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {folder}: {MANIFEST} must hold a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"bundle {folder}: unknown format {manifest.get('format')!r} in {MANIFEST} (expected {FORMAT!r})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"bundle {folder}: {MANIFEST} lacks {', '.join(missing)}")
    if not isinstance(manifest["files"], dict) or not manifest["files"]:
        raise BundleError(f"bundle {folder}: 'files' in {MANIFEST} must map file names to sha256")
    return manifest


def verify_bundle(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the manifest after checking every listed file exists and matches its sha256."""
    folder = Path(bundle)
    manifest = read_manifest(folder)
    for name, expected in manifest["files"].items():
        _check_file_name(folder, name)
        path = folder / name
        if not path.is_file():
            raise BundleError(f"bundle {folder}: {name} is missing")
        if expected != f"sha256:{sha256_file(path)}":
            raise BundleError(
                f"bundle {folder}: {name} does not match its sha256 in {MANIFEST} (tampered or corrupted)"
            )
    return manifest


def write_manifest(bundle: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` with ``files`` filled in by hashing the files now in the folder.

    ``manifest["files"]`` may list the file names (a list, or a dict whose values are replaced);
    when absent every regular file in the folder except the manifest is listed, which also
    covers ONNX external-data files. The file is written to a temporary name and renamed so a
    crash never leaves a half-written manifest. Returns the manifest as written.
    """
    folder = Path(bundle)
    listed = manifest.get("files")
    if listed is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    else:
        names = list(listed)
    files: dict[str, str] = {}
    for name in names:
        _check_file_name(folder, name)
        if not (folder / name).is_file():
            raise BundleError(f"bundle {folder}: {name} is missing")
        files[name] = f"sha256:{sha256_file(folder / name)}"
    written = {"format": FORMAT, **manifest, "files": files}
    if written["format"] != FORMAT:
        raise BundleError(f"bundle {folder}: cannot write format {written['format']!r} (only {FORMAT!r})")
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
    return written
