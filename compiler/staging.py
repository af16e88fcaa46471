"""Where a compile may write its bundle, and how it replaces an old one without ever losing it.

``taskfold compile RUN -o DIR`` used to delete whatever folder was at DIR — the current folder,
the run itself. Now the target must be a new or empty folder, or (with ``--overwrite``) a
bundle whose every file the bundle's manifest accounts for; never the current directory, the
run directory or a folder that contains it. The bundle is written into a hidden sibling
(``.<name>.<id>.tmp``), checked with the runtime's own load-time checks, and only then swapped
in. The target's lock (:mod:`taskfold.trainer.runlock`) is held throughout, so a temporary or
swapped-out folder found beside the target is an orphan of a killed compile: it is removed (an
old bundle whose replacement never arrived is put back first).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from taskfold.compiler.errors import CompileError
from taskfold.runtime.bundle import MANIFEST, MANIFEST_HASH, open_bundle
from taskfold.runtime.errors import BundleError
from taskfold.trainer.runlock import folder_lock

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def _is_within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or inside it (both resolved)."""
    return path == folder or folder in path.parents


def _bundle_files(out: Path) -> set[str] | None:
    """Names a bundle folder may hold (manifest, its hash, listed files), or None if not a bundle."""
    try:
        listed = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(listed, dict):
        return None
    return {MANIFEST, MANIFEST_HASH, *listed}


def check_bundle_target(out: Path, *, overwrite: bool, run_dir: Path | None = None) -> None:
    """Refuse a target that is not ours to (re)write; see the module docstring."""
    target = out.resolve()
    if _is_within(Path.cwd().resolve(), target):
        raise CompileError(f"-o {out}: refusing to write a bundle over the current directory (or a folder "
                           "holding it); name a new folder, e.g. -o bundle")
    if run_dir is not None and _is_within(run_dir.resolve(), target):
        raise CompileError(f"-o {out}: that is the run directory {run_dir} (or holds it); "
                           "a bundle goes into a folder of its own, e.g. RUN/bundle")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CompileError(f"-o {out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    allowed = _bundle_files(out)
    if allowed is None:
        raise CompileError(f"-o {out}: exists and is not a bundle (no readable {MANIFEST}); "
                           "refusing to replace it")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed)
    if foreign:
        raise CompileError(f"-o {out}: the bundle folder also holds {', '.join(foreign[:3])}, which its "
                           f"{MANIFEST} does not list; refusing to replace it")
    if not overwrite:
        raise CompileError(f"-o {out}: a bundle exists there (pass --overwrite to replace it)")


def _clean_orphans(out: Path) -> None:
    """Remove what a killed compile of ``out`` left beside it (the caller holds ``out``'s lock)."""
    for old in sorted(out.parent.glob(f".{out.name}.*{OLD_SUFFIX}")):
        if not out.exists():  # killed between moving the old bundle aside and moving the new one in
            os.replace(old, out)
        else:
            shutil.rmtree(old)
    for tmp in sorted(out.parent.glob(f".{out.name}.*{TMP_SUFFIX}")):
        shutil.rmtree(tmp)


@contextlib.contextmanager
def staged_bundle(out: str | os.PathLike[str], *, overwrite: bool = False,
                  run_dir: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder to write the bundle for ``out`` into; when the block ends,
    the bundle there is verified (hashes, manifest vs graph) and moved to ``out``.

    An exception in the block (or a bundle that does not verify) removes the temporary folder
    and leaves ``out`` as it was.
    """
    out = Path(out)
    check_bundle_target(out, overwrite=overwrite, run_dir=run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "bundle folder"):
        check_bundle_target(out, overwrite=overwrite, run_dir=run_dir)  # as it is now that we hold the lock
        _clean_orphans(out)
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
        tmp.mkdir()
        try:
            yield tmp
            verified = open_bundle(tmp)
            verified.graph("model.onnx")
            verified.verify_rest()
        except BundleError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CompileError(f"the compiled bundle does not verify: {exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap_in(tmp, out)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the verified bundle to ``out``, replacing an existing (checked) bundle folder there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}{OLD_SUFFIX}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)
