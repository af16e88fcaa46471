"""Read, verify and write a bundle: ``manifest.json``, its hash, and the files it lists.

A bundle is a folder holding ``model.onnx`` (optionally ``model.plan``, external-data files,
precision variants), ``manifest.json`` and ``manifest.json.sha256``. The manifest's ``files``
maps each file name to ``"sha256:<hex>"``; ``manifest.json.sha256`` holds the manifest's own
hash (``sha256sum -c`` reads it), so an edited manifest (a swapped task name, a changed mean) is
refused like an edited graph. The runtime hashes the very bytes it then hands to the backend
(:meth:`VerifiedBundle.read`), never re-opening a file by path after the check, and refuses
symbolic links anywhere in a bundle.

What this protects against: accidents — a truncated copy, a half-synced folder, a hand-edited
manifest, a file from another bundle. It is not a signature: anyone who can write the folder
can rewrite the hashes too. Signing bundles (and checking the signature before ``load``) is the
deployer's job, e.g. with the tools of their artifact store.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from taskfold.runtime.errors import BundleError
from taskfold.runtime.graph_check import VerifiedGraph, verified_graph

FORMAT = "taskfold.bundle/1"
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.json.sha256"
REQUIRED_KEYS = ("name", "input", "tasks", "files")
_CHUNK = 1 << 20


def taskfold_version() -> str:
    """The installed taskfold's version ("unknown" when running from a checkout not installed)."""
    try:
        return importlib.metadata.version("taskfold")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


