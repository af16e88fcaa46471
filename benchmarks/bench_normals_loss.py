"""Normals loss + angle meter: the channel-sum cosine (trainer/tasks/geometry.py) vs the
``F.normalize``/``Tensor.norm`` formula it replaced, forward + backward of the loss and one meter
update, at the demo recipe's normals shape (batch 32, 64x64), in alternating rounds; median ratio and spread, 1 and 2 threads.

    nice -n 10 .venv/bin/python benchmarks/bench_normals_loss.py [--rounds 15] [--shape 32 3 64 64]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from taskfold.trainer.tasks.base import masked_mean
from taskfold.trainer.tasks.geometry import normals_cosine, valid_normals


def old_step(pred: torch.Tensor, target: torch.Tensor) -> None:
    valid = target.norm(dim=1) > 0
    cos = (F.normalize(pred, dim=1) * F.normalize(target, dim=1)).sum(dim=1)
    masked_mean(1.0 - cos, valid).backward()
    with torch.no_grad():
        valid = target.norm(dim=1) > 0
        cos = (F.normalize(pred.double(), dim=1) * F.normalize(target.double(), dim=1)).sum(dim=1)
        torch.acos(cos[valid].clamp(-1.0, 1.0))


def new_step(pred: torch.Tensor, target: torch.Tensor) -> None:
    masked_mean(1.0 - normals_cosine(pred, target), valid_normals(target)).backward()
    with torch.no_grad():
        cos = normals_cosine(pred.double(), target.double())
        torch.acos(cos[valid_normals(target)].clamp(-1.0, 1.0))


def timed(step, pred: torch.Tensor, target: torch.Tensor, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        pred.grad = None
        step(pred, target)
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 3, 64, 64])
    args = parser.parse_args()
    cpu = [line for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
           if line.startswith(("Model name", "Flags"))]
    print("\n".join(line[:200] for line in cpu))
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(*args.shape, generator=gen).requires_grad_()
    target = F.normalize(torch.randn(*args.shape, generator=gen), dim=1)
    target[:, :, :4] = 0.0  # some unlabelled pixels, as in the datasets
    for threads in (1, 2):
        torch.set_num_threads(threads)
        timed(old_step, pred, target, 3), timed(new_step, pred, target, 3)  # warm-up
        olds, news = [], []
        for _ in range(args.rounds):
            olds.append(timed(old_step, pred, target, args.reps))
            news.append(timed(new_step, pred, target, args.reps))
        ratios = sorted(o / n for o, n in zip(olds, news))
        print(f"threads={threads} shape={args.shape} rounds={args.rounds}x{args.reps}: "
              f"old {statistics.median(olds) * 1e3:.3f} ms, new {statistics.median(news) * 1e3:.3f} ms, "
              f"old/new median {statistics.median(ratios):.2f} (min {ratios[0]:.2f}, max {ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
