"""One taskfold process per run directory (and per bundle folder) at a time.

Two ``taskfold run`` processes writing into one directory used to mix one run's config with the
other's metrics and bundle. A writer now holds an OS file lock (``fcntl.flock``) on the folder's
*name* while it works: the lock file ``.<name>.taskfold-lock`` sits beside the folder, so the lock
survives the folder being renamed (moved aside by ``--overwrite``, swapped in by a compile). The
kernel drops the lock when the holding process ends, however it ends, so a crash never leaves a
stale lock behind; a second process is refused at once with the holder's PID.

Locks are re-entrant within a process (``taskfold run`` locks the run, then its compile step
locks it again) and are released when the outermost holder leaves, so a notebook that trained a
run does not keep it locked for a later ``taskfold compile`` in a terminal.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from taskfold.trainer import distributed

LOCK_SUFFIX = ".taskfold-lock"


class RunInUse(ValueError):
    """Another process is writing the run directory or bundle folder asked for."""


_held: dict[Path, list] = {}  # lock file -> [fd or None, depth]


def lock_file_for(folder: str | os.PathLike[str]) -> Path:
    """The lock file of ``folder``: ``.<name>.taskfold-lock`` in its parent."""
    path = Path(os.path.abspath(folder))
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def _acquire(lock: Path, folder: Path, what: str) -> int | None:
    """Open and flock ``lock`` without waiting; the PID of this process is written into it.

    None where no lock file can be made (a read-only location, which no one else can write to
    either): reading a run from such a place needs no lock.
    """
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise RunInUse(f"{what} {folder} is in use by {who} (another taskfold command); "
                           "wait for it to finish or write elsewhere with -o") from None
        try:  # the previous holder may have unlinked the file between our open and our flock
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "run directory") -> Iterator[None]:
    """Hold the lock of ``folder`` for the ``with`` block; re-entrant. ``folder`` need not
    exist, its parent must. Raises :class:`RunInUse` naming the holder's PID when another
    process holds it. In a DDP run only rank 0 takes the lock (the other ranks never write the
    folder, and would otherwise wait on their own rank 0)."""
    if not distributed.is_main():
        yield
        return
    lock = lock_file_for(folder)
    entry = _held.get(lock)
    if entry is None:
        entry = _held[lock] = [_acquire(lock, Path(folder), what), 0]
    entry[1] += 1
    try:
        yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _held[lock]
            if entry[0] is not None:
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # still locked: an opener that raced us sees another inode and retries
                os.close(entry[0])