def _read_regular(folder: Path, name: str) -> bytes:
    """The bytes of ``folder/name``, refusing a symbolic link (``O_NOFOLLOW``) or a missing file."""
    try:
        fd = os.open(folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise BundleError(f"bundle {folder}: {name} is missing") from None
    except OSError as exc:  # ELOOP: a symbolic link; EISDIR, EACCES, ...
        if os.path.islink(folder / name):
            raise BundleError(f"bundle {folder}: {name} is a symbolic link (a bundle holds its own files)") from None
        raise BundleError(f"bundle {folder}: cannot read {name} ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise BundleError(f"bundle {folder}: {name} is not a regular file")
        return handle.read()


def _check_no_symlinks(folder: Path) -> None:
    """Every entry of the bundle, at any depth, is a real file or folder."""
    for root, dirs, files in os.walk(folder):
        for entry in [*dirs, *files]:
            if os.path.islink(os.path.join(root, entry)):
                name = os.path.relpath(os.path.join(root, entry), folder)
                raise BundleError(f"bundle {folder}: {name} is a symbolic link (a bundle holds its own files)")


def _hash_line(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n"


def _structure_problem(manifest: dict[str, Any]) -> str | None:
    """What makes a parsed manifest unusable (the keys the runtime reads), or None."""
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        return f"lacks {', '.join(missing)}"
    files = manifest["files"]
    if not isinstance(files, dict) or not files or not all(
            isinstance(k, str) and isinstance(v, str) and v.startswith("sha256:") for k, v in files.items()):
        return "'files' must map file names to \"sha256:<hex>\""
    spec = manifest["input"]
    if not isinstance(spec, dict):
        return "'input' must be an object"
    if not isinstance(spec.get("name"), str):
        return "input.name is missing (the graph's input name)"
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool)
                                                           for d in shape):
        return "input.shape must be a list of integers (-1 for the batch)"
    try:
        np.dtype(spec.get("dtype", "float32"))
    except TypeError:
        return f"input.dtype {spec.get('dtype')!r} is not a numpy dtype"
    for key in ("mean", "std"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return f"input.{key} must be a list of numbers"
    tasks = manifest["tasks"]
    if not isinstance(tasks, list) or not tasks:
        return "'tasks' must be a non-empty list"
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("name"), str) or not isinstance(task.get("output"), str):
            return f"tasks[{i}] needs a 'name' and an 'output' (strings)"
    names = [task["name"] for task in tasks]
    if len(set(names)) != len(names):
        return f"task names must be unique, got {names}"
    return None


def read_manifest(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse ``manifest.json`` after checking it against ``manifest.json.sha256``, and check its
    format and the structure the runtime relies on (the listed files are not hashed here)."""
    folder = Path(bundle)
    if not folder.is_dir():
        raise BundleError(f"bundle {folder}: no such folder")
    if not (folder / MANIFEST).exists() and not (folder / MANIFEST).is_symlink():
        raise BundleError(f"bundle {folder}: {MANIFEST} is missing")
    data = _read_regular(folder, MANIFEST)
    if not (folder / MANIFEST_HASH).is_file() and not (folder / MANIFEST_HASH).is_symlink():
        raise BundleError(f"bundle {folder}: {MANIFEST_HASH} is missing (written by taskfold compile; recompile "
                          "the run, or restore the file)")
    recorded = _read_regular(folder, MANIFEST_HASH).decode("ascii", errors="replace").split()
    if not recorded or recorded[0] != hashlib.sha256(data).hexdigest():
        raise BundleError(f"bundle {folder}: {MANIFEST} does not match its sha256 in {MANIFEST_HASH} "
                          "(edited or corrupted)")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {folder}: {MANIFEST} is not readable JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {folder}: {MANIFEST} must hold a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"bundle {folder}: unknown format {manifest.get('format')!r} in {MANIFEST} (expected {FORMAT!r})"
        )
    problem = _structure_problem(manifest)
    if problem:
        raise BundleError(f"bundle {folder}: {MANIFEST} {problem}")
    for name in manifest["files"]:
        _check_file_name(folder, name)
    return manifest


class VerifiedBundle:
    """A bundle whose manifest is verified; :meth:`read` gives a listed file's verified bytes.

    Every backend (and every precision variant) gets its graph or engine through :meth:`read`:
    the file is read once, its sha256 is checked on exactly those bytes, and the bytes are what
    the backend receives. :meth:`verify_rest` hashes the listed files no one has read.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self._verified: set[str] = set()

    def read(self, name: str) -> bytes:
        """The bytes of listed file ``name`` after checking them against the manifest."""
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle {self.folder}: {MANIFEST} does not list {name}")
        data = _read_regular(self.folder, name)
        if self.manifest["files"][name] != f"sha256:{hashlib.sha256(data).hexdigest()}":
            raise BundleError(
                f"bundle {self.folder}: {name} does not match its sha256 in {MANIFEST} (tampered or corrupted)"
            )
        self._verified.add(name)
        return data

    def graph(self, name: str = "model.onnx", input_spec: dict[str, Any] | None = None) -> VerifiedGraph:
        """Listed ONNX graph ``name``, verified, parsed and checked against the manifest (or
        ``input_spec`` for its input), with its external-data files (see
        :func:`taskfold.runtime.graph_check.verified_graph`)."""
        return verified_graph(self, name, input_spec)

    def verify_rest(self) -> None:
        """Hash every listed file not yet read (streamed: nothing is kept in memory)."""
        for name, expected in self.manifest["files"].items():
            if name in self._verified:
                continue
            path = self.folder / name
            if path.is_symlink():
                raise BundleError(f"bundle {self.folder}: {name} is a symbolic link (a bundle holds its own files)")
            if not path.is_file():
                raise BundleError(f"bundle {self.folder}: {name} is missing")
            if expected != f"sha256:{sha256_file(path)}":
                raise BundleError(
                    f"bundle {self.folder}: {name} does not match its sha256 in {MANIFEST} (tampered or corrupted)"
                )
            self._verified.add(name)


def open_bundle(bundle: str | os.PathLike[str]) -> VerifiedBundle:
    """Check the manifest (its hash, format and structure) and that the bundle has no symbolic
    links; the listed files are checked as they are read (see :class:`VerifiedBundle`)."""
    folder = Path(bundle)
    manifest = read_manifest(folder)
    _check_no_symlinks(folder)
    return VerifiedBundle(folder, manifest)


def verify_bundle(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the manifest after checking it and every listed file against their sha256."""
    verified = open_bundle(bundle)
    verified.verify_rest()
    return verified.manifest


def write_manifest(bundle: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` (``files`` filled in by hashing the files now in the folder) and
    ``manifest.json.sha256``.

    ``manifest["files"]`` may list the file names (a list, or a dict whose values are replaced);
    when absent every regular file in the folder except the manifest and its hash is listed,
    which also covers ONNX external-data files. Both files are written to temporary names and
    renamed, so a crash never leaves a half-written manifest. Returns the manifest as written.
    """
    folder = Path(bundle)
    listed = manifest.get("files")
    if listed is None:
        names = sorted(p.name for p in folder.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.name not in (MANIFEST, MANIFEST_HASH))
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
    data = (json.dumps(written, indent=2) + "\n").encode("utf-8")
    for name, content in ((MANIFEST, data), (MANIFEST_HASH, _hash_line(data).encode("ascii"))):
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, folder / name)
    return written
