"""Cheap private copies of the session's run and bundle, and a fingerprint of a folder tree, for
tests that prove a command changed nothing it did not own."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

BIG = 1 << 20  # files above this are hard-linked, not copied (checkpoints, graphs)


def clone(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst``; big files are hard links, so a test that changes one must
    :func:`replace_bytes` it (a new file) and never write it in place."""
    def copy(a: str, b: str) -> None:
        os.link(a, b) if os.path.getsize(a) > BIG else shutil.copy2(a, b)

    return Path(shutil.copytree(src, dst, copy_function=copy))


def replace_bytes(path: Path, data: bytes) -> None:
    """Give ``path`` new contents as a new file (a hard-linked original stays as it was)."""
    path.unlink()
    path.write_bytes(data)


def snapshot(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """``{relative path: fingerprint}`` of every file and folder under ``root`` (``skip`` trees
    excluded): sha256 for small files, size/mtime/inode for big ones, so any write shows."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir",)
        else:
            st = path.stat()
            out[rel] = (("big", st.st_size, st.st_mtime_ns, st.st_ino) if st.st_size > BIG
                        else ("file", hashlib.sha256(path.read_bytes()).hexdigest()))
    return out
