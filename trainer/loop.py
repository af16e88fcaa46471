"""The one training/search loop every method plugs into (see trainer/methods/base.py).

Shape of a run: ``setup`` (data, tasks, ArchSpec, method, network, optimisers, weighting) →
``fit`` (epochs of interleaved architecture and weight steps, periodic evaluation and atomic
checkpoints) → ``finish`` (test metrics, read-off into arch.json). Everything a method changes
goes through the Method contract; nothing here knows about a particular method.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from taskfold.models.arch import ArchSpec
from taskfold.models.layers.sync_batchnorm import convert_sync_batchnorm
from taskfold.models.modes import eval_mode
from taskfold.trainer import distributed
from taskfold.trainer.amp import MixedPrecision
from taskfold.trainer.checkpoint import EpochCursor, cursor_state, rng_state, set_rng_state
from taskfold.trainer.components import (build_datasets, build_loaders, build_spec, build_tasks, check_components,
                                         make_optimizer)
from taskfold.trainer.config import Config, ConfigError, save_config
from taskfold.trainer.data.loader import ARCH, SplitLoader
from taskfold.trainer.device import describe, move_parameters, resolve_device, to_device
from taskfold.trainer.methods import Method, Progress
from taskfold.trainer.rundir import RunDir
from taskfold.trainer.runlock import folder_lock
from taskfold.trainer.weighting import StepContext


@dataclass
class RunState:
    """What setup produced and the later stages use."""

    cfg: Config
    run: RunDir
    spec: ArchSpec
    method: Method
    model: nn.Module
    tasks: list
    datasets: dict
    loaders: dict[str, SplitLoader]
    optimizer: torch.optim.Optimizer
    weighting: object
    history: list[dict] = field(default_factory=list)
    last_finite: tuple[int, float] | None = None  # (step, total loss) of the last finite step
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: MixedPrecision = field(default_factory=lambda: MixedPrecision("none", torch.device("cpu")))

    def to_device(self, images: torch.Tensor, targets: dict) -> tuple[torch.Tensor, dict]:
        """A batch from a loader, on the run's device and in the network's memory format."""
        return to_device(images, targets, self.device, self.cfg.train.channels_last)


def setup(cfg: Config, run_dir: str | Path, *, resume: bool = False) -> RunState:
    """Validate everything that can be wrong before the first step, then build the run
    (``resume``: into the existing run directory, whose files are kept; see :func:`resume_point`)."""
    device = distributed.rank_device(resolve_device(cfg.train.device))  # no CUDA: refused before any work
    torch.manual_seed(cfg.train.seed)
    method, weighting = check_components(cfg)
    datasets = build_datasets(cfg)
    loaders = build_loaders(cfg, datasets, arch_fraction=method.arch_fraction, pin_memory=device.type == "cuda")
    tasks = build_tasks(cfg, datasets["train"].info)
    spec = build_spec(cfg, tasks, method)
    model = method.build(spec, backbone_weights=cfg.model.weights)
    if weighting.needs != "losses" and not any(p.requires_grad for p in model.shared_parameters()):
        raise ConfigError(f"weighting {cfg.weighting['name']!r} combines the tasks' gradients on the parameters they "
                          f"share, but method {cfg.method_name!r} shares none (it would train as a plain sum); "
                          "use weighting: ew")
    distributed.broadcast_module(model)  # every rank starts from rank 0's network (DDP's start-up broadcast)
    if cfg.train.sync_bn and distributed.active():
        convert_sync_batchnorm(model)
    model.to(device)  # in place: the parameters a method's own optimiser holds (alpha) move with it
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    move_parameters(weighting.parameters(), device)
    precision = MixedPrecision(cfg.train.amp, device)
    precision.attach(model)
    groups = method.param_groups(model)
    if weighting.parameters():
        groups.append({"params": list(weighting.parameters()), "weight_decay": 0.0})  # sigmas, GradNorm weights
    optimizer = make_optimizer(cfg, groups)
    method.attach_optimizer(optimizer)  # BMTAS resets its state after every architecture change
    run = RunDir(run_dir, writable=distributed.is_main())  # only rank 0 writes
    if run.writable:
        if resume:
            save_config(cfg, run.config_path)  # the safe changes --set made (see trainer/resume.py)
        else:
            run.create(cfg)
        run.run_info_path.write_text(json.dumps({**describe(device), "amp": cfg.train.amp,
                                                 "channels_last": cfg.train.channels_last,
                                                 "processes": distributed.world_size(),
                                                 "sync_bn": cfg.train.sync_bn and distributed.active()},
                                                indent=2) + "\n")
        spec.save(run.arch_path)
    return RunState(cfg, run, spec, method, model, tasks, datasets, loaders, optimizer, weighting,
                    device=device, precision=precision)


@torch.no_grad()
def evaluate(model: nn.Module, data: SplitLoader, tasks: list, state: RunState | None = None) -> dict[str, dict[str, float]]:
    """Each task's metrics over a whole split, plus its mean ``loss`` (NormGain_L needs it).

    ``state``: a training run's (its device, memory format and autocast); without one the batches
    are used as the loader gives them (the compiler scores an ONNX network this way). In a DDP run
    each rank scores its share with rank 0's BatchNorm statistics and the meters are merged, so
    every rank gets the one-process result."""
    distributed.broadcast_buffers(model)
    meters = {t.name: t.new_meter() for t in tasks}
    loss_sums: dict = {t.name: 0.0 for t in tasks}  # float64 tensors on the device once a batch is in
    dataset = data.dataset
    with eval_mode(model):
        for _, images, targets in data.epoch(0):
            if state is not None:
                images, targets = state.to_device(images, targets)
            with state.precision.autocast() if state is not None else contextlib.nullcontext():
                outputs = model(images)
            for t in tasks:
                meters[t.name].update(outputs[t.name], targets[t.target])
                loss_sums[t.name] += t.loss(outputs[t.name], targets[t.target]).detach().double() * len(images)
    meters = distributed.merge_meters(meters)
    losses = distributed.sum_over_ranks(torch.tensor([float(loss_sums[name]) for name in meters], dtype=torch.float64))
    return {name: {**meter.compute(), "loss": float(loss) / len(dataset)}
            for (name, meter), loss in zip(meters.items(), losses)}


def forward_losses(state: RunState, images: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
    """The method's task losses on a batch already on the device (forward and losses in autocast)."""
    with state.precision.autocast():
        outputs = state.model(images)
        return state.method.task_losses(state.model, outputs, targets, state.tasks)


