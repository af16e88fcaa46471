"""Where a new run is written, and how ``--overwrite`` replaces an old run without losing it early.

``taskfold run --overwrite`` used to delete the old run first and then fail on a typo in the
recipe. Now the old run is moved aside to a hidden sibling (``.<name>.<id>.replaced``), the new
run is set up in its place, and only once it has started cleanly (the training loop's setup is
done: data, tasks, network and optimisers built, config and arch.json written) is the old one
deleted. If anything fails before that, the new run's files are removed and the old run is moved
back. The folder's lock (:mod:`taskfold.trainer.runlock`) is held throughout, so no other process
sees the swap half-done. A ``.replaced`` sibling left by a killed process is never deleted by
taskfold: the next run into that folder refuses and says where the old run is.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from taskfold.trainer import distributed
from taskfold.trainer.config import ConfigError
from taskfold.trainer.runlock import folder_lock

ASIDE_SUFFIX = ".replaced"


class RunTarget:
    """The folder a new run goes into; :meth:`started` commits a replacement of an old run."""

    def __init__(self, path: Path, aside: Path | None, created: bool, *, owner: bool = True) -> None:
        self.path = path
        self._owner = owner  # False on the ranks other than 0 of a DDP run: nothing to commit or undo
        self._aside = aside  # the old run, moved out of the way
        self._created = created  # the folder did not exist before
        self._started = False

    def started(self) -> None:
        """The new run has started cleanly: the old run it replaces can go."""
        if self._started or not self._owner:
            return
        self._started = True
        if self._aside is not None:
            shutil.rmtree(self._aside)
            self._aside = None

    def _abandon(self) -> None:
        """The new run failed before it started: remove what it wrote, put the old run back."""
        if self._started or not self._owner:
            return
        if self._created:
            shutil.rmtree(self.path, ignore_errors=True)
        else:  # an empty folder the user made: empty it again, keep it
            for entry in self.path.iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if self._aside is not None:
            os.replace(self._aside, self.path)


@contextlib.contextmanager
def new_run_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[RunTarget]:
    """Lock ``path`` and make it ready for a new run for the ``with`` block.

    An existing non-empty folder is refused unless ``overwrite`` and it is a taskfold run
    (has config.yaml); it is then replaced only when the block calls ``target.started()``
    (or leaves normally). An exception before that restores the old run.
    """
    path = Path(path)
    if not distributed.is_main():  # DDP: rank 0 checks and prepares the folder; the others never touch it
        yield RunTarget(path, None, created=False, owner=False)
        return
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run directory {path} is a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path):
        orphan = next(iter(sorted(path.parent.glob(f".{path.name}.*{ASIDE_SUFFIX}"))), None)
        if orphan is not None:
            raise ConfigError(f"{orphan} holds the old run that an interrupted --overwrite of {path} moved "
                              "aside; move it back or delete it, then run again")
        aside = None
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise ConfigError(f"run directory {path} already exists and is not empty "
                                  "(pass --overwrite to replace it, or -o for another)")
            if not (path / "config.yaml").is_file():  # never delete a folder that is not a run
                raise ConfigError(f"--overwrite: {path} is not a taskfold run directory (no config.yaml); "
                                  "refusing to delete it")
            aside = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}{ASIDE_SUFFIX}"
            os.replace(path, aside)
        created = not path.exists()
        path.mkdir(exist_ok=True)
        target = RunTarget(path, aside, created)
        try:
            yield target
        except BaseException:
            target._abandon()
            raise
        target.started()
