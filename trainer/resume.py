"""``taskfold train --resume RUN`` / ``taskfold run --resume RUN``: continue a killed or stopped run.

The run continues from its last checkpoint (see :mod:`taskfold.trainer.checkpoint`) in the stage
that was running: the search, or a follow-up stage (BMTAS retrain, DMTG fine-tune), which is
started from the finished stage's ``arch.json`` if the stop came between the two. Records that
``metrics.jsonl`` got after the checkpoint are dropped before training goes on, so the resumed
run's file is the one an uninterrupted run would have written.

``--set`` may change only fields that do not change what is trained (:data:`SAFE_FIELDS`); any
other change is refused, naming the fields, because the checkpoint would no longer match.
"""
from __future__ import annotations

import os
from pathlib import Path

from taskfold.trainer import distributed
from taskfold.trainer.checkpoint import cursor_from_state, load_trainer_state, recover
from taskfold.trainer.config import Config, ConfigError, config_from_dict
from taskfold.trainer.loop import finish, fit, setup, train, train_follow_ups
from taskfold.trainer.methods import create_method
from taskfold.trainer.rundir import RunDir
from taskfold.trainer.runlock import folder_lock

# Fields a resume may change: how long to train, what to log and when, the device (e.g. another
# GPU), and the benchmark.
SAFE_FIELDS = ("train.epochs", "train.progress", "train.device", "train.log_every", "train.eval_every",
               "train.checkpoint_every",
               "bench", "report", "compile")


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def changed_fields(before: Config, after: Config) -> list[str]:
    """Dotted names of the fields whose value differs (lists compare whole)."""
    old, new = _flatten(before.to_dict()), _flatten(after.to_dict())
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _safe(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in SAFE_FIELDS)


def resume_config(run: RunDir, overrides: list[str]) -> Config:
    """The run's saved config with ``overrides`` applied; ConfigError if one changes what is trained."""
    saved = run.load_config()
    cfg = config_from_dict(saved.to_dict(), overrides)
    unsafe = [name for name in changed_fields(saved, cfg) if not _safe(name)]
    if unsafe:
        raise ConfigError(f"cannot resume {run.path} with a changed {', '.join(unsafe)}: a resumed run may only change "
                          f"{', '.join(SAFE_FIELDS)}; start a new run for anything else")
    return cfg


def _resume_stage(cfg: Config, run: RunDir) -> dict:
    """Continue the unfinished stage ``run`` from its last checkpoint; returns its summary."""
    recover(run.checkpoints / "last")  # rank 0 puts a checkpoint cut mid-swap back; the other ranks wait
    distributed.barrier()
    saved = load_trainer_state(run.checkpoints / "last")
    processes = saved.get("processes", 1)
    if processes != distributed.world_size():  # each rank's share of a batch would change
        raise ConfigError(f"cannot resume {run.path}: it was trained by {processes} process(es); resume it with "
                          f"the same number (--nproc {processes}), not {distributed.world_size()}")
    with folder_lock(run.path):
        state = setup(cfg, run.path, resume=True)
        if state.run.writable:
            with open(run.metrics_path, "r+b") as handle:  # drop what came after the checkpoint
                handle.truncate(saved["metrics_bytes"])
                handle.flush()
                os.fsync(handle.fileno())
        fit(state, cursor_from_state(saved["cursor"]), saved)
        return finish(state)


def _follow_up_of(cfg: Config, run: RunDir) -> Config | None:
    """The follow-up stage a finished stage asks for, from its saved decision."""
    return create_method(cfg.method).follow_up(cfg, run.path, run.load_arch().decision)


def resume_stages(run_dir: str | os.PathLike, overrides: list[str], *, finished_ok: bool = False
                  ) -> tuple[dict | None, Path]:
    """Resume the run at ``run_dir`` and train its remaining stages; returns the last stage's
    summary and directory (what to compile). A run with nothing left to train is refused, or with
    ``finished_ok`` returned as (None, its last stage)."""
    top = RunDir(run_dir)
    if not top.config_path.is_file():
        raise ConfigError(f"cannot resume: {top.path} is not a taskfold run directory (no config.yaml)")
    with folder_lock(top.path):
        stages = top.stages()
        configs = [resume_config(top, overrides)] + [stage.load_config() for stage in stages[1:]]
        last, cfg = stages[-1], configs[-1]
        if last.test_metrics() is None:
            summary = _resume_stage(cfg, last)
        else:
            follow = _follow_up_of(cfg, last)
            if follow is None:
                if finished_ok:
                    return None, last.path
                raise ConfigError(f"cannot resume: run {top.path} is finished (it has a test record); "
                                  f"compile it with `taskfold compile {top.path}`")
            summary = train(follow, last.follow_up_path)
            last = RunDir(last.follow_up_path)
        return train_follow_ups(summary, last.path)
