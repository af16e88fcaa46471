"""The trainer's own cost: its training epoch against a minimal hand-written PyTorch loop, and the
share of step time spent waiting for data.

    .venv/bin/python benchmarks/bench_trainer_overhead.py               # demo recipe, 1 and 2 threads
    .venv/bin/python benchmarks/bench_trainer_overhead.py --recipe configs/demo.yaml --set data.size=96

Both candidates train the same model (the recipe's, built by the trainer's own setup: the demo is
shared encoder + EW), on the same loader (same batches, default ``data.workers``), with the same
optimiser, in alternating rounds of one epoch each (the order rotates every round). The
hand-written loop is what a user would write: forward, sum of the task losses, backward, step.
The trainer's epoch adds what it does for every method: the method's loss hook, the weighting
strategy's backward, logging every ``train.log_every`` steps. Reported: the median over rounds of
trainer time / hand-written time, with the range.

Data wait: inside the trainer's epochs, the time spent in the loader's ``next()`` (producing a
batch: indexing the stored split, dtype conversion and normalisation, or waiting for a worker)
as a share of the epoch time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, rotated  # noqa: E402

from taskfold.trainer.checkpoint import EpochCursor  # noqa: E402
from taskfold.trainer.config import load_config  # noqa: E402
from taskfold.trainer.loop import _train_epoch, setup  # noqa: E402


class TimedLoader:
    """The split loader with the time of every ``next()`` recorded (the benchmark's own wrapper)."""

    def __init__(self, loader) -> None:
        self.loader, self.waits = loader, []

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def epoch(self, epoch: int, skip: int = 0):
        batches = iter(self.loader.epoch(epoch, skip))
        while True:
            start = time.perf_counter()
            try:
                item = next(batches)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield item


def hand_written_epoch(state, epoch: int) -> None:
    """Forward, summed task losses, backward, step: no method, weighting or logging layer."""
    model, tasks, optimizer = state.model, state.tasks, state.optimizer
    model.train()
    for _, images, targets in state.loaders["train"].loader.epoch(epoch):
        outputs = model(images)
        loss = sum(t.loss(outputs[t.name], targets[t.target]) for t in tasks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def measure(recipe: str, overrides: list[str], threads: int, rounds: int) -> None:
    torch.set_num_threads(threads)
    cfg = load_config(recipe, ["train.progress=false", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        state = setup(cfg, Path(tmp) / "run")
        timed = TimedLoader(state.loaders["train"])
        state.loaders["train"] = timed
        steps = timed.batches.weight_batches
        candidates = {"trainer": lambda e: _train_epoch(state, EpochCursor(epoch=e), steps * rounds),
                      "hand": lambda e: hand_written_epoch(state, e)}
        for fn in candidates.values():  # warm-up epoch each
            fn(0)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        shares = []
        names = list(candidates)
        for r in range(rounds):
            for name in rotated(names, r):
                timed.waits.clear()
                start = time.perf_counter()
                candidates[name](r + 1)
                elapsed = time.perf_counter() - start
                times[name].append(elapsed)
                if name == "trainer":
                    shares.append(sum(timed.waits) / elapsed)
    ratios = [t / h for t, h in zip(times["trainer"], times["hand"])]
    print(f"threads {threads}: {steps} steps/epoch, epoch median trainer {statistics.median(times['trainer']):.2f} s, "
          f"hand-written {statistics.median(times['hand']):.2f} s; trainer/hand median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}); data wait {statistics.median(shares) * 100:.1f} % of the "
          f"trainer's epoch (range {min(shares) * 100:.1f}-{max(shares) * 100:.1f} %), workers "
          f"{timed.loader.workers}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print(cpu_line())
    for threads in (int(t) for t in args.threads.split(",")):
        measure(args.recipe, args.overrides, threads, args.rounds)


if __name__ == "__main__":
    main()