def update(state: RunState, losses: dict[str, torch.Tensor], rows: int = 1) -> dict[str, float]:
    """The strategy's backward pass of ``losses`` and the optimiser step (through the fp16 scaler
    when there is one); returns the strategy's values to log. In a DDP run the combined gradient
    is averaged over ranks (weighted by each rank's ``rows``) before the step."""
    model = state.model
    ctx = StepContext(
        shared_params=list(model.shared_parameters()),
        shared_features=list(model.shared_features),
        primary=state.spec.primary,
        loss_scale=state.precision.loss_scale(),
    )
    state.optimizer.zero_grad(set_to_none=True)
    weight_logs = state.weighting.backward(losses, ctx)
    distributed.average_gradients([p for group in state.optimizer.param_groups for p in group["params"]], rows)
    state.precision.step(state.optimizer)
    return weight_logs


def weight_step(state: RunState, images: torch.Tensor, targets: dict) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One whole weight update on a batch (no non-finite guard: tests and benchmarks); returns the
    losses and the strategy's values to log."""
    losses = forward_losses(state, images, targets)
    return losses, update(state, losses, len(images))


class NonFiniteLoss(ValueError):
    """A task's loss became NaN or inf during training (``train.on_nonfinite: stop``)."""


def loss_values(losses: dict[str, torch.Tensor], rows: int = 1) -> dict[str, float]:
    """Each task's loss as a Python float, read from the device in one transfer: the step's one
    host sync, which the non-finite guard needs before the update anyway. In a DDP run: the global
    batch's mean (``rows``: this rank's batch size), so every rank takes the same decision."""
    values = distributed.average_rows(torch.stack([loss.detach() for loss in losses.values()]).double(), rows)
    return dict(zip(losses, values.tolist()))


def trainer_state(state: RunState, cursor: EpochCursor) -> dict:
    """Everything besides the weights that a resume restores (see :mod:`taskfold.trainer.checkpoint`)."""
    return {"cursor": cursor_state(cursor), "optimizer": state.optimizer.state_dict(),
            "method": state.method.state_dict(state.model), "weighting": state.weighting.state_dict(),
            "rng": rng_state(), "metrics_bytes": state.run.metrics_path.stat().st_size,
            "precision": state.precision.state_dict(), "processes": distributed.world_size()}


