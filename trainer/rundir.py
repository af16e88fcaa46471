"""The run directory contract: config.yaml, run_info.json, arch.json, checkpoints/, metrics.jsonl, report.md.

Checkpoints are written to a temporary name and renamed into place, so an interrupted run never
leaves a half-written file where a reader (the compiler, a resumed run) expects a whole one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from taskfold.models.arch import ArchSpec
from taskfold.trainer.config import Config, ConfigError, load_config, save_config

from taskfold.trainer.checkpoint import WEIGHTS, recover, save_checkpoint


class RunDir:
    """Paths and readers/writers of one run directory."""

    def __init__(self, path: str | Path, *, writable: bool = True) -> None:
        """``writable=False``: a view that reads but never writes (the ranks other than 0 of a DDP
        run: only rank 0 writes the run directory, see :mod:`taskfold.trainer.distributed`)."""
        self.path = Path(path)
        self.writable = writable

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def arch_path(self) -> Path:
        return self.path / "arch.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def run_info_path(self) -> Path:
        """Where the run trained: the resolved device (and its name on CUDA), amp, channels_last, torch."""
        return self.path / "run_info.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    @property
    def bench_path(self) -> Path:
        """Latency rows of the run's bundle, measured by ``taskfold run`` (read by ``taskfold report``)."""
        return self.path / "bench.json"

    @property
    def bundle_path(self) -> Path:
        return self.path / "bundle"

    @property
    def follow_up_path(self) -> Path:
        """Where a method's follow-up stage runs (BMTAS's retrain, DMTG's fine-tune)."""
        return self.path / "retrain"

    def last_stage(self) -> "RunDir":
        """The run of this run's last follow-up stage (itself when it has none)."""
        return self.stages()[-1]

    def create(self, cfg: Config) -> None:
        if not self.writable:
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_path)
        self.metrics_path.write_text("")

    def log(self, record: dict) -> None:
        if not self.writable:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        """Every record of metrics.jsonl; a ConfigError naming the first line that is not a JSON object."""
        if not self.metrics_path.is_file():
            return []
        try:
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ConfigError(f"run {self.path}: metrics.jsonl is not text") from None
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise ConfigError(f"run {self.path}: metrics.jsonl line {number} is not a JSON object")
            records.append(record)
        return records

    def save_bench(self, rows: list[dict]) -> None:
        _atomic(self.bench_path, lambda p: p.write_text(json.dumps(rows, indent=1)))

    def read_bench(self) -> list[dict]:
        """The saved latency rows ([] when none were measured, or the file is unreadable)."""
        try:
            rows = json.loads(self.bench_path.read_text())
        except (OSError, ValueError):
            return []
        return rows if isinstance(rows, list) and all(isinstance(r, dict) for r in rows) else []

    def stages(self) -> list["RunDir"]:
        """This run and each of its follow-up stages, in order (the last is what is compiled)."""
        runs = [self]
        while runs[-1].follow_up_path.is_dir():
            runs.append(RunDir(runs[-1].follow_up_path))
        return runs

    def test_metrics(self) -> dict[str, dict[str, float]] | None:
        """The run's test metrics (its last ``test`` record), or None if it has not finished."""
        return next((r["test"] for r in reversed(self.read_metrics()) if r.get("type") == "test"), None)

    def save_checkpoint(self, model: nn.Module, trainer_state: dict, tag: str = "last") -> None:
        """The weights and everything a resume needs, atomically (see :mod:`taskfold.trainer.checkpoint`)."""
        if not self.writable:
            return
        save_checkpoint(self.checkpoints / tag, model, trainer_state)

    def weights_path(self, tag: str = "last") -> Path:
        """The weights file of checkpoint ``tag`` (``checkpoints/<tag>/model.safetensors``)."""
        return self.checkpoints / tag / WEIGHTS

    def load_weights(self, model: nn.Module, tag: str = "last") -> None:
        recover(self.checkpoints / tag)  # a crash mid-swap leaves the whole checkpoint aside
        path = self.weights_path(tag)
        if not path.is_file():
            raise ConfigError(f"run {self.path}: no checkpoint at {path} (did training finish?)")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"run {self.path}: checkpoint {path} is not readable ({exc}; truncated?)") from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # "size mismatch for ..." lines: keep the first
            detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "")
            raise ConfigError(f"run {self.path}: checkpoint does not fit arch.json ({detail or 'shapes differ'})") from None
        if missing or unexpected:
            raise ConfigError(
                f"run {self.path}: checkpoint does not fit arch.json "
                f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[0]})")

    def load_config(self) -> Config:
        if not self.path.is_dir():
            raise ConfigError(f"run directory not found: {self.path}")
        return load_config(self.config_path)

    def load_arch(self) -> ArchSpec:
        if not self.arch_path.is_file():
            raise ConfigError(f"run {self.path}: arch.json is missing (not a taskfold run directory?)")
        try:
            return ArchSpec.load(self.arch_path)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"run {self.path}: arch.json is not valid ({exc})") from None


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
