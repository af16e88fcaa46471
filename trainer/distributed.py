"""Data-parallel training over several processes (PyTorch DDP semantics, one code path).

``torchrun --nproc_per_node=N -m taskfold.cli train CONFIG``, or ``taskfold train --nproc N``
(:func:`launch`: the same environment torchrun sets, with one-line errors and exit codes kept),
runs N copies of the same loop. Every rank builds the same network from the same seed, walks the
same batch plan (:class:`~taskfold.trainer.data.loader.EpochBatches` hands each rank its share of
every *global* batch, so ``train.batch_size`` is the global batch) and takes the same
architecture/weight decisions. What makes them one run:

- **Gradients**: after a step's backward pass (a weighting strategy's per-task passes included,
  which therefore never all-reduce on their own: no ``no_sync`` is needed), the combined gradient
  of every parameter is averaged across ranks in one all-reduce (:func:`average_gradients`),
  weighted by each rank's rows so an uneven last batch still gives the global mean. The same
  holds for Aux-NAS's and BMTAS's architecture steps; DMTG's logits are weights of the one
  optimiser. Identical gradients on identical parameters keep every rank identical, which
  :func:`fingerprints` checks at every checkpoint.
- **Losses** that decide something (the non-finite guard, DWA's epoch means, the log) are the
  global means (:func:`average_rows`), so every rank takes the same decision.
- **BatchNorm**: batch statistics are per rank unless ``train.sync_bn`` (see
  :mod:`taskfold.models.layers.sync_batchnorm`); running statistics are taken from rank 0
  before every evaluation and checkpoint (:func:`broadcast_buffers`), as DDP's
  ``broadcast_buffers`` does.
- **Evaluation** is sharded; each task's meter is merged across ranks (:func:`merge_meters`), so
  the metrics equal a one-process evaluation.
- **Files**: only rank 0 writes (the run directory is read-only elsewhere, see
  :class:`~taskfold.trainer.rundir.RunDir`) and only rank 0 holds the run's lock.

Backends: NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU. In one
process every function here is a no-op.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    """Whether this process is one rank of a multi-process run."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, logs and holds locks."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group torchrun (or :func:`launch`) described in the environment
    (``WORLD_SIZE`` > 1); returns whether this process is now one rank of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return active()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def rank_device(device: torch.device) -> torch.device:
    """A CUDA run's device for this rank: ``cuda:LOCAL_RANK`` (one GPU per rank)."""
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def average_gradients(params, rows: int) -> None:
    """Replace each parameter's gradient by the row-weighted mean over ranks, in one all-reduce.

    ``rows``: this rank's batch size (the loss is a mean over its rows, so the global mean
    gradient is ``Σ_r rows_r · g_r / Σ_r rows_r``). Parameters without a gradient are skipped;
    every rank has the same set, because every rank runs the same graph.
    """
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    device = grads[0].device
    flat = average_rows(torch.cat([g.detach().reshape(-1).to(device, torch.float32) for g in grads]), rows)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_rows(values: torch.Tensor, rows: int) -> torch.Tensor:
    """The row-weighted mean over ranks of per-rank means ``values`` (the global batch's mean), in
    ``values``' dtype and one all-reduce (the rows travel as the last element)."""
    if not active():
        return values
    packed = torch.cat([values.reshape(-1) * rows, values.new_tensor([rows])])
    dist.all_reduce(packed)
    return (packed[:-1] / packed[-1]).view_as(values)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if not active():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (DDP's start-up broadcast)."""
    if not active():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if not active():
        return
    for tensor in module.buffers():
        dist.broadcast(tensor, src=0)


def merge_meters(meters: dict) -> dict:
    """Every rank's evaluation meters merged in rank order (identical on every rank)."""
    if not active():
        return meters
    merged, *others = gather(meters)
    for other in others:
        for name, meter in merged.items():
            meter.merge(other[name])
    return merged


def gather(value) -> list:
    """``value`` of every rank, in rank order (in one process: ``[value]``)."""
    if not active():
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def fingerprint(module: nn.Module) -> list[float]:
    """A few float64 sums of every parameter and buffer: equal on ranks that hold the same
    network (used to check that no rank drifted)."""
    with torch.no_grad():
        tensors = [t.detach().double() for t in list(module.parameters()) + list(module.buffers())
                   if t.is_floating_point()]
        return [float(sum(t.sum() for t in tensors)), float(sum(t.abs().sum() for t in tensors)),
                float(sum((t * t).sum() for t in tensors))]


class RanksDiverged(RuntimeError):
    """The ranks of a DDP run no longer hold the same network (a bug, never a user error)."""


def check_ranks_agree(module: nn.Module, decision: dict | None = None) -> list[list[float]]:
    """Every rank's :func:`fingerprint` of ``module``; raises :class:`RanksDiverged` when another
    rank's network (or architecture read-off ``decision``) differs from this rank's."""
    mine = (fingerprint(module), decision)
    everyone = gather(mine)
    for r, theirs in enumerate(everyone):
        if theirs != mine:
            raise RanksDiverged(f"rank {r} holds a different network or decision than rank {rank()} "
                                f"(fingerprint {theirs[0]} vs {mine[0]})")
    return [prints for prints, _ in everyone]


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m taskfold.cli ARGV`` as ``nproc`` ranks on this machine, with the variables
    torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT).

    Unlike torchrun, a rank's exit code is passed through (2 for a user error, with the rank's one
    line on stderr) and no launcher traceback is added. When a rank fails, the others are stopped.
    """
    port = _free_port()
    procs, logs = [], [tempfile.TemporaryFile() for _ in range(nproc)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # the cores shared out, as torchrun
    for r in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "taskfold.cli", *argv], env=env,
                                      stdout=None if r == 0 else subprocess.DEVNULL,
                                      stderr=None if r == 0 else logs[r]))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                if failed != 0:  # the same mistake usually stops rank 0 too, which has said it already
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        procs[0].wait(timeout=5)
                    if procs[0].returncode not in (None, 0):
                        failed = 0
                _stop(procs)
                if failed != 0:  # rank 0's stderr is this process's; another rank's was kept aside
                    logs[failed].seek(0)
                    sys.stderr.write(logs[failed].read().decode(errors="replace"))
                return procs[failed].returncode
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs)
        raise


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
