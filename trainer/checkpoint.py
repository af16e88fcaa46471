"""Resumable checkpoints: everything a killed run needs to continue as if it had never stopped.

A checkpoint is the folder ``RUN/checkpoints/last`` holding

- ``model.safetensors``: the network's weights and buffers (what the compiler reads);
- ``trainer_state.pt``: the rest, saved with ``torch.save`` and read back with
  ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts only): the weight
  optimiser, the method's state (architecture optimisers, phase flags), the weighting strategy's
  state (its parameters, initial losses, loss history, sampling generator), the RNG states
  (python, numpy, torch and the training split's batch-plan generator), where in the epoch the run
  stopped, the running loss sums of the open logging interval and of the epoch, and how many bytes
  of ``metrics.jsonl`` were written (a resumed run truncates what came after, so no record is
  duplicated).

**Atomic.** A new checkpoint is written whole into ``last.new`` (each file fsynced, then a
``COMPLETE`` marker), then swapped in: ``last`` → ``last.old``, ``last.new`` → ``last``, and
``last.old`` removed. A crash at any point leaves a whole checkpoint that :func:`recover` puts back
in place: the previous one until the new one is complete, the new one after.

**Bit-identical resume.** The batch plan of an epoch is drawn from its generator at the epoch's
start, so the checkpoint keeps the generator state *from before* the epoch's plan and the number
of batches already consumed: a resume replans the epoch identically and skips those batches.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from taskfold.trainer import distributed
from taskfold.trainer.config import ConfigError

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
COMPLETE = "COMPLETE"
FORMAT = 1


@dataclass
class EpochCursor:
    """Where training is inside an epoch, and the running sums a resume must carry on from."""

    epoch: int = 0
    step: int = 0  # weight steps done in the whole run
    epoch_start_step: int = 0  # the run's step when this epoch started (its schedule depends on it)
    consumed: int = 0  # batches of this epoch already consumed (weight and architecture)
    weight_index: int = -1  # index of the last weight batch of this epoch
    sums: dict[str, float] = field(default_factory=dict)  # loss sums since the last train record
    count: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)  # loss sums of the epoch (DWA)
    plan_generator: torch.Tensor | None = None  # batch-plan generator state before this epoch's plan


def rng_state() -> dict:
    """Python, numpy and torch global RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": _listify(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(value):
    return [_listify(v) for v in value] if isinstance(value, tuple) else value


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, model: torch.nn.Module, state: dict) -> None:
    """Write ``model`` and ``state`` as the checkpoint ``folder`` (e.g. ``checkpoints/last``),
    atomically: the previous checkpoint stays whole until the new one is."""
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    recover(folder)
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(new / WEIGHTS))
    torch.save({"format": FORMAT, **state}, new / STATE)
    for name in (WEIGHTS, STATE):
        _fsync_file(new / name)
    (new / COMPLETE).write_text("")
    _fsync_file(new / COMPLETE)
    _fsync_dir(new)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    _fsync_dir(folder.parent)
    if old.exists():
        shutil.rmtree(old)


def recover(folder: Path) -> None:
    """Put a whole checkpoint back at ``folder`` after a crash in the middle of a swap (rank 0's
    job in a DDP run: the other ranks wait for it, see :mod:`taskfold.trainer.resume`)."""
    if not distributed.is_main():
        return
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)  # the swap finished; only the clean-up was cut short
        return
    if (new / COMPLETE).exists():
        os.replace(new, folder)
    elif old.exists():
        os.replace(old, folder)


def load_trainer_state(folder: Path) -> dict:
    """The trainer state of checkpoint ``folder`` (ConfigError naming the file when unusable)."""
    recover(folder)
    path = folder / STATE
    if not path.is_file():
        raise ConfigError(f"cannot resume: no resumable checkpoint at {path} (the run stopped before its first "
                          "checkpoint, or was written by a taskfold without --resume)")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: pickle/zip errors of many kinds
        raise ConfigError(f"cannot resume: {path} is not readable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"cannot resume: {path} has an unknown format")
    return state


def cursor_state(cursor: EpochCursor) -> dict:
    return asdict(cursor)


def cursor_from_state(state: dict) -> EpochCursor:
    return EpochCursor(**state)