def restore(state: RunState, saved: dict) -> None:
    """Put a checkpoint's weights and trainer state back into a freshly set-up run."""
    state.run.load_weights(state.model)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.method.load_state_dict(state.model, saved["method"])
    state.weighting.load_state_dict(saved["weighting"])
    state.precision.load_state_dict(saved.get("precision", {}))
    set_rng_state(saved["rng"])


def _checkpoint(state: RunState, cursor: EpochCursor) -> None:
    """Rank 0 writes the checkpoint, once every rank is checked to hold the same network."""
    distributed.broadcast_buffers(state.model)
    if distributed.active():
        distributed.check_ranks_agree(state.model)
    if state.run.writable:
        state.run.save_checkpoint(state.model, trainer_state(state, cursor))


def _train_epoch(state: RunState, cursor: EpochCursor, total_steps: int, saved: dict | None = None) -> None:
    """One epoch from ``cursor`` (its start, or where a resumed run stopped: ``saved`` is then that
    checkpoint's trainer state, restored once the epoch's schedule is set as it was)."""
    cfg, model, method = state.cfg, state.model, state.method
    train = state.loaders["train"]
    epoch = cursor.epoch
    schedule = method.start_epoch(model, Progress(epoch, cfg.train.epochs, cursor.epoch_start_step, total_steps))
    if saved is None:
        state.run.log({"type": "schedule", "epoch": epoch, **schedule})
    else:
        restore(state, saved)
    if cursor.plan_generator is None:  # the run's first epoch
        cursor.plan_generator = train.batches.generator.get_state()
    else:  # replan an epoch a resumed run had started, or the one after a checkpoint
        train.batches.generator.set_state(cursor.plan_generator)
    n_weight = train.batches.weight_batches
    arch_logs: dict[str, float] = {}
    bar = tqdm(total=n_weight, initial=cursor.weight_index + 1, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
               disable=not (cfg.train.progress and state.run.writable), leave=False)
    model.train()
    for kind, images, targets in train.epoch(epoch, skip=cursor.consumed):
        cursor.consumed += 1
        images, targets = state.to_device(images, targets)
        progress = Progress(epoch, cfg.train.epochs, cursor.step, total_steps)
        if kind == ARCH:
            with state.precision.arch_autocast():
                arch_logs = method.arch_step(model, images, targets, state.tasks, progress)
            continue
        cursor.weight_index += 1
        bar.update()
        losses = forward_losses(state, images, targets)
        values = loss_values(losses, len(images))
        bad = next((name for name, value in values.items() if not math.isfinite(value)), None)
        if bad is not None:
            _on_nonfinite(state, cursor, bad, values[bad])
            continue
        weight_logs = update(state, losses, len(images))
        for name, value in values.items():
            cursor.sums[name] = cursor.sums.get(name, 0.0) + value
            cursor.epoch_sums[name] = cursor.epoch_sums.get(name, 0.0) + value
        cursor.step += 1
        cursor.count += 1
        state.last_finite = (cursor.step, sum(values.values()))
        if cursor.step % cfg.train.log_every == 0 or cursor.weight_index == n_weight - 1:
            mean = {k: v / cursor.count for k, v in cursor.sums.items()}
            bar.set_postfix(loss=f"{sum(mean.values()):.3f}")
            state.run.log({"type": "train", "epoch": epoch, "step": cursor.step, "loss": sum(mean.values()),
                           "losses": mean, **_prefixed("weighting", weight_logs), **_prefixed("arch", arch_logs)})
            cursor.sums, cursor.count = {}, 0
        arch_logs = {}
        every = cfg.train.checkpoint_every
        if every and cursor.step % every == 0 and cursor.weight_index < n_weight - 1:
            _checkpoint(state, cursor)  # the end of the epoch has a checkpoint of its own
    bar.close()
    state.weighting.end_epoch({k: v / n_weight for k, v in cursor.epoch_sums.items()})


def _on_nonfinite(state: RunState, cursor: EpochCursor, task: str, value: float) -> None:
    """``train.on_nonfinite``: stop with one line, or drop this step (no update) and log it."""
    where = f"step {cursor.step + 1} (epoch {cursor.epoch + 1})"
    if state.cfg.train.on_nonfinite == "skip_step":
        state.run.log({"type": "skipped_step", "epoch": cursor.epoch, "step": cursor.step, "task": task,
                       "loss": str(value)})
        return
    last = (f"last finite total loss {state.last_finite[1]:.6g} at step {state.last_finite[0]}"
            if state.last_finite else "no finite step before it")
    raise NonFiniteLoss(f"train: the loss of task {task!r} is {value} at {where}; {last}. The last checkpoint is "
                        "kept; lower train.lr, or set train.on_nonfinite: skip_step")


def _prefixed(prefix: str, logs: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in logs.items()}


def fit(state: RunState, cursor: EpochCursor | None = None, saved: dict | None = None) -> None:
    """Train from ``cursor`` (default: the start) to the last epoch; ``saved``: the trainer state of
    the checkpoint ``cursor`` comes from (a resumed run)."""
    cfg = state.cfg
    total = state.loaders["train"].batches.weight_batches * cfg.train.epochs
    cursor = cursor or EpochCursor()
    if saved is not None and cursor.consumed == 0:  # stopped between epochs: restore, then start the next
        restore(state, saved)
        saved = None
    train = state.loaders["train"]
    for epoch in range(cursor.epoch, cfg.train.epochs):
        start = time.perf_counter()
        _train_epoch(state, cursor, total, saved)
        saved = None
        record = {"type": "epoch", "epoch": epoch, "step": cursor.step, "seconds": time.perf_counter() - start}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch == cfg.train.epochs - 1:
            record["val"] = evaluate(state.model, state.loaders["val"], state.tasks, state)
        state.run.log(record)
        cursor = EpochCursor(epoch=epoch + 1, step=cursor.step, epoch_start_step=cursor.step,
                             plan_generator=train.batches.generator.get_state())
        _checkpoint(state, cursor)


def finish(state: RunState) -> dict:
    """Test metrics, the method's read-off into arch.json; returns a summary."""
    test = evaluate(state.model, state.loaders["test"], state.tasks, state)
    state.spec.decision = state.method.read_off(state.model)
    if distributed.active():  # every rank ends with the same network and decision (else RanksDiverged)
        prints = distributed.check_ranks_agree(state.model, state.spec.decision)
        state.run.log({"type": "processes", "count": distributed.world_size(), "fingerprints": prints})
    if state.run.writable:
        state.spec.save(state.run.arch_path)
    state.run.log({"type": "test", "test": test})
    return {"test": test, "directions": {t.name: t.metrics for t in state.tasks},
            "main_metric": {t.name: t.main_metric for t in state.tasks},
            "follow_up": state.method.follow_up(state.cfg, state.run.path, state.spec.decision)}


def train(cfg: Config, run_dir: str | Path, *, started: Callable[[], None] | None = None) -> dict:
    """Train (or search) one run into ``run_dir``, holding its lock; returns the test summary.

    ``started`` is called once setup has succeeded (the run has started cleanly): the moment
    ``--overwrite`` may delete the run this one replaces (see :mod:`taskfold.trainer.run_target`).
    """
    Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(run_dir):
        state = setup(cfg, run_dir)
        if started is not None:
            started()
        fit(state)
        summary = finish(state)
    distributed.barrier()  # a follow-up stage on another rank reads what rank 0 wrote
    return summary


def train_stages(cfg: Config, run_dir: str | Path, *, started: Callable[[], None] | None = None) -> tuple[dict, Path]:
    """Train a run and every follow-up stage its method asks for (BMTAS: retrain the derived tree
    in ``run_dir/retrain``); returns the last stage's summary and directory (what to compile).
    ``started``: see :func:`train` (called for the first stage)."""
    top = run_dir = Path(run_dir)
    top.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(top):  # no other process may compile or replace the run between its stages
        return train_follow_ups(train(cfg, run_dir, started=started), run_dir)


def train_follow_ups(summary: dict, run_dir: Path) -> tuple[dict, Path]:
    """Train the follow-up stages ``summary`` (of the stage in ``run_dir``) asks for, one inside
    the other; returns the last stage's summary and directory."""
    while summary["follow_up"] is not None:
        run_dir = RunDir(run_dir).follow_up_path
        summary = train(summary["follow_up"], run_dir)
    return summary, run_dir
